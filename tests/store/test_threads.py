"""One Store shared by several threads: nothing crashes, no row, hit or counter is lost.

An in-memory SQLite database is a single connection shared by every thread; before the Store
serialised its transactions, five threads crashed the process (segfaults, glibc aborts) or lost rows
("cannot start a transaction within a transaction") in 10 runs of 10. File databases (a connection
per working thread) and PostgreSQL (its pool) are checked the same way.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from memstore import Store

THREADS, BATCHES, ROWS, QUERIES, K = 5, 30, 3, 2, 2


def hammer(store: Store) -> list[np.ndarray]:
    """THREADS threads each insert BATCHES batches and run a touching search after each."""
    coll = store.create_collection("c", key_dim=8)
    ids: list[list[np.ndarray]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            start.wait()
            for _ in range(BATCHES):
                ids[t].append(coll.insert(rng.standard_normal((ROWS, 8)).astype(np.float32)))
                coll.search(rng.standard_normal((QUERIES, 8)).astype(np.float32), K)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [np.concatenate(mine) for mine in ids]


def check_exact(store: Store, ids: list[np.ndarray]) -> None:
    total = THREADS * BATCHES * ROWS
    every = np.sort(np.concatenate(ids))
    assert every.tolist() == list(range(total))  # each id handed out once, none skipped
    coll = store.collection("c")
    rows = coll.export_rows()
    stats = coll.stats()
    assert len(rows) == total and rows.ids.tolist() == list(range(total))
    assert stats["inserts"] == total
    assert stats["searches"] == THREADS * BATCHES == stats["clock"]
    assert int(rows.hits.sum()) == THREADS * BATCHES * QUERIES * K  # no hit lost
    with store.read() as conn:
        assert len(store.backend.index_ids(conn, coll.spec)) == total


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_threads_share_an_in_memory_store(url):
    with Store(url) as store:
        check_exact(store, hammer(store))


def test_threads_share_a_file_or_server_store(store):
    """``store`` is a SQLite file, then a PostgreSQL database (tests/store/conftest.py)."""
    check_exact(store, hammer(store))


def test_in_memory_transactions_take_turns():
    """A thread's open transaction on the shared in-memory connection is never joined by another
    thread: the other waits for the commit, then sees all of it."""
    with Store("sqlite://") as store:
        coll = store.create_collection("c", key_dim=2)
        seen: list[int] = []
        other = threading.Thread(target=lambda: seen.append(len(coll)))
        with store.transaction():
            coll.insert(np.ones((4, 2), np.float32))
            other.start()
            other.join(timeout=0.5)
            assert seen == []  # it cannot have run inside this transaction
        other.join()
        assert seen == [4]


def test_file_threads_read_their_own_snapshot(tmp_path):
    """On a file, another thread reads in its own transaction: none of this one's rows yet."""
    with Store(tmp_path / "t.db") as store:
        coll = store.create_collection("c", key_dim=2)
        seen: list[int] = []
        with store.transaction():
            coll.insert(np.ones((4, 2), np.float32))
            other = threading.Thread(target=lambda: seen.append(len(coll)))
            other.start()
            other.join()
        assert seen == [0] and len(coll) == 4
