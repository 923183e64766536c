"""Fixtures for the memstore store tests: a fresh SQLite store per test and numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store


@pytest.fixture
def db_url(tmp_path) -> str:
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
        rows = coll.store.backend.count_rows(conn, coll.spec)
        index = coll.store.backend.index_count(conn, coll.spec)
        ids = conn.exec_driver_sql(f"SELECT id FROM vec_{coll.spec.id} ORDER BY id").fetchall()
    return rows == index and [r[0] for r in ids] == coll.export_rows().ids.tolist()


@pytest.fixture
def brute_force():
    """The numpy brute-force distance function (a fixture: conftest modules are not importable)."""
    return _brute_force


@pytest.fixture
def index_consistent():
    return _index_consistent
