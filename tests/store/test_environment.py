"""What the machine does to the store: a full disk is reported as such (and the failed call writes
nothing), and a database in a directory we may not write to can still be inspected."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from memstore import Store, errors
from memstore.backends import sqlite as sqlite_backend
from memstore.backends.postgres import PostgresBackend

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ disk full
def test_a_full_database_is_reported_as_disk_full_and_writes_nothing(tmp_path, rng):
    """``PRAGMA max_page_count`` makes SQLite fail exactly as a full file system does
    (SQLITE_FULL) without filling a real disk."""
    store = Store(tmp_path / "full.db")
    coll = store.create_collection("c", key_dim=64)
    coll.insert(rng.standard_normal((10, 64)).astype(np.float32))
    with store.read() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    @sa.event.listens_for(store.engine, "connect")
    def cap(dbapi_connection, _record) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 2}")

    store.engine.dispose()  # every connection from now on has the cap
    with pytest.raises(errors.DiskFullError, match="disk full") as info:
        coll.insert(rng.standard_normal((5000, 64)).astype(np.float32))
    assert "out of memory" not in str(info.value)
    assert isinstance(info.value, errors.DatabaseError)
    assert len(coll) == 10 and coll.stats()["inserts"] == 10
    store.close()


Usage = namedtuple("Usage", "total used free")


def fake_sqlite_error(code: int, message: str) -> Exception:
    error = Exception(message)
    error.sqlite_errorcode = code
    return error


def test_an_io_error_on_a_full_file_system_counts_as_disk_full(tmp_path, monkeypatch):
    """A ``-wal``/``-shm`` file that cannot grow surfaces as "disk I/O error" (SQLITE_IOERR_*),
    not SQLITE_FULL: disk full when the file system really has no room left."""
    with Store(tmp_path / "io.db") as store:
        backend = store.backend
        shm_size = fake_sqlite_error(10 | (19 << 8), "disk I/O error")  # SQLITE_IOERR_SHMSIZE
        monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**9, 10**9, 0))
        assert backend.disk_full(shm_size)
        assert backend.disk_full(fake_sqlite_error(13, "database or disk is full"))
        monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**9, 0, 10**9))
        assert not backend.disk_full(shm_size)  # an I/O error with room to spare is not
        assert not backend.disk_full(fake_sqlite_error(1, "no such table: x"))
    pg_full = type("DiskFull", (Exception,), {"sqlstate": "53100"})("could not extend file")
    assert PostgresBackend.disk_full(None, pg_full)
    assert not PostgresBackend.disk_full(None, Exception("syntax error"))


# ---------------------------------------------------------------------------- read-only folders
def _drop_root_file_powers() -> None:
    """In the child: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (root ignores file modes
    with them), so that a chmod-ed directory binds as it does for every other user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(args: list[str], probe_dir: Path) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` as a user to whom ``probe_dir`` (mode 555) is read-only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    preexec = _drop_root_file_powers if os.geteuid() == 0 else None
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(probe_dir / 'probe')!r}, 'w')"],
        preexec_fn=preexec,
        capture_output=True,
    )
    if probe.returncode == 0:
        os.remove(probe_dir / "probe")
        pytest.skip("cannot make a directory read-only here (root keeps its file powers)")
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.fixture
def locked_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    yield folder
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(folder / name, 0o644)


def test_inspect_reads_a_database_in_a_read_only_directory(locked_dir):
    path = locked_dir / "m.db"
    with Store(path) as store:  # closed cleanly: no -wal / -shm left
        store.create_collection("c", key_dim=4).insert(np.ones((3, 4), np.float32))
    os.chmod(locked_dir, 0o555)
    out = run_unprivileged(["inspect", str(path), "c", "--json"], locked_dir)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 3
    assert os.listdir(locked_dir) == ["m.db"]  # nothing was written next to it


def test_inspect_reads_a_live_database_in_a_read_only_directory(locked_dir):
    """A writer (with the directory's owner's rights) holds the database open, with committed
    rows still only in its -wal: the read-only reader sees them."""
    path = locked_dir / "m.db"
    writer = Store(path)
    try:
        coll = writer.create_collection("c", key_dim=4)
        coll.insert(np.ones((3, 4), np.float32))
        assert os.path.getsize(str(path) + "-wal") > 0
        for name in os.listdir(locked_dir):
            os.chmod(locked_dir / name, 0o444)
        os.chmod(locked_dir, 0o555)
        out = run_unprivileged(["inspect", str(path), "c", "--json"], locked_dir)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["rows"] == 3
        coll.insert(np.ones((2, 4), np.float32))
        out = run_unprivileged(["inspect", str(path), "c", "--json"], locked_dir)
        assert json.loads(out.stdout)["rows"] == 5
    finally:
        writer.close()


def test_read_only_uri_choice(tmp_path, monkeypatch):
    """How a read-only open is made, by what lies next to the database (see read_only_uri)."""
    path = tmp_path / "m.db"
    path.write_bytes(b"")
    assert sqlite_backend.read_only_uri(str(path)).endswith("?mode=ro")  # writable folder
    monkeypatch.setattr(os, "access", lambda *_: False)  # a folder we may not write to
    assert sqlite_backend.read_only_uri(str(path)).endswith("?mode=ro&immutable=1")
    Path(str(path) + "-wal").write_bytes(b"")
    assert sqlite_backend.read_only_uri(str(path)).endswith("&immutable=1")  # empty WAL: nothing
    Path(str(path) + "-shm").write_bytes(b"x")
    assert sqlite_backend.read_only_uri(str(path)).endswith("?mode=ro")  # a writer is around
    os.remove(str(path) + "-shm")
    Path(str(path) + "-wal").write_bytes(b"frames")
    with pytest.raises(errors.DatabaseError, match="non-empty -wal file but no -shm"):
        sqlite_backend.read_only_uri(str(path))
