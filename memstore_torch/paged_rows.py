"""PagedRows: a bounded cache of a collection's rows, so a memory can be larger than RAM.

A product-key memory searches its sub-keys (small, resident) and then reads a few thousand of its
millions of value rows per step. :class:`PagedRows` keeps only ``capacity`` rows in memory and
reads the missing ones from the database by id, **one batched query per call** (``Collection.get``:
``json_each`` in SQLite, ``= ANY`` in PostgreSQL), never a query per row. It stands in for the
layer's :class:`~memstore_torch.resident.ResidentIndex`: the same per-row fields (value, key,
``crf``, ``last_tick``, ``hits``, ``created_tick``), the same LRFU touches (:mod:`.lrfu`), the same
flush -- only a row's *slot* (its place in the cache tensors) is no longer its row number, so the
layer reads ``values[slots]`` where a resident layer reads ``values[rows]``.

Which rows stay is decided by LRFU, the store's own eviction policy, over the cache's accesses: each
:meth:`fetch` is one tick and each read of a row counts. (The rows' stored LRFU fields cannot serve
here: evaluation and generation read rows without touching them.) Rows read by a forward that may
still receive a gradient are *pinned* until an optimizer holding the values steps (or
:meth:`PagedRows.unpin_all`), so the backward pass and the optimizer step always find a row where
the forward read it.

Writes. A row the optimizer changed is *dirty*; when it must leave the cache it is written back
with ``Collection.apply_changes`` -- inside the write transaction the caller holds open from one
checkpoint to the next (``store.transaction()``), so those rows commit together with the checkpoint
and a process killed in between leaves the database exactly as of the last checkpoint. Writing
back outside such a transaction is refused (it would commit rows ahead of their checkpoint).
:meth:`flush` writes the dirty rows still cached, the clock and the counters: with the rows
already written back, the collection then equals what a fully resident layer would have flushed.

Prefetch. A layer knows which rows it will read once its search ran, before it reads them:
:meth:`PagedRows.prefetch` starts reading the missing ones in a worker thread (its own database
connection), and the next :meth:`fetch` of those rows installs them. A product-key memory inside a
:class:`~memstore_torch.grown.GrownMemory` computes the base layer meanwhile. The worker's
connection sees only committed rows, so rows this cache wrote back since the caller last
reported a commit (:meth:`committed`) are read by the caller's own connection instead. The layer
switch, ``ProductKeyMemory.prefetch``, is off by default (measured: docs/benchmarks.md, Paging).

Memory: the cache's tensors (``capacity`` slots of one value row, key and bookkeeping each,
:meth:`bytes_per_slot`) plus 5 bytes per table row -- the slot map and the "written back since
the last commit" flag: 5 MB for a million rows.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from memstore.errors import InvalidInputError, bad_parameter
from memstore.types import RowBlock

from . import lrfu
from .rows_source import PagedSource, row_block

#: Rows written per ``apply_changes`` call when a table is created through the cache.
CREATE_CHUNK = 65_536

#: Live caches, unpinned when an optimizer holding their values Parameter steps.
_LIVE: weakref.WeakSet[PagedRows] = weakref.WeakSet()
#: The handle of the process-wide hook (:func:`unpin_after_step`), registered by the first
#: :class:`PagedRows` made in the process; ``OPTIMIZER_HOOK.remove()`` would take it off again.
OPTIMIZER_HOOK = None


def unpin_after_step(optimizer: torch.optim.Optimizer, args=(), kwargs=None) -> None:
    """The process-wide optimizer hook of paged memories: after ``optimizer.step()`` of *any*
    optimizer, every live cache whose values Parameter that optimizer holds unpins its rows.

    Why a hook, and a process-wide one: rows a forward read with gradient are pinned (they must
    stay where the backward and the step expect them), and only a step says that their gradient
    was consumed -- after one forward, or after several forwards of gradient accumulation, which
    is why it is the step and not the backward that unpins. Registering it with
    ``torch.optim.optimizer.register_optimizer_step_post_hook`` makes every optimizer, built
    anywhere, release the caches it steps without the training loop knowing about paging. A loop
    that steps the values some other way calls :meth:`PagedRows.unpin_all` itself."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for pager in list(_LIVE):
        if id(pager.value_storage) in held:
            pager.unpin_all()


def _watch(pager: PagedRows) -> None:
    global OPTIMIZER_HOOK
    if OPTIMIZER_HOOK is None:
        OPTIMIZER_HOOK = register_optimizer_step_post_hook(unpin_after_step)
    _LIVE.add(pager)


