"""Importing into a collection that may not exist yet is ONE transaction (``Store.import_rows``,
what ``memstore import`` runs): concurrent imports of a new collection both succeed, and a process
killed between creating the collection and inserting leaves nothing behind. On SQLite and on
PostgreSQL (``db_url``, tests/store/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstore import Store, catalog, errors

WORKER = Path(__file__).with_name("import_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's memstore, not an installed one
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def keys_file(tmp_path, rng):
    path = tmp_path / "keys.npy"
    np.save(path, rng.standard_normal((50, 4)).astype(np.float32))
    return path


def test_import_rows_creates_then_appends(store, rng):
    keys = rng.standard_normal((6, 4)).astype(np.float32)
    coll, ids, created = store.import_rows("c", keys, metric="cosine", capacity=10)
    assert created and ids.tolist() == list(range(6))
    assert (coll.metric, coll.capacity, coll.key_dim, coll.value_dim) == ("cosine", 10, 4, 4)
    coll, ids, created = store.import_rows("c", keys[:2], metric="cosine")
    assert not created and ids.tolist() == [6, 7] and len(coll) == 8
    with pytest.raises(errors.InvalidInputError, match="exists with metric cosine, not l2"):
        store.import_rows("c", keys, metric="l2")
    with pytest.raises(errors.InvalidInputError, match="exists with capacity 10, not 11"):
        store.import_rows("c", keys, capacity=11)
    assert len(store.collection("c")) == 8


def test_a_rejected_import_leaves_no_collection(store, rng):
    keys = rng.standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(errors.InvalidInputError, match="NaN"):
        store.import_rows("new", np.full((3, 4), np.nan, np.float32))
    with pytest.raises(errors.InvalidInputError, match="rows but there are"):
        store.import_rows("new", keys, np.ones((5, 2), np.float32))
    with pytest.raises(errors.InvalidInputError, match="unknown metric"):
        store.import_rows("new", keys, metric="hamming")
    assert not store.has_collection("new")


def test_transaction_groups_calls(store, rng, monkeypatch, index_consistent):
    keys = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.create_collection("t", key_dim=4).insert(keys)
            raise RuntimeError("changed my mind")
    assert not store.has_collection("t")
    with store.transaction():
        coll = store.create_collection("t", key_dim=4)
        coll.insert(keys)
        with pytest.raises(errors.DimensionMismatchError):
            coll.insert(np.ones((2, 5), np.float32))  # its own failure is undone, not the block's
        with pytest.raises(errors.InvalidInputError, match="inside"):
            coll.compact()
    assert len(store.collection("t")) == 3

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    coll = store.collection("t")
    with store.transaction():
        coll.insert(keys)
        with monkeypatch.context() as patch:  # fails after its rows and index entries are written
            patch.setattr(catalog, "set_state", boom)
            with pytest.raises(RuntimeError):
                coll.insert(rng.standard_normal((500, 4)).astype(np.float32))
        assert coll.insert(keys).tolist() == [6, 7, 8]  # the failed call left nothing, not even ids
    assert len(coll) == 9 and coll.stats()["inserts"] == 9 and index_consistent(coll)
    assert coll.search(keys, 1, touch=False).distances.max() == 0.0
    with store.read():
        with pytest.raises(errors.InvalidInputError, match="inside a read transaction"):
            store.collection("t").insert(keys)
    assert len(store.collection("t")) == 9


@pytest.mark.slow
def test_concurrent_imports_of_a_new_collection_both_succeed(db_url, tmp_path, keys_file):
    Store(db_url).close()  # the database exists; the collection does not
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [run_worker("race", db_url, str(keys_file), str(barrier), "2") for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "BARRIER" in out  # both had seen "c" missing and reached their write together
        reports.append(json.loads(out.splitlines()[-1]))
    assert sorted(r["created"] for r in reports) == [False, True]
    assert sorted(r["first_id"] for r in reports) == [0, 50]
    with Store(db_url) as store:
        coll = store.collection("c")
        assert len(coll) == 100 and coll.stats()["inserts"] == 100
        np.testing.assert_array_equal(coll.export_rows().keys[50:], np.load(keys_file))


@pytest.mark.slow
def test_a_kill_between_create_and_insert_leaves_nothing(db_url, keys_file):
    Store(db_url).close()
    proc = run_worker("kill", db_url, str(keys_file))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err
    assert "KILLING" in out  # it died inside the import, with the collection already created
    with Store(db_url) as store:
        assert not store.has_collection("c")
        assert store.list_collections() == []
        coll, ids, created = store.import_rows("c", np.load(keys_file))  # the name is free
        assert created and ids.tolist() == list(range(50))
    if db_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
