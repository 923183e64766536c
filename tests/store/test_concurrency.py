"""Crash safety and concurrent access on a real file: a writer killed with SIGKILL in the middle of a
large batch, and `memstore inspect` reading while another process writes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from memstore import Store

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from memstore import Store, sqlite_driver
    url, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(url)
    coll = store.collection("c")
    keys = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)
    if mode == "one-batch":
        # Signal when the batch's transaction is open, so the parent kills it mid-batch.
        from sqlalchemy import event
        @event.listens_for(store.engine, "begin")
        def started(conn):
            print("BEGUN", flush=True)
        coll.insert(keys)
        print("COMMITTED", flush=True)
    else:  # many small committed batches (reader test, concurrent writers test)
        print("BEGUN", flush=True)
        got = []
        for i in range(0, rows, 500):
            got.extend(coll.insert(keys[i : i + 500]).tolist())
            coll.search(keys[i : i + 2], 3)  # touches: writes to the LRFU log and the clock
        print("IDS", " ".join(map(str, got)), flush=True)
        print("COMMITTED", flush=True)
    """
)


@pytest.fixture
def writer_script(tmp_path):
    path = tmp_path / "writer.py"
    path.write_text(WRITER)
    return path


def start_writer(script, url, mode, rows):
    return subprocess.Popen(
        [sys.executable, str(script), url, mode, str(rows)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc, word, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read()}")
    raise AssertionError(f"writer never printed {word}")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.4])
def test_sigkill_mid_batch_leaves_all_or_nothing(tmp_path, writer_script, delay):
    path = tmp_path / "crash.db"
    url = f"sqlite:///{path}"
    with Store(url) as store:
        store.create_collection("c", key_dim=16).insert(np.ones((7, 16), np.float32))
    rows = 300_000  # several bulk statements in one transaction; seconds to write
    proc = start_writer(writer_script, url, "one-batch", rows)
    wait_for(proc, "BEGUN")
    time.sleep(delay)
    assert proc.poll() is None, "the batch finished before the kill; make it larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)  # plain SQLite: does the file itself hold up?
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with Store(url) as store:
        coll = store.collection("c")
        n = len(coll)
        assert n in (7, 7 + rows)
        assert n == 7, "killed while the writer was still inside its batch"
        stats = coll.stats()
        assert stats["inserts"] == 7 and stats["next_id"] == 7
        with store.read() as c:
            assert len(store.backend.index_ids(c, coll.spec)) == n
        assert coll.insert(np.zeros((1, 16), np.float32)).tolist() == [7]


@pytest.mark.slow
def test_inspect_reads_while_a_writer_writes(tmp_path, writer_script):
    from click.testing import CliRunner

    from cli import main

    path = tmp_path / "busy.db"
    url = f"sqlite:///{path}"
    with Store(url) as store:
        store.create_collection("c", key_dim=16)
    proc = start_writer(writer_script, url, "many-batches", 60_000)
    wait_for(proc, "BEGUN")
    seen = []
    try:
        runner = CliRunner()
        while proc.poll() is None and len(seen) < 20:
            out = runner.invoke(main, ["inspect", url, "c", "--json"])
            assert out.exit_code == 0, out.output
            seen.append(json.loads(out.output)["rows"])
            time.sleep(0.05)
    finally:
        _, err = proc.communicate(timeout=180)  # drains stdout (the writer prints its ids)
    assert proc.returncode == 0, err
    assert len(seen) >= 2
    assert all(n % 500 == 0 for n in seen)  # every read is a consistent snapshot between batches
    assert seen == sorted(seen) and any(0 < n < 60_000 for n in seen)


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path, writer_script):
    """Two processes inserting and searching at once: every id unique, every row and hit kept."""
    path = tmp_path / "two.db"
    url = f"sqlite:///{path}"
    with Store(url) as store:
        store.create_collection("c", key_dim=16)
    procs = [start_writer(writer_script, url, "many-batches", 10_000) for _ in range(2)]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        line = next(line for line in out.splitlines() if line.startswith("IDS"))
        ids.extend(int(x) for x in line.split()[1:])
    assert sorted(ids) == list(range(20_000))
    with Store(url) as store:
        coll = store.collection("c")
        stats = coll.stats()
        assert len(coll) == 20_000 and stats["inserts"] == 20_000
        assert stats["searches"] == 40 and stats["clock"] == 40
        assert int(coll.export_rows().hits.sum()) == 40 * 2 * 3
        with store.read() as conn:
            assert len(store.backend.index_ids(conn, coll.spec)) == 20_000