@dataclass
class Prefetch:
    """Rows being read ahead of a :meth:`PagedRows.fetch`: ``rows`` (sorted, distinct) and the
    future ``RowBlock`` of them."""

    rows: torch.Tensor
    block: Future


class PagedRows:
    """``capacity`` of the ``n_rows`` rows (ids ``1..n_rows``) of ``collection``, on ``device``.

    The paged :class:`~memstore_torch.row_table.RowTable` of a product-key memory. Making one
    registers :func:`unpin_after_step` as a process-wide optimizer step hook (once per process):
    any optimizer that steps the cache's values Parameter unpins its rows."""

    def __init__(
        self,
        collection: PagedSource | None,
        n_rows: int,
        capacity: int,
        *,
        key_dim: int,
        value_dim: int,
        lrfu_lambda: float,
        device: str | torch.device = "cpu",
    ) -> None:
        if capacity < 1:
            raise bad_parameter("memory_budget", f"leaves {capacity} cached rows; at least 1")
        self.collection = collection
        self.n_rows = int(n_rows)
        self.capacity = min(int(capacity), self.n_rows)
        self.key_dim, self.value_dim = key_dim, value_dim
        self.lrfu_lambda = float(lrfu_lambda)
        self.device = torch.device(device)
        self.clock = 0
        self.counters = {"inserts": 0, "recombinations": 0, "evictions": 0}
        self.stats = {
            "lookups": 0, "misses": 0, "queries": 0, "written_back": 0, "prefetched": 0
        }  # fmt: skip
        self.accesses = 0  # the cache's own LRFU clock: one tick per fetch
        c = self.capacity
        self.key_storage = torch.zeros((c, key_dim))
        self.value_storage = torch.zeros((c, value_dim))
        self._slot = torch.full((self.n_rows,), -1, dtype=torch.int32)  # row -> slot
        self._row = torch.full((c,), -1, dtype=torch.int64)  # slot -> row
        self._crf = torch.zeros(c, dtype=torch.float64)
        self._last_tick = torch.zeros(c, dtype=torch.int64)
        self._hits = torch.zeros(c, dtype=torch.int64)
        self._created_tick = torch.zeros(c, dtype=torch.int64)
        self._use_crf = torch.zeros(c, dtype=torch.float64)  # the cache policy's LRFU
        self._use_tick = torch.zeros(c, dtype=torch.int64)
        self._dirty = torch.zeros(c, dtype=torch.bool)
        self._pinned = torch.zeros(c, dtype=torch.bool)
        self._unsure = torch.zeros(self.n_rows, dtype=torch.bool)  # written back, maybe uncommitted
        self._reader: ThreadPoolExecutor | None = None
        self.relocate(self.device)
        _watch(self)

    _BOOKKEEPING = (
        "_slot",
        "_row",
        "_crf",
        "_last_tick",
        "_hits",
        "_created_tick",
        "_use_crf",
        "_use_tick",
        "_dirty",
        "_pinned",
        "_unsure",
    )

    @staticmethod
    def bytes_per_slot(key_dim: int, value_dim: int, value_bytes: int = 4) -> int:
        """Memory one cached row costs: its value and key, and 58 bytes of bookkeeping (row
        number, the four stored LRFU fields, the cache's two LRFU fields: 8 bytes each; dirty
        and pinned flags)."""
        return value_dim * value_bytes + key_dim * 4 + 8 * 7 + 2

    def relocate(self, device: str | torch.device) -> None:
        """Move the bookkeeping tensors to ``device`` (the storage tensors move with their
        owner, the layer, whose Parameters they are)."""
        self.device = torch.device(device)
        for name in self._BOOKKEEPING:
            setattr(self, name, getattr(self, name).to(self.device))

    # ------------------------------------------------------------------ views
    @property
    def n(self) -> int:
        """Slots in the cache tensors (what a slot-indexed count is sized by)."""
        return self.capacity

    @property
    def resident_rows(self) -> int:
        """Rows held in the cache now."""
        return int((self._row >= 0).sum())

    @property
    def fetch_limit(self) -> int:
        """The most rows one :meth:`fetch` of a chunk brings in: half the cache, so what other
        rows the caller holds (pinned, or the other half of a pair) still fits."""
        return max(1, self.capacity // 2)

    def describe(self) -> str:
        """What the layer's ``extra_repr`` adds: the cache size."""
        return f", cached_rows={self.capacity}"

    def bind_values(self, values: torch.nn.Parameter) -> None:
        """Rows of the values Parameter are cache slots, not table rows: RowwiseAdagrad keeps
        its state per table row through this map (``values.paged_rows``), so paging never
        changes what the optimizer computes."""
        values.paged_rows = self

    def holds_table(self, keys_of) -> bool:
        """True: :meth:`load_collection` checked the row count; rows are read (and a missing
        one refused) on demand."""
        return True

    def lrfu_state(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crf, last_tick)`` of cached ``slots``, as stored."""
        return self._crf[slots], self._last_tick[slots]

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Row numbers held by ``slots`` (-1 for an empty slot)."""
        return self._row[slots.to(self.device)]

    # ------------------------------------------------------------------ reading rows in
    def _check_rows(self, flat: torch.Tensor) -> None:
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.n_rows):
            raise InvalidInputError(f"row numbers must lie in [0, {self.n_rows})")

    @torch.no_grad()
    def prefetch(self, rows: torch.Tensor) -> Prefetch | None:
        """Start reading the rows of ``rows`` that are not cached (and were not written back
        since the last :meth:`committed`) in a worker thread; pass the result to :meth:`fetch`.
        None when there is nothing to read ahead or the store cannot read concurrently."""
        if not self.collection.store.concurrent_reads:
            return None
        flat = rows.reshape(-1).to(self.device)
        self._check_rows(flat)
        wanted = torch.unique(flat)
        ahead = wanted[(self._slot[wanted] < 0) & ~self._unsure[wanted]]
        if ahead.numel() == 0:
            return None
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="memstore-prefetch")
        ids = ahead.cpu().numpy().astype(np.int64) + 1
        self.stats["queries"] += 1
        return Prefetch(ahead, self._reader.submit(self.collection.get, ids))

    def committed(self) -> None:
        """The caller committed the transaction that holds this cache's write-backs: another
        connection (the prefetch worker's) now reads those rows as written."""
        self._unsure.zero_()

    @torch.no_grad()
    def fetch(
        self, rows: torch.Tensor, *, pin: bool = False, prefetched: Prefetch | None = None
    ) -> torch.Tensor:
        """Slots (int64, the shape of ``rows``) holding row numbers ``rows``; the missing rows
        are read in one query (or taken from ``prefetched``) after evicting as many others
        (lowest cache LRFU first; dirty ones written back). ``pin`` keeps them until
        :meth:`unpin_all` (a gradient may reach them)."""
        flat = rows.reshape(-1).to(self.device)
        if flat.numel() == 0:
            return flat.reshape(rows.shape)
        self._check_rows(flat)
        wanted, counts = torch.unique(flat, return_counts=True)  # sorted
        slots = self._slot[wanted].long()
        missing = wanted[slots < 0]
        self.stats["lookups"] += wanted.numel()
        if missing.numel():
            free = self._make_room(missing.numel(), keep=slots[slots >= 0])
            ahead = None
            if prefetched is not None:
                ahead = prefetched.rows[torch.isin(prefetched.rows, missing)]
                block = prefetched.block.result()  # rows of prefetched.rows, in that order
                if ahead.numel():
                    keep = torch.isin(prefetched.rows, ahead).cpu().numpy()
                    self._read_in(ahead, free[: ahead.numel()], block.take(np.flatnonzero(keep)))
                    self.stats["prefetched"] += ahead.numel()
                missing = missing[~torch.isin(missing, ahead)]
                free = free[ahead.numel() :]
            if missing.numel():
                self._read_in(missing, free)
            slots = self._slot[wanted].long()
        elif prefetched is not None:
            prefetched.block.result()  # surface a worker's error
        self.accesses += 1
        self._use_crf[slots], self._use_tick[slots] = lrfu.touched(
            self._use_crf[slots], self._use_tick[slots], counts, self.accesses, self.lrfu_lambda
        )
        if pin:
            self._pinned[slots] = True
        return self._slot[flat].long().reshape(rows.shape)

    def unpin_all(self) -> None:
        """Every pending gradient was consumed (or none exists): any row may leave again."""
        self._pinned.zero_()

    def _make_room(self, m: int, keep: torch.Tensor) -> torch.Tensor:
        """``m`` free slots: empty ones first, then the coldest evictable ones."""
        empty = (self._row < 0).nonzero().reshape(-1)
        if empty.numel() >= m:
            return empty[:m]
        need = m - empty.numel()
        evictable = (self._row >= 0) & ~self._pinned
        evictable[keep] = False
        available = int(evictable.sum())
        if available < need:
            raise bad_parameter(
                "memory_budget",
                f"keeps {self.capacity} rows of this memory layer in the cache, but one step "
                f"needs {m + keep.numel() + int(self._pinned.sum())} at once (rows read by this "
                "call and rows awaiting their gradient); raise it or read fewer rows per step",
            )
        # the ``need`` coldest by the cache's LRFU order key, without sorting the whole cache
        key = lrfu.order_key(self._use_crf, self._use_tick, self.accesses, self.lrfu_lambda)
        key = key.masked_fill(~evictable, math.inf)
        victims = key.topk(need, largest=False, sorted=False).indices
        self._write_back(victims[self._dirty[victims]])
        self._slot[self._row[victims]] = -1
        self._row[victims] = -1
        return torch.cat([empty, victims])

    def _read_in(self, rows: torch.Tensor, slots: torch.Tensor, block: RowBlock | None = None):
        if block is None:
            block = self.collection.get(rows.cpu().numpy().astype(np.int64) + 1)  # one query
            self.stats["queries"] += 1
        self.stats["misses"] += rows.numel()
        dev = self.device
        # through .data: a forward awaiting its backward saved these tensors, and autograd would
        # refuse them as modified; the rows it read are pinned, so only other slots change here
        self.key_storage.data[slots] = torch.as_tensor(block.keys).to(dev, self.key_storage.dtype)
        values = torch.as_tensor(block.values).to(dev, self.value_storage.dtype)
        self.value_storage.data[slots] = values
        self._crf[slots] = torch.as_tensor(block.crf).to(dev)
        self._last_tick[slots] = torch.as_tensor(block.last_tick).to(dev)
        self._hits[slots] = torch.as_tensor(block.hits).to(dev)
        self._created_tick[slots] = torch.as_tensor(block.created_tick).to(dev)
        self._use_crf[slots] = 0.0
        self._use_tick[slots] = self.accesses
        self._dirty[slots] = False
        self._pinned[slots] = False
        self._row[slots] = rows
        self._slot[rows] = slots.to(torch.int32)

    # ------------------------------------------------------------------ writing rows out
    def _block(self, slots: torch.Tensor) -> RowBlock:
        return row_block(self, slots, self._row[slots] + 1)

    def _write_back(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._require_transaction(f"write {slots.numel()} changed rows back")
        self.collection.apply_changes(upserts=self._block(slots))
        self._unsure[self._row[slots]] = True
        self.stats["written_back"] += slots.numel()
        self._dirty[slots] = False

    def _require_transaction(self, what: str) -> None:
        if not self.collection.store.in_transaction():
            raise InvalidInputError(
                f"a paged memory must {what} to {self.collection.name!r}, and may only do so "
                "inside the transaction that the next checkpoint commits (hold "
                "store.transaction() open around the steps between flushes), or the database "
                "would run ahead of its checkpoint; else raise the memory budget"
            )

    def flush(self, collection: PagedSource | None = None) -> dict[str, int]:
        """Write the dirty cached rows, the clock and the counters in one ``apply_changes``."""
        slots = self._dirty.nonzero().reshape(-1)
        (collection or self.collection).apply_changes(
            upserts=self._block(slots) if slots.numel() else None,
            clock=self.clock,
            counters=dict(self.counters),
        )
        self._dirty.zero_()
        self.counters = dict.fromkeys(self.counters, 0)
        if not self.collection.store.in_transaction():
            self.committed()  # that apply_changes was its own transaction
        return {"upserts": int(slots.numel()), "deletes": 0}

    def load_collection(self, collection: PagedSource) -> None:
        """Bind to a collection holding the table, reading nothing but its largest id and its
        clock: counting the rows (or ``stats()``) would read the whole table, every page of it,
        which is what a paged memory is there to avoid. A table of ids ``1..n_rows`` (rows are
        never deleted from it) ends at id ``n_rows``; a missing row is refused when read."""
        last = collection.max_id()
        if last != self.n_rows:
            raise InvalidInputError(
                f"collection {collection.name!r} does not hold the {self.n_rows} rows (ids 1.."
                f"{self.n_rows}) of this memory layer: its largest id is {last}"
            )
        self.collection = collection
        self.clock = int(collection.clock)

    @torch.no_grad()
    def refresh(self, collection: PagedSource | None = None, ids=None) -> int:
        """Drop rows ``ids`` (every cached row when None) from the cache, so the next
        :meth:`fetch` reads them from the database again: for a reader whose cached rows went
        stale because another process changed them (``memstore_gpt2.serve.refresh``). Returns
        the rows dropped. Ids outside the table are ignored (a row read later that the database
        no longer holds is refused then). The stored rows win over changes not written back;
        rows awaiting a gradient cannot be dropped. Binds to ``collection`` when given."""
        if collection is not None:
            self.collection = collection
        if ids is None:
            rows = self._row[self._row >= 0]
        else:
            rows = torch.as_tensor(np.asarray(ids, np.int64).reshape(-1)).to(self.device) - 1
            rows = torch.unique(rows[(rows >= 0) & (rows < self.n_rows)])
        slots = self._slot[rows].long()
        held = slots >= 0
        slots, rows = slots[held], rows[held]
        if bool(self._pinned[slots].any()):
            raise InvalidInputError(
                "cannot drop cached rows that a forward read with gradient (they await the "
                "optimizer step); refresh between steps"
            )
        self._row[slots] = -1
        self._slot[rows] = -1
        self._dirty[slots] = False
        self._unsure[rows] = False
        return int(rows.numel())

    def create(
        self,
        keys_of: Callable[[torch.Tensor], torch.Tensor],
        values_of=None,
        collection: PagedSource | None = None,
    ) -> None:
        """Write a new table of ``n_rows`` rows straight to the collection (``collection``, to
        which the cache binds, or the one bound), chunk by chunk, in one transaction: row ``r``
        gets id ``r + 1``, key ``keys_of(rows)``, value ``values_of(start, n)`` (default zero)
        and the LRFU state of a row inserted now; the cache stays empty. Counted as that many
        ``inserts``."""
        if collection is not None:
            self.collection = collection
        dv = self.value_dim
        with self.collection.store.transaction():
            for start in range(0, self.n_rows, CREATE_CHUNK):
                n = min(CREATE_CHUNK, self.n_rows - start)
                rows = torch.arange(start, start + n)
                values = torch.zeros(n, dv) if values_of is None else values_of(start, n)
                self.collection.apply_changes(
                    upserts=RowBlock(
                        ids=(rows + 1).numpy().astype(np.int64),
                        keys=keys_of(rows).float().numpy(),
                        values=values.float().numpy(),
                        crf=np.ones(n, np.float64),
                        last_tick=np.full(n, self.clock, np.int64),
                        hits=np.zeros(n, np.int64),
                        created_tick=np.full(n, self.clock, np.int64),
                    ),
                    clock=self.clock,
                    counters={"inserts": n},
                )

    # ------------------------------------------------------------------ LRFU and edits
    def advance_clock(self, tick: int | None = None) -> int:
        self.clock = self.clock + 1 if tick is None else max(self.clock, int(tick))
        return self.clock

    @torch.no_grad()
    def touch(self, slots: torch.Tensor, *, tick: int | None = None) -> None:
        """One tick of the layer's LRFU clock; every read of a cached row counts (as
        ``ResidentIndex.touch``: the same fields, the same numbers)."""
        t = self.advance_clock(tick)
        flat = slots.reshape(-1).to(self.device)
        hit, counts = torch.unique(flat[flat >= 0], return_counts=True)
        if hit.numel() == 0:
            return
        self._crf[hit], self._last_tick[hit] = lrfu.touched(
            self._crf[hit], self._last_tick[hit], counts, t, self.lrfu_lambda
        )
        self._hits[hit] += counts
        self._dirty[hit] = True

    def mark_rows_changed(self, slots: torch.Tensor | None = None) -> None:
        """Rows whose values may have changed outside these methods (an optimizer step)."""
        if slots is None:
            self._dirty |= self._row >= 0
        else:
            self._dirty[slots.to(self.device)] = True

    @torch.no_grad()
    def update(self, slots: torch.Tensor, *, values: torch.Tensor) -> None:
        slots = slots.reshape(-1).to(self.device)
        self.value_storage[slots] = values.detach().to(self.device, self.value_storage.dtype)
        self._dirty[slots] = True

    def reset_lrfu(self, slots: torch.Tensor) -> None:
        """The LRFU state of a row inserted now (see ``ResidentIndex.reset_lrfu``)."""
        lrfu.reset(self, slots.reshape(-1).to(self.device))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + int(n)

    def coldest_rows(self, m: int) -> torch.Tensor:
        """Row numbers of the ``m`` rows of the whole table with the lowest stored LRFU score
        (the store's eviction order): the cached rows' newer state is written first, inside the
        open transaction, and the clock with it."""
        self._require_transaction("write its LRFU state to rank the coldest rows")
        self._write_back(self._dirty.nonzero().reshape(-1))
        self.collection.apply_changes(clock=self.clock)
        ids = self.collection.evict(capacity=max(self.n_rows - int(m), 0), dry_run=True)
        return torch.as_tensor(ids, dtype=torch.int64).to(self.device) - 1
