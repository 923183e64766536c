"""Store / Collection API: collection lifecycle, row CRUD, bulk export and apply_changes."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from memstore import RowBlock, Store, catalog, errors


def table_names(store) -> set[str]:
    with store.read() as conn:
        return set(sa.inspect(conn).get_table_names())


def test_create_get_list_drop(store):
    tables_before = table_names(store)
    a = store.create_collection(
        "a",
        key_dim=4,
        value_dim=2,
        metric="ip",
        lrfu_lambda=0.25,
        capacity=10,
        index="rescore-int8",
        oversample=4,
    )
    store.create_collection("b.x-1", key_dim=3)
    got = store.collection("a")
    assert (got.name, got.key_dim, got.value_dim, got.metric) == ("a", 4, 2, "ip")
    assert (got.lrfu_lambda, got.capacity, got.index, got.oversample) == (
        0.25,
        10,
        "rescore-int8",
        4,
    )
    assert [c.name for c in store.list_collections()] == ["a", "b.x-1"]
    assert store.collection("b.x-1").value_dim == 3  # value_dim defaults to key_dim
    with pytest.raises(errors.CollectionExistsError):
        store.create_collection("a", key_dim=4)
    assert store.get_or_create_collection("a").key_dim == 4  # nothing asked: stored options
    with pytest.raises(errors.DimensionMismatchError, match="key_dim 4, not 99"):
        store.get_or_create_collection("a", key_dim=99)  # asked for, and different: an error
    assert store.get_or_create_collection("c", key_dim=5).key_dim == 5
    a.insert(np.ones((3, 4), np.float32), np.ones((3, 2), np.float32))
    store.drop_collection("a")
    with pytest.raises(errors.CollectionNotFoundError):
        store.collection("a")
    store.drop_collection("b.x-1")
    store.drop_collection("c")
    assert table_names(store) == tables_before  # their tables (and index tables) are gone too


def test_insert_assigns_consecutive_ids_and_get_roundtrips(store, rng):
    coll = store.create_collection("c", key_dim=8, value_dim=3)
    k1, v1 = (
        rng.standard_normal((5, 8)).astype(np.float32),
        rng.standard_normal((5, 3)).astype(np.float32),
    )
    k2, v2 = (
        rng.standard_normal((4, 8)).astype(np.float32),
        rng.standard_normal((4, 3)).astype(np.float32),
    )
    assert coll.insert(k1, v1).tolist() == [0, 1, 2, 3, 4]
    assert coll.insert(k2, v2).tolist() == [5, 6, 7, 8]
    assert len(coll) == 9
    rows = coll.get([7, 2, 7])
    assert rows.ids.tolist() == [7, 2, 7]
    np.testing.assert_array_equal(rows.keys, np.stack([k2[2], k1[2], k2[2]]))
    np.testing.assert_array_equal(rows.values, np.stack([v2[2], v1[2], v2[2]]))
    assert rows.keys.dtype == np.float32 and rows.ids.dtype == np.int64
    with pytest.raises(errors.RowNotFoundError, match="99"):
        coll.get([1, 99])


def test_values_default_to_keys_and_float64_is_narrowed(store, rng):
    coll = store.create_collection("c", key_dim=4)
    keys = rng.standard_normal((3, 4))  # float64
    coll.insert(keys)
    np.testing.assert_array_equal(coll.export_rows().values, keys.astype(np.float32))


def test_update_and_delete_keep_index_consistent(store, rng, index_consistent):
    coll = store.create_collection("c", key_dim=6, value_dim=2, metric="l2")
    keys = rng.standard_normal((20, 6)).astype(np.float32)
    coll.insert(keys, np.zeros((20, 2), np.float32))
    new_key = np.full((1, 6), 10.0, np.float32)
    coll.update([3], keys=new_key, values=np.ones((1, 2), np.float32))
    res = coll.search(new_key, 1, touch=False)
    assert res.ids[0, 0] == 3 and res.distances[0, 0] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_array_equal(res.values[0, 0], [1.0, 1.0])
    coll.update([4], values=np.full((1, 2), 7.0, np.float32))  # values only: key unchanged
    np.testing.assert_array_equal(coll.get([4]).keys[0], keys[4])
    assert coll.delete([3, 5, 12345]) == 2
    assert len(coll) == 18 and index_consistent(coll)
    assert 3 not in coll.search(new_key, 18, touch=False).ids
    with pytest.raises(errors.RowNotFoundError):
        coll.update([3], values=np.ones((1, 2), np.float32))


def test_export_rows_and_apply_changes_roundtrip(store, rng, index_consistent):
    coll = store.create_collection("c", key_dim=4, value_dim=2)
    coll.insert(rng.standard_normal((6, 4)).astype(np.float32), np.zeros((6, 2), np.float32))
    block = coll.export_rows()
    assert block.ids.tolist() == list(range(6))
    changed = RowBlock(
        ids=np.array([2, 40], np.int64),
        keys=np.full((2, 4), 3.0, np.float32),
        values=np.full((2, 2), 5.0, np.float32),
        crf=np.array([2.5, 1.0]),
        last_tick=np.array([7, 9], np.int64),
        hits=np.array([3, 0], np.int64),
        created_tick=np.array([0, 9], np.int64),
    )
    coll.apply_changes(
        changed,
        np.array([0, 1], np.int64),
        clock=9,
        counters={"inserts": 1, "recombinations": 2, "evictions": 2},
    )
    after = coll.export_rows()
    assert after.ids.tolist() == [2, 3, 4, 5, 40]
    row = after.take(np.array([0, 4]))
    np.testing.assert_array_equal(row.keys, changed.keys)
    np.testing.assert_array_equal(row.crf, changed.crf)
    np.testing.assert_array_equal(row.last_tick, changed.last_tick)
    np.testing.assert_array_equal(row.hits, changed.hits)
    assert coll.clock == 9
    stats = coll.stats()
    assert (stats["inserts"], stats["recombinations"], stats["evictions"]) == (7, 2, 2)
    assert coll.insert(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32)).tolist() == [41]
    assert index_consistent(coll)
    res = coll.search(np.full((1, 4), 3.0, np.float32), 2, touch=False)
    assert set(res.ids[0].tolist()) == {2, 40}


def test_apply_changes_rejects_bad_blocks_without_change(store, rng):
    coll = store.create_collection("c", key_dim=4, value_dim=2)
    coll.insert(rng.standard_normal((3, 4)).astype(np.float32), np.zeros((3, 2), np.float32))
    before = coll.export_rows()
    bad = RowBlock.fresh(
        np.array([0, 0]), np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32), 0
    )
    with pytest.raises(errors.InvalidInputError, match="duplicates"):
        coll.apply_changes(bad)
    ok = RowBlock.fresh(
        np.array([1]), np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32), 0
    )
    with pytest.raises(errors.InvalidInputError, match="both"):
        coll.apply_changes(ok, np.array([1]))
    with pytest.raises(errors.InvalidInputError, match="counter"):
        coll.apply_changes(ok, counters={"bogus": 1})
    after = coll.export_rows()
    np.testing.assert_array_equal(before.keys, after.keys)
    np.testing.assert_array_equal(before.ids, after.ids)


def test_failed_batch_rolls_back(store, rng, monkeypatch, index_consistent):
    """A batch that fails half-way (here: the index write) leaves nothing behind."""
    coll = store.create_collection("c", key_dim=4)
    coll.insert(rng.standard_normal((3, 4)).astype(np.float32))

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    # set_state runs after the rows and index entries are written, inside the same transaction
    monkeypatch.setattr(catalog, "set_state", boom)
    with pytest.raises(RuntimeError):
        coll.insert(rng.standard_normal((5, 4)).astype(np.float32))
    monkeypatch.undo()
    assert len(coll) == 3 and coll.stats()["inserts"] == 3 and index_consistent(coll)
    assert coll.insert(np.ones((1, 4), np.float32)).tolist() == [3]


def test_store_reopens_with_data(db_url, rng):
    keys = rng.standard_normal((10, 4)).astype(np.float32)
    with Store(db_url) as s:
        s.create_collection("c", key_dim=4, metric="cosine").insert(keys)
    with Store.open(db_url) as s:
        coll = s.collection("c")
        assert len(coll) == 10 and coll.metric == "cosine"
        np.testing.assert_array_equal(coll.export_rows().keys, keys)


def test_in_memory_store_works():
    with Store("sqlite://") as s:
        coll = s.create_collection("m", key_dim=2)
        coll.insert(np.eye(2, dtype=np.float32))
        assert coll.search(np.array([[1.0, 0.0]], np.float32), 1).ids.tolist() == [[0]]


def test_stats_fields(store, rng):
    coll = store.create_collection("s", key_dim=4, capacity=100)
    coll.insert(rng.standard_normal((4, 4)).astype(np.float32))
    coll.search(rng.standard_normal((2, 4)).astype(np.float32), 2)
    stats = coll.stats()
    for key in (
        "name",
        "rows",
        "key_dim",
        "value_dim",
        "metric",
        "index",
        "lrfu_lambda",
        "capacity",
        "clock",
        "inserts",
        "recombinations",
        "evictions",
        "searches",
        "score",
    ):
        assert key in stats
    assert stats["rows"] == 4 and stats["clock"] == 1 and stats["searches"] == 1
    assert stats["score"]["max"] >= stats["score"]["min"]


def test_repeated_flushes_update_in_place(store, rng, index_consistent):
    """Flushing the same rows again and again (memstore_torch's apply_changes) keeps the file's
    size and the row/index consistency, and stores exactly what was flushed."""
    coll = store.create_collection("f", key_dim=16, metric="ip")
    coll.insert(rng.standard_normal((3000, 16)).astype(np.float32))
    block = coll.export_rows()
    size = None
    for step in range(6):
        block.keys = block.keys + np.float32(0.01)
        block.crf = block.crf + 1.0
        block.last_tick = block.last_tick + 1
        coll.apply_changes(block, clock=step + 1)
        if size is None:  # values no longer equal the keys: from now on they are stored too
            store.backend.vacuum()
            size = store.size_bytes()
    store.backend.vacuum()  # VACUUM without rebuilding the index
    assert store.size_bytes() < 1.2 * size
    after = coll.export_rows()
    np.testing.assert_allclose(after.keys, block.keys)
    np.testing.assert_array_equal(after.crf, block.crf)
    assert index_consistent(coll)
    res = coll.search(block.keys[:3], 2, touch=False)
    np.testing.assert_allclose(
        res.distances, np.sort(-(block.keys[:3] @ block.keys.T), 1)[:, :2], rtol=1e-5
    )
