"""Fixtures for the memstore store tests: a fresh store per test and numpy references.

Every test that uses the ``store`` / ``db_url`` fixtures runs on SQLite and on PostgreSQL +
pgvector (the ``fresh_postgres_url`` fixture of tests/pg_fixture.py, which starts its own server;
skipped locally when none can start, required in CI): the same API contract, checked on both
backends (about a minute more). ``MEMSTORE_STORE_TESTS_PG=0`` runs SQLite only.
"""

from __future__ import annotations

import numpy as np
import pytest
from pg_fixture import STORE_BACKENDS as BACKENDS  # tests/ is on sys.path (tests/conftest.py)

from memstore import Store


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def store(db_url):
    with Store(db_url) as s:
        yield s


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _brute_force(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(m, n) distances in memstore's convention, float64 (the reference for every search test)."""
    q = queries.astype(np.float64)
    k = keys.astype(np.float64)
    if metric == "l2":
        return np.sqrt(((q[:, None, :] - k[None, :, :]) ** 2).sum(-1))
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        kn = k / np.linalg.norm(k, axis=1, keepdims=True)
        return 1.0 - qn @ kn.T
    return -(q @ k.T)


def _index_consistent(coll) -> bool:
    """The row table and the vector index hold exactly the same ids."""
    with coll.store.read() as conn:
        index_ids = coll.store.backend.index_ids(conn, coll.spec)
        row_ids = coll.store.backend.fetch_rows(conn, coll.spec, None).ids
    return index_ids.tolist() == row_ids.tolist()


@pytest.fixture
def brute_force():
    """The numpy brute-force distance function (a fixture: conftest modules are not importable)."""
    return _brute_force


@pytest.fixture
def index_consistent():
    return _index_consistent
