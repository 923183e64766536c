"""A collection's rows held as tensors on the training device, with dirty tracking.

A memory layer asks ~10^5 neighbour queries a step; one SQL query costs milliseconds, so the hot
path never touches SQL. :class:`ResidentIndex` loads every row once (``Collection.export_rows``),
answers searches with :mod:`memstore_torch.knn`, applies inserts, updates, deletes, LRFU touches,
recombinations and evictions in place, remembers which rows changed, and :meth:`flush` writes them
back in one ``Collection.apply_changes`` transaction, so the database is always a consistent
snapshot of the resident copy as of the last flush.

Rows live in the first ``len(index)`` slots of pre-allocated storage; a delete moves the last row
into the hole, so slots are only stable between deletions (ids are stable forever). When
``max_rows`` is given the storage is allocated once at that size and never re-allocated: an owner
may then wrap :attr:`key_storage` / :attr:`value_storage` as ``nn.Parameter`` and train rows with
any optimizer; inserts beyond ``max_rows`` evict the rows with the lowest LRFU score first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memstore.errors import DimensionMismatchError, InvalidInputError, RowNotFoundError
from memstore.types import RowBlock

from . import knn, lrfu
from .rows_source import RefreshSource, RowsSource, row_block

_INITIAL_STORAGE = 1024


@dataclass
class ResidentHits:
    """Search answer. ``slots`` index the resident tensors (valid until the next delete)."""

    distances: torch.Tensor  # (m, k) float32, +inf padded
    slots: torch.Tensor  # (m, k) int64, -1 padded
    ids: torch.Tensor  # (m, k) int64, -1 padded


class ResidentIndex:
    """Rows ``(id, key, value, crf, last_tick, hits, created_tick)`` as device tensors."""

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        metric: str = "ip",
        *,
        lrfu_lambda: float = 0.5,
        max_rows: int | None = None,
        device: str | torch.device = "cpu",
        backend: knn.Backend = "auto",
    ) -> None:
        knn.check_metric(metric)
        if key_dim < 1 or value_dim < 1:
            raise InvalidInputError(
                f"key_dim and value_dim must be >= 1, got {key_dim}, {value_dim}"
            )
        if not 0.0 <= lrfu_lambda <= 1.0:
            raise InvalidInputError(f"lrfu_lambda must lie in [0, 1], got {lrfu_lambda}")
        if max_rows is not None and max_rows < 1:
            raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
        self.key_dim, self.value_dim, self.metric = key_dim, value_dim, metric
        self.lrfu_lambda = float(lrfu_lambda)
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.backend = backend
        self.clock = 0
        self.n = 0
        self._next_id = 1
        self.counters = {"inserts": 0, "recombinations": 0, "evictions": 0}
        self._deleted_ids: list[torch.Tensor] = []
        self.storage_version = 0  # bumped whenever storage tensors are re-allocated
        self._allocate(max_rows if max_rows is not None else _INITIAL_STORAGE)

    # ------------------------------------------------------------------ storage
    def _allocate(self, capacity: int) -> None:
        dev = self.device
        old = getattr(self, "key_storage", None)
        new = {
            "key_storage": torch.zeros((capacity, self.key_dim), device=dev),
            "value_storage": torch.zeros((capacity, self.value_dim), device=dev),
            "_ids": torch.full((capacity,), -1, dtype=torch.int64, device=dev),
            "_crf": torch.zeros(capacity, dtype=torch.float64, device=dev),
            "_last_tick": torch.zeros(capacity, dtype=torch.int64, device=dev),
            "_hits": torch.zeros(capacity, dtype=torch.int64, device=dev),
            "_created_tick": torch.zeros(capacity, dtype=torch.int64, device=dev),
            "_dirty": torch.zeros(capacity, dtype=torch.bool, device=dev),
            "_in_store": torch.zeros(capacity, dtype=torch.bool, device=dev),
        }
        if old is not None:
            with torch.no_grad():
                for name, tensor in new.items():
                    tensor[: self.n] = getattr(self, name)[: self.n]
        for name, tensor in new.items():
            setattr(self, name, tensor)
        self.storage_version += 1
        self._invalidate()

    def relocate(self, device: str | torch.device) -> None:
        """Move the bookkeeping tensors to ``device`` (storage tensors are moved by their owner)."""
        self.device = torch.device(device)
        for name in self._ROW_TENSORS[2:]:
            setattr(self, name, getattr(self, name).to(self.device))
        self._invalidate()

    def _ensure_room(self, extra: int) -> None:
        needed = self.n + extra
        capacity = self.key_storage.shape[0]
        if needed <= capacity:
            return
        if self.max_rows is not None:
            raise AssertionError("callers evict before inserting into a bounded index")
        self._allocate(max(needed, 2 * capacity))

    def _invalidate(self) -> None:
        self._normalized: torch.Tensor | None = None
        self._sq_norms: torch.Tensor | None = None
        self._id_lookup: tuple[torch.Tensor, torch.Tensor] | None = None

    def mark_rows_changed(self, slots: torch.Tensor | None = None) -> None:
        """Tell the index that row contents changed outside its methods (an optimizer step)."""
        if slots is None:
            self._dirty[: self.n] = True
        else:
            self._dirty[slots] = True
        self._normalized = None
        self._sq_norms = None

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.n

    @property
    def keys(self) -> torch.Tensor:
        return self.key_storage[: self.n]

    @property
    def values(self) -> torch.Tensor:
        return self.value_storage[: self.n]

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: self.n]

    @property
    def crf(self) -> torch.Tensor:
        return self._crf[: self.n]

    @property
    def last_tick(self) -> torch.Tensor:
        return self._last_tick[: self.n]

    @property
    def hits(self) -> torch.Tensor:
        return self._hits[: self.n]

    @property
    def created_tick(self) -> torch.Tensor:
        return self._created_tick[: self.n]

    @property
    def dirty_count(self) -> int:
        return int(self._dirty[: self.n].sum()) + sum(len(d) for d in self._deleted_ids)

    def _id_tensor(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Ids as a flat int64 tensor on the index's device."""
        if isinstance(ids, torch.Tensor):  # possibly on the GPU already: never via numpy
            return ids.to(self.device, torch.int64).reshape(-1)
        return torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(self.device).reshape(-1)

    def slots_of(self, ids: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Slots of the given ids; :class:`RowNotFoundError` if any is not resident."""
        ids_t = self._id_tensor(ids)
        if self._id_lookup is None:
            sorted_ids, order = self.ids.sort()
            self._id_lookup = (sorted_ids, order)
        sorted_ids, order = self._id_lookup
        if self.n == 0:
            if ids_t.numel():
                raise RowNotFoundError(f"ids not in the index: {ids_t[:5].tolist()}")
            return ids_t
        pos = torch.searchsorted(sorted_ids, ids_t).clamp_max(self.n - 1)
        found = sorted_ids[pos] == ids_t
        if not bool(found.all()):
            raise RowNotFoundError(f"ids not in the index: {ids_t[~found][:5].tolist()}")
        return order[pos]

    # ------------------------------------------------------------------ loading / flushing
    @classmethod
    def from_collection(
        cls,
        collection: RowsSource,
        *,
        device: str | torch.device = "cpu",
        max_rows: int | None = None,
        backend: knn.Backend = "auto",
    ) -> ResidentIndex:
        """Load every row of a ``memstore.Collection`` (one ``export_rows`` call); any
        :class:`~memstore_torch.rows_source.RowsSource` will do."""
        index = cls(
            collection.key_dim,
            collection.value_dim,
            collection.metric,
            lrfu_lambda=collection.lrfu_lambda,
            max_rows=max_rows,
            device=device,
            backend=backend,
        )
        index.load_collection(collection)
        return index

    def load_collection(self, collection: RowsSource) -> None:
        """Replace the resident rows by every row of ``collection`` and adopt its clock/next id."""
        stats = collection.stats()
        self.load_block(
            collection.export_rows(), clock=int(stats["clock"]), next_id=stats.get("next_id")
        )

    def load_block(self, block: RowBlock, clock: int = 0, next_id: int | None = None) -> None:
        """Replace the resident rows by a ``RowBlock``; nothing is dirty afterwards."""
        n = len(block.ids)
        if self.max_rows is not None and n > self.max_rows:
            raise InvalidInputError(f"{n} rows do not fit max_rows={self.max_rows}")
        self.n = 0
        self._deleted_ids = []
        self._ensure_room(n)
        dev = self.device
        with torch.no_grad():
            self.key_storage[:n] = torch.as_tensor(np.asarray(block.keys, np.float32)).to(dev)
            self.value_storage[:n] = torch.as_tensor(np.asarray(block.values, np.float32)).to(dev)
            self._ids[:n] = torch.as_tensor(np.asarray(block.ids, np.int64)).to(dev)
            self._crf[:n] = torch.as_tensor(np.asarray(block.crf, np.float64)).to(dev)
            self._last_tick[:n] = torch.as_tensor(np.asarray(block.last_tick, np.int64)).to(dev)
            self._hits[:n] = torch.as_tensor(np.asarray(block.hits, np.int64)).to(dev)
            self._created_tick[:n] = torch.as_tensor(np.asarray(block.created_tick, np.int64)).to(
                dev
            )
        self._dirty[:] = False
        self._in_store[:] = False
        self._in_store[:n] = True
        self.n = n
        self.clock = int(clock)
        self._next_id = int(self.ids.max()) + 1 if n else 1
        if next_id is not None:  # never reuse an id the store handed out before
            self._next_id = max(self._next_id, int(next_id))
        self.counters = dict.fromkeys(self.counters, 0)
        self._invalidate()

    def refresh(self, collection: RefreshSource, ids=None) -> int:
        """Read rows ``ids`` of ``collection`` again (every row when None), for a reader whose copy
        went stale because another process changed them (``memstore_gpt2.serve.refresh``); returns
        the rows read.

        A row still stored gets its stored fields, one no longer stored leaves the index (no
        deletion is left for a flush: the store has none to do); when a row is stored that the
        index does not hold, the whole collection is loaded again. The stored rows win over
        changes not flushed yet. Between forwards only (slots change).
        """
        if ids is None:
            self.load_collection(collection)
            return self.n
        wanted = np.unique(np.asarray(ids, np.int64).reshape(-1))
        block = collection.get_existing(wanted)
        held = self.ids
        stored = self._id_tensor(block.ids)
        if not bool(torch.isin(stored, held).all()):
            self.load_collection(collection)
            return self.n
        wanted_t = self._id_tensor(wanted)
        gone = wanted_t[torch.isin(wanted_t, held) & ~torch.isin(wanted_t, stored)]
        if gone.numel():
            slots = self.slots_of(gone)
            self._in_store[slots] = False  # the store deleted them already: nothing to record
            self.delete(slots)
        if len(block.ids):
            slots = self.slots_of(stored)
            dev = self.device
            with torch.no_grad():
                self.key_storage[slots] = torch.as_tensor(block.keys).to(dev, torch.float32)
                self.value_storage[slots] = torch.as_tensor(block.values).to(dev, torch.float32)
            self._crf[slots] = torch.as_tensor(block.crf).to(dev, torch.float64)
            self._last_tick[slots] = torch.as_tensor(block.last_tick).to(dev, torch.int64)
            self._hits[slots] = torch.as_tensor(block.hits).to(dev, torch.int64)
            self._created_tick[slots] = torch.as_tensor(block.created_tick).to(dev, torch.int64)
            self._dirty[slots] = False
            self._in_store[slots] = True
            self._normalized = None
            self._sq_norms = None
        return len(block.ids) + int(gone.numel())

    def dirty_block(self) -> RowBlock:
        """The changed rows as a ``memstore.RowBlock`` (what :meth:`flush` upserts)."""
        slots = self._dirty[: self.n].nonzero().reshape(-1)
        return row_block(self, slots, self._ids[slots])

    def flush(self, collection: RowsSource) -> dict[str, int]:
        """Write every dirty row and deletion to ``collection`` in one transaction."""
        upserts = self.dirty_block()
        deletes = (
            torch.cat(self._deleted_ids).cpu().numpy().astype(np.int64)
            if self._deleted_ids
            else np.zeros(0, dtype=np.int64)
        )
        collection.apply_changes(
            upserts=upserts if len(upserts.ids) else None,
            deletes=deletes if len(deletes) else None,
            clock=self.clock,
            counters=dict(self.counters),
        )
        self._dirty[:] = False
        self._in_store[: self.n] = True
        self._deleted_ids = []
        self.counters = dict.fromkeys(self.counters, 0)
        return {"upserts": len(upserts.ids), "deletes": len(deletes)}

    def adopt_store(self, stored_ids: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Make a collection that holds ``stored_ids`` the target of the next :meth:`flush`.

        Whatever that collection held before, the flush then leaves it holding exactly the
        resident rows: every resident row is written (ids it already holds are replaced field by
        field) and every stored id that is not resident is deleted. Pending deletions recorded
        against a previous collection are dropped: they are covered by ``stored_ids``.
        """
        stored = self._id_tensor(stored_ids)
        resident = self.ids
        self._deleted_ids = [stored[~torch.isin(stored, resident)]]
        self._in_store[: self.n] = torch.isin(resident, stored)
        self.mark_rows_changed()

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (reported to the collection at the next flush).

        For maintenance the owner decides on, such as ``"novel_inserts"``; the index counts its
        own inserts, recombinations and evictions.
        """
        self.counters[name] = self.counters.get(name, 0) + int(n)

    # ------------------------------------------------------------------ search
    def _prepared_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = self.keys.detach()
        if self.metric == "cosine":
            if self._normalized is None:
                self._normalized = knn.normalize_rows(keys)
            return self._normalized, None
        if self.metric == "l2":
            if self._sq_norms is None:
                self._sq_norms = (keys * keys).sum(dim=1)
            return keys, self._sq_norms
        return keys, None

    def search(
        self, queries: torch.Tensor, k: int, *, touch: bool = False, tick: int | None = None
    ) -> ResidentHits:
        """Exact top-``k``; with ``touch`` the hits update LRFU state at ``tick`` (default: the
        clock advanced by one, as the store does once per search batch)."""
        if queries.dim() != 2 or queries.shape[1] != self.key_dim:
            raise DimensionMismatchError(
                f"queries must be (m, {self.key_dim}), got {tuple(queries.shape)}"
            )
        if not bool(torch.isfinite(queries).all()):
            raise InvalidInputError("queries contain NaN or inf")
        rows, sq_norms = self._prepared_rows()
        dist, slots = knn.search(
            queries.detach().to(self.device, torch.float32),
            rows,
            k,
            self.metric,
            backend=self.backend,
            rows_normalized=True,
            row_sq_norms=sq_norms,
        )
        ids = torch.where(slots >= 0, self._ids[slots.clamp_min(0)], slots)
        if touch:
            self.touch(slots, tick=tick)
        return ResidentHits(dist, slots, ids)

    # ------------------------------------------------------------------ LRFU
    def advance_clock(self, tick: int | None = None) -> int:
        self.clock = self.clock + 1 if tick is None else max(self.clock, int(tick))
        return self.clock

    def touch(self, slots: torch.Tensor, *, tick: int | None = None) -> None:
        """LRFU hits for every non-negative slot in ``slots`` (any shape): :meth:`touch_counts`."""
        flat = slots.reshape(-1)
        flat = flat[flat >= 0].to(self.device)
        self.touch_counts(torch.bincount(flat, minlength=self.n)[: self.n], tick=tick)

    def touch_counts(self, counts: torch.Tensor, *, tick: int | None = None) -> None:
        """``counts`` (n,) hits per slot at one tick. Mirror of memstore.lrfu.touch (tested in
        tests/torch/test_semantics_mirrors.py): stored crf and the hits are both decayed to the
        later of ``last_tick`` and the tick, then summed, i.e. ``crf <- c + 2^(-lam*age) * crf``
        for a row last touched before the tick (c successive single hits give the same)."""
        t = self.advance_clock(tick)
        hit = counts.nonzero().reshape(-1)
        if hit.numel() == 0:
            return
        self._crf[hit], self._last_tick[hit] = lrfu.touched(
            self._crf[hit], self._last_tick[hit], counts[hit], t, self.lrfu_lambda
        )
        self._hits[hit] += counts[hit].to(torch.int64)
        self._dirty[hit] = True

    def reset_lrfu(self, slots: torch.Tensor) -> None:
        """Give ``slots`` the LRFU state of a row inserted now (crf 1, no hits, created and last
        touched at the clock), as when a layer hands a cold row new content."""
        slots = slots.reshape(-1).to(self.device)
        lrfu.reset(self, slots)

    def lrfu_scores(self, now: int | None = None) -> torch.Tensor:
        """``log2(crf) - lambda * (now - last_tick)``: higher = keep. Mirror of
        memstore.lrfu.order_key (tested in tests/torch/test_semantics_mirrors.py)."""
        now = self.clock if now is None else now
        return lrfu.order_key(self.crf, self.last_tick, now, self.lrfu_lambda)

    def eviction_order(self, now: int | None = None) -> torch.Tensor:
        """Slots in eviction order: ascending LRFU score, then older ``last_tick``, then lower id.
        Mirror of memstore.lrfu.eviction_order (tested in tests/torch/test_semantics_mirrors.py),
        so the resident index and the store evict the same rows, ties included."""
        now = self.clock if now is None else now
        return lrfu.eviction_order(self.crf, self.last_tick, self.ids, now, self.lrfu_lambda)

    # ------------------------------------------------------------------ mutation
    def _check_rows(self, keys: torch.Tensor, values: torch.Tensor | None) -> tuple:
        if keys.dim() != 2 or keys.shape[1] != self.key_dim:
            raise DimensionMismatchError(
                f"keys must be (n, {self.key_dim}), got {tuple(keys.shape)}"
            )
        if values is None:
            if self.value_dim != self.key_dim:
                raise InvalidInputError("values are required when value_dim != key_dim")
            values = keys
        if values.dim() != 2 or values.shape != (keys.shape[0], self.value_dim):
            raise DimensionMismatchError(
                f"values must be ({keys.shape[0]}, {self.value_dim}), got {tuple(values.shape)}"
            )
        if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
            raise InvalidInputError("keys or values contain NaN or inf")
        return keys.detach().to(self.device, torch.float32), values.detach().to(
            self.device, torch.float32
        )

    def insert(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Append rows (crf 1, created and last touched now); returns their new ids (n,).

        A bounded index first evicts its lowest-LRFU rows to make room; more new rows than
        ``max_rows`` is an error.
        """
        keys, values = self._check_rows(keys, values)
        return self._append(keys, values)

    def insert_blank(self, keys: torch.Tensor) -> torch.Tensor:
        """:meth:`insert` rows whose values are all zero, without building or checking a values
        tensor: how a table of millions of rows starts (a product-key memory's)."""
        if keys.dim() != 2 or keys.shape[1] != self.key_dim:
            raise DimensionMismatchError(
                f"keys must be (n, {self.key_dim}), got {tuple(keys.shape)}"
            )
        if not bool(torch.isfinite(keys).all()):
            raise InvalidInputError("keys contain NaN or inf")
        return self._append(keys.detach().to(self.device, torch.float32), None)

    def _append(self, keys: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        m = keys.shape[0]
        if self.max_rows is not None:
            if m > self.max_rows:
                raise InvalidInputError(f"cannot insert {m} rows into max_rows={self.max_rows}")
            overflow = self.n + m - self.max_rows
            if overflow > 0:
                self.evict(self.n - overflow)
        self._ensure_room(m)
        start, end = self.n, self.n + m
        new_ids = torch.arange(self._next_id, self._next_id + m, device=self.device)
        with torch.no_grad():
            self.key_storage[start:end] = keys
            if values is None:
                self.value_storage[start:end].zero_()
            else:
                self.value_storage[start:end] = values
        self._ids[start:end] = new_ids
        self._crf[start:end] = 1.0
        self._last_tick[start:end] = self.clock
        self._hits[start:end] = 0
        self._created_tick[start:end] = self.clock
        self._dirty[start:end] = True
        self._in_store[start:end] = False
        self.n = end
        self._next_id += m
        self.counters["inserts"] += m
        self._invalidate()
        return new_ids

    def replace_all(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Delete every row, then insert these as new rows (crf 1, created now); returns their ids.

        The new ids continue after the largest id that is resident or awaiting deletion from the
        store (from 1 when there is none), so none of them equals a deleted id and one flush can
        delete the old rows and write the new ones. Evictions counted since the last flush are
        forgotten (every row is replaced anyway). Nothing changes when the new rows are invalid or
        do not fit ``max_rows``.
        """
        keys, values = self._check_rows(keys, values)
        if self.max_rows is not None and keys.shape[0] > self.max_rows:
            raise InvalidInputError(
                f"cannot insert {keys.shape[0]} rows into max_rows={self.max_rows}"
            )
        known = torch.cat([self.ids, *(d.to(self.device) for d in self._deleted_ids)])
        next_id = int(known.max()) + 1 if known.numel() else 1
        self.delete(torch.arange(self.n, device=self.device))
        self.counters["evictions"] = 0
        self._next_id = next_id
        return self.insert(keys, values)

    def update(
        self,
        slots: torch.Tensor,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        """Overwrite keys and/or values of the given slots in place."""
        slots = slots.reshape(-1).to(self.device)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.n):
            raise RowNotFoundError("update slots out of range")
        with torch.no_grad():
            if keys is not None:
                if keys.shape != (slots.numel(), self.key_dim):
                    raise DimensionMismatchError(f"keys must be ({slots.numel()}, {self.key_dim})")
                self.key_storage[slots] = keys.detach().to(self.device, torch.float32)
            if values is not None:
                if values.shape != (slots.numel(), self.value_dim):
                    raise DimensionMismatchError(
                        f"values must be ({slots.numel()}, {self.value_dim})"
                    )
                self.value_storage[slots] = values.detach().to(self.device, torch.float32)
        self._dirty[slots] = True
        self._normalized = None
        self._sq_norms = None

    _ROW_TENSORS = (
        "key_storage",
        "value_storage",
        "_ids",
        "_crf",
        "_last_tick",
        "_hits",
        "_created_tick",
        "_dirty",
        "_in_store",
    )

    def delete(self, slots: torch.Tensor) -> torch.Tensor:
        """Remove rows; returns their ids. The tail rows move into the holes (slots change)."""
        slots = torch.unique(slots.reshape(-1).to(self.device))
        slots = slots[slots >= 0]
        if slots.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        if int(slots.max()) >= self.n:
            raise RowNotFoundError("delete slots out of range")
        removed_ids = self._ids[slots].clone()
        stored = self._in_store[slots]
        if bool(stored.any()):
            self._deleted_ids.append(removed_ids[stored])
        keep = torch.ones(self.n, dtype=torch.bool, device=self.device)
        keep[slots] = False
        new_n = self.n - slots.numel()
        # Rows beyond new_n that survive fill the holes below new_n.
        holes = (~keep[:new_n]).nonzero().reshape(-1)
        movers = keep[new_n:].nonzero().reshape(-1) + new_n
        with torch.no_grad():
            for name in self._ROW_TENSORS:
                t = getattr(self, name)
                t[holes] = t[movers]
        self.n = new_n
        self._invalidate()
        return removed_ids

    def delete_ids(self, ids: torch.Tensor | np.ndarray | list[int]) -> int:
        return int(self.delete(self.slots_of(ids)).numel())

    def evict(self, capacity: int | None = None, *, min_score: float | None = None) -> torch.Tensor:
        """Delete the lowest-LRFU rows until ``len <= capacity`` and/or score >= ``min_score``
        (in :meth:`eviction_order`, as ``Collection.evict`` does)."""
        if capacity is None and min_score is None:
            raise InvalidInputError("evict needs capacity and/or min_score")
        scores = self.lrfu_scores()
        victims = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        if min_score is not None:
            victims |= scores < min_score
        if capacity is not None:
            if capacity < 0:
                raise InvalidInputError(f"capacity must be >= 0, got {capacity}")
            excess = self.n - capacity
            if excess > 0:
                victims[self.eviction_order()[:excess]] = True
        removed = self.delete(victims.nonzero().reshape(-1))
        self.counters["evictions"] += int(removed.numel())
        return removed

    def recombine(self, queries: torch.Tensor, hits: ResidentHits, threshold: float) -> int:
        """Merge each query's hits within ``threshold`` of it into one row; returns the number of
        merges (as ``Collection.recombine`` does, and counted as ``recombinations`` likewise).

        Torch mirror of memstore.recombine.plan_merges (the one definition; tested in
        tests/torch/test_semantics_mirrors.py: merging here and flushing leaves the database equal
        to the same merge done by the store). Queries in order, members nearest first, each row
        merged at most once per call; key and value become the ``softmax(-d)``-weighted means with
        ``d`` each member's distance to the query; crf is decayed to the newest member's
        ``last_tick`` and summed (crf is stored as of ``last_tick``), ``hits`` summed,
        ``last_tick`` the max, ``created_tick`` the min; the nearest member keeps its id (a flush
        upserts it in place) and the others are deleted.

        ``hits`` decide the groups; ``d`` is recomputed from the members' current keys (in
        float64, like the reference), which is what the store's search measured when ``hits`` are
        fresh, and stays the distance of the keys actually averaged when a layer merges hits found
        before an optimizer step moved them.
        """
        close = (hits.distances <= threshold) & (hits.slots >= 0)
        candidates = (close.sum(1) >= 2).nonzero().reshape(-1).tolist()
        if not candidates:
            return 0
        used = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        doomed: list[torch.Tensor] = []
        for qi in candidates:
            group = hits.slots[qi][close[qi]].to(self.device)
            group = group[~used[group]]
            if group.numel() < 2:
                continue
            used[group] = True
            d = knn.distance_to(
                queries[qi].to(self.device, torch.float64).expand(group.numel(), -1),
                self.key_storage[group].detach().double(),
                self.metric,
            )
            w = torch.softmax(-d, dim=0)[:, None]
            keeper, rest = group[0], group[1:]
            with torch.no_grad():
                key = (w * self.key_storage[group].double()).sum(0)
                value = (w * self.value_storage[group].double()).sum(0)
                self.key_storage[keeper] = key.to(self.key_storage.dtype)
                self.value_storage[keeper] = value.to(self.value_storage.dtype)
            now = self._last_tick[group].max()
            decay = torch.exp2(-self.lrfu_lambda * (now - self._last_tick[group]).double())
            self._crf[keeper] = (decay * self._crf[group]).sum()
            self._hits[keeper] = self._hits[group].sum()
            self._last_tick[keeper] = now
            self._created_tick[keeper] = self._created_tick[group].min()
            self._dirty[keeper] = True
            doomed.append(rest)
        if not doomed:
            return 0
        self.delete(torch.cat(doomed))
        self.counters["recombinations"] += len(doomed)
        return len(doomed)
