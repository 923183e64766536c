"""SQLite storage layout: an indexed collection's keys are stored once (in its vec0 index, the row
table holds ``x''``), a value equal to its key is stored once (as the key), databases written the
old way (keys and values in the row table) still read correctly, and bulk statements are split by
bytes as well as rows. Every read path is checked against what was written."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store
from memstore.backends import sqlite as sqlite_backend
from memstore.naming import rows_table

KINDS = [
    ("l2", "exact"),
    ("ip", "exact"),
    ("cosine", "exact"),
    ("l2", "rescore-bit"),
    ("ip", "rescore-int8"),
    ("l2", "none"),
]


@pytest.fixture
def store(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'layout.db'}") as s:
        yield s


def blob_lengths(coll) -> list[tuple[int, int]]:
    with coll.store.read() as conn:
        result = conn.exec_driver_sql(
            f"SELECT length(key), length(value) FROM {rows_table(coll.spec)} ORDER BY id"
        ).fetchall()
    return [tuple(r) for r in result]


def assert_rows(coll, keys, values, index_consistent):
    rows = coll.export_rows()
    np.testing.assert_array_equal(rows.keys, keys)
    np.testing.assert_array_equal(rows.values, values)
    some = rows.ids[[2, 0]]
    got = coll.get(some)
    np.testing.assert_array_equal(got.keys, keys[[2, 0]])
    np.testing.assert_array_equal(got.values, values[[2, 0]])
    res = coll.search(keys[:3], 2, touch=False)
    at = np.searchsorted(rows.ids, res.ids)  # each hit's keys and values are that row's
    np.testing.assert_array_equal(res.keys, keys[at])
    np.testing.assert_array_equal(res.values, values[at])
    if coll.metric != "ip":
        np.testing.assert_array_equal(res.keys[:, 0], keys[:3])  # each key is its own nearest
    assert index_consistent(coll)


@pytest.mark.parametrize("metric,index", KINDS)
def test_keys_and_key_valued_rows_are_stored_once(store, rng, metric, index, index_consistent):
    coll = store.create_collection("c", key_dim=8, metric=metric, index=index)
    keys = rng.standard_normal((40, 8)).astype(np.float32) * np.float32(3)
    coll.insert(keys)  # values default to the keys
    key_len = 32 if index == "none" else 0
    assert blob_lengths(coll) == [(key_len, 0)] * 40
    assert_rows(coll, keys, keys, index_consistent)

    values = keys.copy()
    values[5] += 1
    coll.insert(keys + 100, np.concatenate([keys[:5] + 100, values[5:]]))  # mixed batch
    lengths = blob_lengths(coll)[40:]
    assert [v for _, v in lengths] == [0] * 5 + [32] * 35
    assert_rows(
        coll,
        np.concatenate([keys, keys + 100]),
        np.concatenate([keys, keys[:5] + 100, values[5:]]),
        index_consistent,
    )


@pytest.mark.parametrize("metric,index", KINDS)
def test_updating_keys_keeps_values_stored_as_the_key(store, rng, metric, index, index_consistent):
    """A row whose value was stored as "the key" keeps its old key as its value when only its key
    changes; an ip update to a much longer key rebuilds the index from the keys in it."""
    coll = store.create_collection("c", key_dim=8, metric=metric, index=index)
    keys = rng.standard_normal((10, 8)).astype(np.float32)
    ids = coll.insert(keys)
    new_keys = keys[:3] * np.float32(50)  # longer than the ip norm bound: an index rebuild
    coll.update(ids[:3], keys=new_keys)
    want_keys = np.concatenate([new_keys, keys[3:]])
    assert_rows(coll, want_keys, keys, index_consistent)
    coll.update(ids[3:5], values=keys[3:5] + 1)
    want_values = keys.copy()
    want_values[3:5] += 1
    assert_rows(coll, want_keys, want_values, index_consistent)
    coll.update(ids[5:7], keys=keys[5:7] - 1, values=keys[5:7] - 1)  # value = new key: once
    want_keys[5:7] -= 1
    want_values[5:7] -= 1
    assert blob_lengths(coll)[5][1] == 0
    assert_rows(coll, want_keys, want_values, index_consistent)
    coll.compact()  # rebuilds the index from itself
    assert_rows(coll, want_keys, want_values, index_consistent)


@pytest.mark.parametrize("metric,index", KINDS)
def test_rows_written_the_old_way_still_read(store, rng, metric, index, index_consistent):
    """Databases written before keys were stored once hold every key and value in the row table:
    reads, updates and index rebuilds take them from there."""
    coll = store.create_collection("c", key_dim=8, value_dim=8, metric=metric, index=index)
    keys = rng.standard_normal((12, 8)).astype(np.float32)
    values = rng.standard_normal((12, 8)).astype(np.float32)
    ids = coll.insert(keys, values)
    with coll.store.write() as conn:  # the old layout: both blobs in the row table
        conn.exec_driver_sql(
            f"UPDATE {rows_table(coll.spec)} SET key = ?, value = ? WHERE id = ?",
            [(k.tobytes(), v.tobytes(), int(i)) for k, v, i in zip(keys, values, ids, strict=True)],
        )
    assert blob_lengths(coll) == [(32, 32)] * 12
    assert_rows(coll, keys, values, index_consistent)
    coll.update(ids[:2], keys=keys[:2] * np.float32(40))
    keys[:2] *= np.float32(40)
    assert_rows(coll, keys, values, index_consistent)
    coll.compact()
    assert_rows(coll, keys, values, index_consistent)


def test_bulk_statements_are_split_by_bytes(store, rng, monkeypatch, index_consistent):
    """A batch whose blobs exceed BULK_BYTES goes in several statements (SQLite refuses a bound
    value over 1 GB: 65,536 rows of 8,192 floats would be 2 GiB), with the same result."""
    monkeypatch.setattr(sqlite_backend, "BULK_BYTES", 10 * 8 * 4 + 7)  # 10 rows a statement
    statements = []
    original = sqlite_backend.SqliteBackend._insert_index

    def counting(self, conn, spec, ids, keys, bound):
        statements.extend(sqlite_backend._runs(ids, keys.shape[1] * 4))
        return original(self, conn, spec, ids, keys, bound)

    monkeypatch.setattr(sqlite_backend.SqliteBackend, "_insert_index", counting)
    coll = store.create_collection("c", key_dim=8)
    keys = rng.standard_normal((35, 8)).astype(np.float32)
    values = rng.standard_normal((35, 8)).astype(np.float32)
    coll.insert(keys, values)
    assert [stop - start for start, stop, _ in statements] == [10, 10, 10, 5]
    assert_rows(coll, keys, values, index_consistent)


def test_a_key_missing_from_the_index_is_reported_not_guessed(store, rng):
    """An indexed row whose key is neither in the row table nor in the index (a damaged file)
    is a one-line CorruptDataError naming the collection and the row, for get and export."""
    from memstore import errors
    from memstore.naming import vec_table

    coll = store.create_collection("c", key_dim=4)
    ids = coll.insert(rng.standard_normal((5, 4)).astype(np.float32))
    with coll.store.write() as conn:
        conn.exec_driver_sql(f"DELETE FROM {vec_table(coll.spec)} WHERE id = ?", (int(ids[2]),))
    for call in (lambda: coll.get(ids[1:4]), coll.export_rows):
        with pytest.raises(errors.CorruptDataError, match=f"'c' is damaged.*first id {ids[2]}"):
            call()
    np.testing.assert_array_equal(coll.get(ids[:2]).ids, ids[:2])
