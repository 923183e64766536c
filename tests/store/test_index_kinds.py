"""Index kinds and URL schemes that only one backend serves get a clear answer, never a half-made collection."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import Store, distances
from memstore.errors import InvalidInputError


@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
def test_sqlite_refuses_pgvector_index_kinds_and_creates_nothing(tmp_path, index):
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        with pytest.raises(InvalidInputError, match=f"{index}.*PostgreSQL"):
            store.create_collection("c", key_dim=4, index=index)
        assert store.list_collections() == []


@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
def test_postgres_serves_hnsw_and_ivfflat_through_the_store_api(fresh_postgres_url, index):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    with Store(fresh_postgres_url) as store:
        coll = store.create_collection("c", key_dim=8, metric="l2", index=index, oversample=64)
        coll.insert(keys)
        assert coll.index == index
        res = coll.search(keys[:5], 3, touch=False)
        # Each key's nearest row is itself at distance 0.
        np.testing.assert_allclose(res.distances[:, 0], 0.0, atol=1e-5)


def test_postgres_scheme_url_is_accepted(fresh_postgres_url):
    url = "postgres://" + fresh_postgres_url.split("://", 1)[1]
    with Store(url) as store:
        store.create_collection("c", key_dim=4)
        assert [c.name for c in store.list_collections()] == ["c"]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    n=st.integers(1, 50),
    dim=st.integers(1, 8),
    k=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_index_none_searches_exactly_by_scanning_the_rows(tmp_path_factory, metric, n, dim, k,
                                                          seed):  # fmt: skip
    """No kNN index, yet search answers what brute force answers (ties: lower id first), with
    the rows' values; the store's own search semantics (padding, touches) are unchanged."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-2, 3, (n, dim)).astype(np.float32)  # small integers: many exact ties
    if metric == "cosine":
        keys[np.abs(keys).sum(1) == 0, 0] = 1.0
    values = rng.standard_normal((n, 3)).astype(np.float32)
    queries = rng.integers(-2, 3, (4, dim)).astype(np.float32) + 0.5
    path = tmp_path_factory.mktemp("none") / "x.db"
    with Store(f"sqlite:///{path}") as store:
        coll = store.create_collection("c", key_dim=dim, value_dim=3, metric=metric, index="none")
        ids = coll.insert(keys, values)
        result = coll.search(queries, k)
    ref = distances.pairwise_distances(metric, queries, keys)
    c = min(k, n)
    for row in range(len(queries)):
        order = np.lexsort((ids, ref[row]))[:c]  # by distance, then lower id
        np.testing.assert_array_equal(result.ids[row, :c], ids[order])
        np.testing.assert_allclose(result.distances[row, :c], ref[row, order], rtol=1e-6)
        np.testing.assert_array_equal(result.keys[row, :c], keys[order])
        np.testing.assert_array_equal(result.values[row, :c], values[order])
    assert (result.ids[:, c:] == -1).all() and np.isinf(result.distances[:, c:]).all()


def test_index_none_keeps_no_vec0_table_and_every_operation_works(tmp_path, index_consistent):
    rng = np.random.default_rng(5)
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        coll = store.create_collection("c", key_dim=4, metric="ip", index="none", capacity=8)
        coll.insert(rng.normal(size=(12, 4)).astype(np.float32))
        with store.read() as conn:
            tables = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")}
        assert not any(name.startswith("vec_") for name in tables)
        coll.update([1, 2], keys=rng.normal(size=(2, 4)).astype(np.float32) * 100)  # longer keys
        coll.search(rng.normal(size=(3, 4)).astype(np.float32), 4, recombine=0.0, novel=-1e9)
        coll.delete([3])
        coll.evict()
        assert len(coll) == 8 and index_consistent(coll)
        coll.compact()
        stats = coll.stats()
        assert stats["index"] == "none" and stats["rows"] == 8
        rows = coll.export_rows()
        queries = rng.normal(size=(5, 4)).astype(np.float32)
        hit = coll.search(queries, 3, touch=False)
        ref = distances.pairwise_distances("ip", queries, rows.keys)
        np.testing.assert_array_equal(
            hit.ids, rows.ids[np.argsort(ref, axis=1, kind="stable")[:, :3]]
        )


def test_index_none_bulk_upsert_writes_every_column(tmp_path):
    """apply_changes of existing rows rewrites key, value and LRFU state in one statement per row."""
    from memstore.types import RowBlock

    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        for index in ("none", "exact"):
            coll = store.create_collection(f"c_{index}", key_dim=2, value_dim=3, index=index)
            ids = np.arange(1, 6)
            block = RowBlock(
                ids=ids,
                keys=np.arange(10, dtype=np.float32).reshape(5, 2),
                values=np.ones((5, 3), np.float32),
                crf=np.full(5, 2.0),
                last_tick=np.full(5, 3),
                hits=np.full(5, 4),
                created_tick=np.zeros(5, np.int64),
            )
            coll.apply_changes(upserts=block, clock=3)
            changed = RowBlock(
                ids=ids[::-1].copy(),
                keys=-block.keys,
                values=block.values * 7,
                crf=block.crf + 1,
                last_tick=block.last_tick + 1,
                hits=block.hits + 1,
                created_tick=block.created_tick + 1,
            )
            coll.apply_changes(upserts=changed, clock=4)
            out = coll.export_rows()
            order = np.argsort(changed.ids)
            for field in ("ids", "keys", "values", "crf", "last_tick", "hits", "created_tick"):
                np.testing.assert_array_equal(getattr(out, field), getattr(changed, field)[order])
            # the kNN index follows the new keys
            found = coll.search(-block.keys[:1], 1, touch=False)
            assert found.ids[0, 0] == changed.ids[0]


def test_postgres_accepts_index_none_as_an_exact_scan(fresh_postgres_url):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 4)).astype(np.float32)
    with Store(fresh_postgres_url) as store:
        coll = store.create_collection("c", key_dim=4, index="none")
        ids = coll.insert(keys)
        assert coll.index == "none"
        res = coll.search(keys[:3], 1, touch=False)
        assert res.ids[:, 0].tolist() == ids[:3].tolist()
