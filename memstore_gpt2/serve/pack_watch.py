"""A running server follows the knowledge packs of its database without a restart.

Between decoding steps (never during one; the scheduler thread calls it, as it calls the memory
refresher) :class:`PackWatcher` reads each finished pack's version (a digest of its manifest and
parts: one small query, no blob) and, when the packs the server should serve changed, builds the
new ones and swaps the attachment: a pack learnt or imported again under its name is served in
its new version, a dropped one stops being served, and with ``--all-packs`` a pack learnt or
imported after the start joins. Under a ``--memory-budget`` in bytes, ``--all-packs`` gives the
student's own tables what they took when it loaded (they are not resized while it serves) and
splits the rest over the packs at every swap; a pack with no room left is refused. Swapping
between steps is safe for the sequences in flight: a pack never changes the student's own
stream (the KV cache holds only the student's keys and values); it mixes in at the head, so
the next token simply reads the new packs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memstore_gpt2.serve.refresh import (
    REFRESH_INTERVAL_S,
    CheckClock,
    CommitProbe,
    count_failure,
)


@dataclass
class PackWatchStats:
    """Counters for ``/metrics``: checks made, swaps of the served packs, checks or swaps that
    failed (the server keeps the packs it has and tries again at the next check)."""

    checks: int = 0
    swaps: int = 0
    failures: int = 0
    last_error: str | None = None


class PackWatcher:
    """Keeps ``loaded``'s attached packs at the database's versions of ``names`` (None: every
    finished pack of the database). One thread: the one that runs the model."""

    def __init__(self, loaded, student_dir: str, names: Sequence[str] | None, memory_budget=None,
                 *, interval: float = REFRESH_INTERVAL_S) -> None:  # fmt: skip
        from memstore_gpt2.packs.attach import student_fingerprint
        from memstore_gpt2.packs.storage import finished_pack_versions

        self.loaded = loaded
        self.names = None if names is None else tuple(names)
        self.memory_budget = memory_budget
        self.fingerprint = student_fingerprint(student_dir)
        self.clock = CheckClock(interval, CommitProbe(loaded.store.url))
        self.stats = PackWatchStats()
        held = finished_pack_versions(loaded.store)
        self.served = {n: held.get(n) for n in loaded.pack_names}
        #: Versions of packs that cannot be served here (they do not fit this student).
        self.refused: dict[str, str] = {}

    def close(self) -> None:
        self.clock.close()

    def check(self, admitting: bool = False) -> bool:
        """Swap in the packs that changed since the last check; True when the served packs
        changed. Without ``admitting``, only when its clock's interval has passed. Never raises."""
        if not self.clock.due(admitting):
            return False
        self.stats.checks += 1
        try:
            return self._swap_if_changed()
        except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable for a moment
            count_failure(self.stats, exc, self.clock)
            return False

    def _swap_if_changed(self) -> bool:
        from memstore_gpt2.errors import PackError
        from memstore_gpt2.packs.attach import attach, build_pack, check_fits
        from memstore_gpt2.packs.storage import finished_pack_versions, read_pack
        from memstore_gpt2.student import budget_split, packs_split_after_student

        versions = finished_pack_versions(self.loaded.store)
        wanted = sorted(versions) if self.names is None else [n for n in self.names
                                                               if n in versions]  # fmt: skip
        wanted = [n for n in wanted if self.refused.get(n) != versions[n]]
        target = {n: versions[n] for n in wanted}
        if target == self.served:
            return False
        model, store, manifest = self.loaded.model, self.loaded.store, self.loaded.manifest

        def refuse(name: str, exc: PackError) -> None:
            """Not served in this version (retried when the pack is learnt or imported again)."""
            self.refused[name] = versions[name]
            self.stats.failures += 1
            self.stats.last_error = str(exc)
            target.pop(name)

        # --all-packs under bytes: the student keeps what it took alone, the packs share the rest
        share_the_rest = self.names is None and getattr(self.memory_budget, "bytes", None)
        records = []
        for name in wanted:
            try:
                record = read_pack(store, name)
                check_fits(record, model, self.fingerprint)
                if share_the_rest:  # the packs before it in name order keep their room
                    packs_split_after_student(manifest, self.memory_budget, [*records, record])
            except PackError as exc:  # e.g. learnt for another student: never served
                refuse(name, exc)
                continue
            records.append(record)
        if target == self.served:  # what changed was only refused: nothing to swap
            return False
        if share_the_rest:
            cache_rows = packs_split_after_student(manifest, self.memory_budget, records)
        else:
            _, cache_rows = budget_split(manifest, self.memory_budget, records)
        built = [build_pack(r, store, cache_rows.get(r.name)) for r in records]
        if self.loaded.packs is not None:  # everything new is built: now swap
            self.loaded.packs.detach()
        self.loaded.packs = attach(model, built)
        self.served = target
        self.stats.swaps += 1
        return True
