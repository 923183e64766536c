"""Who writes a student's memory database right now: a training run or an edit, never both.

A training run keeps every memory row resident and writes its copy back at each checkpoint and at
the end, so a row deleted or changed in the database meanwhile would silently come back with the
next flush. Both sides (and the store commands that write: ``memstore prune``, ``import``,
``upgrade``) therefore take the same exclusive, non-blocking advisory lock on a small file beside
the database for as long as they write; the mechanism is :mod:`memstore.writer_lock` (in the store
package, so the store's CLI can use it without torch). Whoever comes second gets a one-line
:class:`~memstore.errors.DatabaseInUseError` naming the holder. Readers (``memstore trace``,
``inspect``, the Mindset UI showing rows) take no lock: the database stays readable while a run
trains (SQLite WAL, or PostgreSQL).

The operating system drops the lock when its process ends, however it ends, so a killed run never
leaves a stale lock behind. The lock file of a killed or interrupted run stays (it only names the
last holder); a finished run removes it (:func:`release_writer`), so a finished student directory
holds nothing but the student.
"""

from __future__ import annotations

import os
from pathlib import Path

from memstore.writer_lock import (
    DIRECTORY_LOCK,
    LOCK_SUFFIX,
    DatabaseWriter,
    sqlite_lock_path,
)

__all__ = [
    "DIRECTORY_LOCK", "LOCK_SUFFIX", "DatabaseWriter", "hold_database", "lock_path",
    "release_writer",
]  # fmt: skip


def lock_path(db_url: str, student_dir: str | os.PathLike) -> Path:
    """The lock file of a database: beside a SQLite file (so every student directory sharing that
    file shares the lock, and the store commands find it from the URL alone), else in the student
    directory (a server database has no file here)."""
    return sqlite_lock_path(db_url) or Path(student_dir) / DIRECTORY_LOCK


def hold_database(db_url: str, student_dir: str | os.PathLike, holder: str) -> DatabaseWriter:
    """Take the write lock of ``db_url`` for ``holder`` (``"training"`` or ``"edit"``), or raise
    :class:`DatabaseInUseError` at once if someone else holds it. Use as a context manager or call
    :meth:`DatabaseWriter.release`. A training run records its student directory, so whoever is
    refused is told which run to wait for."""
    details = {"student": str(student_dir)} if holder == "training" else None
    return DatabaseWriter(lock_path(db_url, student_dir), holder, details=details).acquire()


def release_writer(writer: DatabaseWriter, *, remove_file: bool = False) -> None:
    """Drop ``writer``'s lock; with ``remove_file``, delete the lock file first, while still
    holding the lock (a writer that opened the old file is refused, one that comes later makes a
    new file: :meth:`DatabaseWriter.acquire` checks that the file it locked is still there)."""
    if remove_file:
        try:
            writer.path.unlink()
        except OSError:
            pass
    writer.release()
