"""Keeping a running server's memory equal to the database: edits reach it without a restart.

Several ``memstore serve`` processes may hold one memory (PostgreSQL, or one SQLite file). An edit
(``memstore edit``, the Mindset UI, a pack written) records which rows it changed in the same
transaction (:mod:`memstore_gpt2.memory_changes`). Each server's scheduler thread asks between two
decoding steps -- never during one -- whether a collection's version moved, and if so its layers
read exactly the changed rows again (:meth:`~memstore_torch.memory_layer.MemoryLayer.refresh_rows`):
a resident layer overwrites or drops those rows, a paged one drops them from its cache so the next
read fetches them; a change of "any row" reloads the collection.

When it asks: before admitting a new request, always (so a request sent after an edit committed is
answered wholly by the edited memory), and otherwise at most every :data:`REFRESH_INTERVAL_S`
seconds, while sequences decode or the server idles. On SQLite, a :class:`CommitProbe` lets the
check before a request skip reading the versions when nothing was committed since its last look.
A sequence already decoding sees the edit from its next token on; the positions it had already
run keep what they computed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import typed_first_line
from memstore_gpt2.memory_changes import ChangeFeed, versions

#: Longest time between two checks while no request arrives (one small query each).
REFRESH_INTERVAL_S = 0.5


class CommitProbe:
    """Whether anything was committed to the memory's database since the last look, for the
    check before new requests join: on SQLite one ``PRAGMA data_version`` on a read-only
    connection of its own (it moves whenever another connection commits; microseconds, where
    reading the pack and change versions takes a millisecond); on other databases it always
    answers yes, so the versions are read as before."""

    def __init__(self, url) -> None:
        self._conn: sqlite3.Connection | None = None
        self._seen: int | None = None
        path = url.database if url.get_backend_name() == "sqlite" else None
        if path and path != ":memory:" and Path(path).is_file():
            uri = Path(path).resolve().as_uri() + "?mode=ro"
            try:
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            except sqlite3.Error:  # the versions are read every time instead
                self._conn = None

    def moved(self) -> bool:
        """True unless the database is known unchanged since the last call that said True."""
        if self._conn is None:
            return True
        try:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return True
        if version == self._seen:
            return False
        self._seen = version
        return True

    def forget(self) -> None:
        """Say True next time (a check failed: what it missed is read again at the next one)."""
        self._seen = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class CheckClock:
    """When a check between two decoding steps runs: before new requests are admitted (so they
    see every change committed before they arrived) unless ``probe`` knows nothing was committed
    since, otherwise at most once per ``interval`` seconds. The memory refresher and the pack
    watcher keep one each."""

    def __init__(self, interval: float = REFRESH_INTERVAL_S, probe: CommitProbe | None = None
                 ) -> None:  # fmt: skip
        self.interval = float(interval)
        self.probe = probe
        self._due = 0.0

    def due(self, admitting: bool) -> bool:
        """Whether to check now; a check that runs starts the next interval."""
        now = time.monotonic()
        if admitting:
            if self.probe is not None and not self.probe.moved():
                return False  # nothing committed since the last check before a request
        elif now < self._due:
            return False
        self._due = now + self.interval
        return True

    def forget(self) -> None:
        """The check failed: the next one before a request runs whatever the probe says."""
        if self.probe is not None:
            self.probe.forget()

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def count_failure(stats, exc: BaseException, clock: CheckClock) -> None:
    """A check that failed (the server goes on and tries again at the next, before the next
    request at the latest): counted in ``stats.failures``, its one-line reason in
    ``stats.last_error``."""
    clock.forget()
    stats.failures += 1
    stats.last_error = typed_first_line(exc)


@dataclass
class RefreshStats:
    """Counters for ``/metrics``: checks made, collection versions applied (``refreshes``), rows
    read again or dropped from a cache, whole collections reloaded, checks or refreshes that
    failed (the server keeps serving and tries again at the next check)."""

    checks: int = 0
    refreshes: int = 0
    rows: int = 0
    reloads: int = 0
    failures: int = 0
    last_error: str | None = None


def versions_before_load(student_dir: str | os.PathLike, db: str | None) -> dict[str, int] | None:
    """The change versions of a student's database, read before its rows are loaded (so an edit
    committed during the load is applied afterwards instead of missed); None for a directory
    that is not a student, or when the database cannot be read (the load then says why)."""
    from memstore import Store
    from memstore_gpt2.student import STUDENT_FILE, read_manifest, resolve_db_url

    if not (Path(student_dir) / STUDENT_FILE).is_file():
        return None
    try:
        url = resolve_db_url(student_dir, read_manifest(student_dir), db)
        with Store(url, create=False) as store, store.read() as conn:
            return versions(conn)
    except Exception:  # noqa: BLE001 - the load reports a broken student or database
        return None


class MemoryRefresher:
    """Applies recorded changes of ``store`` to the memory layers of ``model`` (one thread: the
    one that runs the model)."""

    def __init__(self, model, store, *, known: dict[str, int] | None = None,
                 interval: float = REFRESH_INTERVAL_S) -> None:  # fmt: skip
        self.layers: dict[str, list] = {}
        self.rebind(model)
        self.feed = ChangeFeed(store, known)
        self.clock = CheckClock(interval, CommitProbe(store.url))
        self.stats = RefreshStats()

    def close(self) -> None:
        self.clock.close()

    def rebind(self, model) -> None:
        """Find ``model``'s memory layers again (its knowledge packs were swapped)."""
        from memstore_torch.model_memory import memory_layers

        layers: dict[str, list] = {}
        for layer in memory_layers(model).values():
            if layer.collection is not None:
                layers.setdefault(layer.collection_name, []).append(layer)
        self.layers = layers

    def check(self, admitting: bool = False) -> int:
        """Apply every change committed since the last check; returns the collections refreshed.
        Without ``admitting`` (no new request waits), only when its clock's interval has passed.
        Never raises: a failure is counted and retried at the next check."""
        if not self.clock.due(admitting):
            return 0
        self.stats.checks += 1
        try:
            changes = self.feed.poll()
        except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable for a moment
            count_failure(self.stats, exc, self.clock)
            return 0
        done = 0
        for change in changes:
            layers = self.layers.get(change.collection, [])
            try:
                rows = sum(layer.refresh_rows(change.ids) for layer in layers)
            except Exception as exc:  # noqa: BLE001 - retried: refreshing a row twice is harmless
                count_failure(self.stats, exc, self.clock)
                continue
            self.feed.applied(change)
            if layers:
                done += 1
                self.stats.refreshes += 1
                self.stats.rows += rows
                self.stats.reloads += change.ids is None
        return done
