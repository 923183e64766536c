"""Fixtures of the PostgreSQL tests.

The server itself comes from ``tests/pg_fixture.py`` (registered from the root conftest), so that
``tests/store`` can run its suite over PostgreSQL with the same server.
"""

from __future__ import annotations

import itertools

import pytest

from memstore import Store
from memstore.backends.postgres import PostgresBackend
from memstore.types import CollectionSpec

_spec_ids = itertools.count(1000)


@pytest.fixture
def pg_url(fresh_postgres_url: str) -> str:
    """A new, empty database (plain socket-form ``postgresql://`` URL) for one test."""
    return fresh_postgres_url


@pytest.fixture
def pg_store(pg_url: str):
    store = Store(pg_url)
    yield store
    store.close()


@pytest.fixture(scope="module")
def pg_backend(postgres_server):
    """A backend on one database shared by a module; tests create collections with new ids."""
    url = postgres_server.create_database()
    engine = PostgresBackend.create_engine(url)
    yield PostgresBackend(engine)
    engine.dispose()
    postgres_server.drop_database(url)


@pytest.fixture
def make_spec(pg_backend):
    """Create storage for a CollectionSpec (backend level, bypassing the store's catalog)."""

    def make(**overrides) -> CollectionSpec:
        options = dict(
            name="c",
            key_dim=8,
            value_dim=4,
            metric="l2",
            lrfu_lambda=0.5,
            capacity=None,
            index="exact",
            oversample=8,
        )
        options.update(overrides)
        spec = CollectionSpec(id=next(_spec_ids), **options)
        with pg_backend.engine.begin() as conn:
            pg_backend.create_storage(conn, spec)
        return spec

    return make
