"""One writer at a time for a database that a long-lived process keeps a copy of.

A distillation run keeps every memory row resident and writes its copy back at each checkpoint and
at the end, so a row deleted or changed in the database meanwhile (an edit, ``memstore prune``,
``memstore import``) would silently come back -- or, for a prune, leave the run's rows and counters
disagreeing with the table. Every such writer therefore takes the same exclusive, non-blocking
advisory lock (``fcntl.flock``) on a small file beside the database for as long as it writes:
whoever comes second gets a one-line :class:`~memstore.errors.DatabaseInUseError` naming the
holder (its kind, pid and, for a run, its student directory). Readers take no lock.

It lives in the store package (no torch, no GPT-2) so that the store's own CLI commands and the
application share one mechanism. The operating system drops the lock when its process ends,
however it ends, so a killed run never leaves a stale lock. Where ``fcntl`` does not exist
(Windows), or the lock file cannot be made (a directory that is missing or not writable, where the
database write then fails on its own), no lock is taken.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from memstore.errors import DatabaseInUseError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".writer-lock"
DIRECTORY_LOCK = "memstore" + LOCK_SUFFIX
_SQLITE_PREFIX = "sqlite:///"


def sqlite_lock_path(db_url: str) -> Path | None:
    """The lock file beside a SQLite database file (every user of that file shares it), or None
    for a database without a file here (in memory, a server)."""
    if db_url.startswith(_SQLITE_PREFIX):
        path = db_url[len(_SQLITE_PREFIX) :].split("?", 1)[0]
        if path not in ("", ":memory:"):
            return Path(path).with_name(Path(path).name + LOCK_SUFFIX)
    return None


class DatabaseWriter:
    """The held lock; :meth:`release` (or leaving its ``with`` block) lets others write again.
    Exclusive (a run, an edit), or ``shared`` among the store commands.

    ``details`` are recorded in the lock file for the message a refused writer prints (a run
    records its student directory). With ``remove=True`` a lock file this writer created is
    deleted again on release, so a store command leaves nothing beside a plain database; acquiring
    checks that the file it locked is still the one at ``path``, so such a removal can never let
    two writers hold the lock at once.
    """

    def __init__(
        self,
        path: Path,
        holder: str,
        *,
        details: dict | None = None,
        remove: bool = False,
        shared: bool = False,
    ) -> None:
        self.path, self.holder = Path(path), holder
        self.details = dict(details or {})
        self.remove, self.shared = remove, shared
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> DatabaseWriter:
        if fcntl is None:  # pragma: no cover - Windows
            return self
        while True:
            created = not self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # no directory, or not writable: the database write decides
                return self
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DatabaseInUseError(held_message(self.path, self.holder)) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # a writer that removed its file in between: lock the new file instead
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"holder": self.holder, "pid": os.getpid(), "since": time.time(), **self.details}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd, self._created = fd, created
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self.remove and self._created:
                try:  # only while nobody else holds it (a shared holder may): then remove it
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.path.unlink()
                except OSError:  # BlockingIOError included: another holder keeps the file
                    pass
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_database_file(db_url: str, holder: str) -> DatabaseWriter | None:
    """The store commands' side: lock a SQLite database file for ``holder`` (``"prune"``,
    ``"import"``, ``"upgrade"``) or raise :class:`DatabaseInUseError` at once if a training run or
    an edit holds it; None for a database without a file (no lock to share there). The lock is
    shared: store commands may run together (the store's own transactions order their writes, and
    two imports of one new collection both succeed), but never beside a run or an edit, which
    lock exclusively. A lock file this creates is removed on release when nobody else holds it."""
    path = sqlite_lock_path(db_url)
    if path is None:
        return None
    return DatabaseWriter(path, holder, remove=True, shared=True).acquire()


_HOLDERS = {
    "training": "a training run",
    "edit": "an edit",
    "prune": "memstore prune",
    "import": "memstore import",
    "upgrade": "memstore upgrade",
}
#: what a refused writer would have done, and the verb it is told to retry with
_UNDONE = {
    "edit": ("an edit", "edit"),
    "prune": ("a prune", "prune"),
    "import": ("an import", "import"),
    "upgrade": ("an upgrade", "upgrade"),
}


def held_message(path: Path, wanted: str) -> str:
    """The one line a refused writer (``wanted``) prints: who holds ``path`` and what to do."""
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    holder, pid, student = record.get("holder"), record.get("pid"), record.get("student")
    who = _HOLDERS.get(holder, "another process")
    if pid:
        who += f" (pid {pid})"
    if student:
        who += f" of {student}"
    database = path.name[: -len(LOCK_SUFFIX)] if path.name != DIRECTORY_LOCK else "the database"
    if holder == "training" and wanted in _UNDONE:
        what, verb = _UNDONE[wanted]
        return (
            f"{database} is held by {who}: {what} now would be overwritten by its next "
            f"checkpoint; wait until the run has finished (or stop it), then {verb}"
        )
    return f"{database} is held by {who}; try again when it has finished"
