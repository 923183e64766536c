"""Who writes a student's memory database right now: a training run or an edit, never both.

A training run keeps every memory row resident and writes its copy back at each checkpoint and at
the end, so a row deleted or changed in the database meanwhile would silently come back with the
next flush. Both sides therefore take the same exclusive, non-blocking advisory lock
(``fcntl.flock``) on a small file beside the database for as long as they write: whoever comes
second gets a one-line :class:`~memstore_gpt2.errors.DatabaseInUseError` naming the holder. Readers
(``memstore trace``, ``inspect``, the Mindset UI showing rows) take no lock: the database stays
readable while a run trains (SQLite WAL, or PostgreSQL).

The operating system drops the lock when its process ends, however it ends, so a killed run never
leaves a stale lock behind. The lock file itself stays (it only names the last holder).
Where ``fcntl`` does not exist (Windows), or the lock file cannot be made (a directory that is
missing or not writable, where the database write then fails on its own), no lock is taken.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from memstore_gpt2.errors import DatabaseInUseError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".writer-lock"
DIRECTORY_LOCK = "memstore" + LOCK_SUFFIX


def lock_path(db_url: str, student_dir: str | os.PathLike) -> Path:
    """The lock file of a database: beside a SQLite file (so every student directory sharing that
    file shares the lock), else in the student directory (a server database has no file here)."""
    prefix = "sqlite:///"
    if db_url.startswith(prefix) and db_url[len(prefix) :] not in ("", ":memory:"):
        path = Path(db_url[len(prefix) :].split("?", 1)[0])
        return path.with_name(path.name + LOCK_SUFFIX)
    return Path(student_dir) / DIRECTORY_LOCK


class DatabaseWriter:
    """The held lock; :meth:`release` (or leaving its ``with`` block) lets others write again."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder
        self._fd: int | None = None

    def acquire(self) -> DatabaseWriter:
        if fcntl is None:  # pragma: no cover - Windows
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # no directory, or not writable: the database write decides on its own
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUseError(_held_message(self.path, self.holder)) from None
        except BaseException:
            os.close(fd)
            raise
        record = {"holder": self.holder, "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_database(db_url: str, student_dir: str | os.PathLike, holder: str) -> DatabaseWriter:
    """Take the write lock of ``db_url`` for ``holder`` (``"training"`` or ``"edit"``), or raise
    :class:`DatabaseInUseError` at once if someone else holds it. Use as a context manager or call
    :meth:`DatabaseWriter.release`."""
    return DatabaseWriter(lock_path(db_url, student_dir), holder).acquire()


_HOLDERS = {"training": "a training run", "edit": "an edit"}


def _held_message(path: Path, wanted: str) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        record = {}
    holder, pid = record.get("holder"), record.get("pid")
    who = _HOLDERS.get(holder, "another process")
    if pid:
        who += f" (pid {pid})"
    database = path.name[: -len(LOCK_SUFFIX)] if path.name != DIRECTORY_LOCK else "the database"
    if wanted == "edit" and holder == "training":
        return (
            f"{database} is held by {who}: an edit now would be overwritten by its next "
            "checkpoint; wait until the run has finished (or stop it), then edit"
        )
    return f"{database} is held by {who}; try again when it has finished"
