"""PostgreSQL tests use the shared server fixtures of ``tests/pg_fixture.py``.

They are registered from the root ``tests/conftest.py``; this file only documents that and gives the
directory's tests the shorter ``pg_url`` name for a fresh database per test.
"""

import pytest


@pytest.fixture
def pg_url(fresh_postgres_url: str) -> str:
    return fresh_postgres_url
