"""What both memory layers share: trainable rows that live in a resident index, not in state_dict.

A layer's memory rows are ``nn.Parameter`` views of a bounded :class:`ResidentIndex`'s storage, so
any optimizer trains them (their gradient is exact and nonzero only on rows some query selected),
and the index's in-place inserts, evictions and recombinations are seen by the layer at once.
The rows are *not* in ``state_dict``: the database is their home. ``flush()`` writes what changed --
rows an optimizer moved (found by comparing with a snapshot of the last flush), inserted and
touched rows, deletions -- to the bound collection in one transaction.

Caveat of the bounded table: a delete moves the last row into the hole, and optimizer moments
(Adam's) stay with the slot, so a moved row inherits the previous occupant's moments.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from memstore.errors import InvalidInputError

from .resident import ResidentHits, ResidentIndex


class MemoryLayer(nn.Module):
    """Base of every memory layer: owns ``self.index`` and the two row Parameters.

    Whole-model code (:mod:`memstore_torch.model_memory`) finds memory layers by this type, so a
    subclass placed anywhere in any model is flushed, checkpointed and counted.
    """

    #: Row Parameters kept out of ``state_dict`` (the database is their home).
    ROW_PARAMETER_NAMES = ("memory_keys", "memory_values")

    index: ResidentIndex

    def _init_memory(
        self,
        index: ResidentIndex,
        trainable_rows: bool,
        store: Any = None,
        collection: str | None = None,
    ) -> None:
        self.index = index
        self.trainable_rows = trainable_rows
        self.collection_name = collection
        self._store = store
        self._collection = None
        # Row-moving changes (novel inserts, recombinations) decided in a forward are applied at
        # the next forward or flush: the backward pass still needs the rows as they were read.
        self._pending: list[tuple[str, tuple]] = []
        self._adopt_storage()
        self._register_state_dict_hook(_drop_memory_rows)
        self.register_load_state_dict_post_hook(_forgive_missing_memory_rows)

    def _adopt_storage(self) -> None:
        """Expose the index storage as Parameters (sharing memory, no copy)."""
        keys = nn.Parameter(self.index.key_storage, requires_grad=self.trainable_rows)
        values = nn.Parameter(self.index.value_storage, requires_grad=self.trainable_rows)
        self.index.key_storage, self.index.value_storage = keys, values
        self.memory_keys, self.memory_values = keys, values
        self._snapshot()

    def _snapshot(self) -> None:
        """Remember row contents as of the last flush, to find rows an optimizer changed."""
        n = self.index.n
        self._flushed_keys = self.index.keys.detach().clone() if self.trainable_rows else None
        self._flushed_values = self.index.values.detach().clone() if self.trainable_rows else None
        self._flushed_n = n
        self._flushed_version = self.index.storage_version

    def _mark_optimizer_changes(self) -> None:
        if not self.trainable_rows or self._flushed_keys is None:
            return
        n = min(self.index.n, self._flushed_n)
        if n == 0:
            return
        changed = (self.index.keys[:n] != self._flushed_keys[:n]).any(1) | (
            self.index.values[:n] != self._flushed_values[:n]
        ).any(1)
        # Rows moved by deletes since the snapshot are already dirty (delete moves dirty flags).
        slots = changed.nonzero().reshape(-1)
        if slots.numel():
            self.index.mark_rows_changed(slots)

    # -------------------------------------------------------------- store binding
    @property
    def collection(self) -> Any:
        """The bound ``memstore.Collection`` (None when the layer is not bound to a store)."""
        return self._collection

    def _bind(self, collection_factory) -> None:
        """Bind to ``self._store``/``self.collection_name``; load rows if the collection has any.

        ``collection_factory(store, name)`` returns the (possibly new) collection. Returns with
        ``self._loaded`` True when rows came from the store.
        """
        self._loaded = False
        if self._store is None:
            return
        if not self.collection_name:
            raise InvalidInputError("a memory layer bound to a store needs a collection name")
        coll = collection_factory(self._store, self.collection_name)
        if coll.key_dim != self.index.key_dim or coll.value_dim != self.index.value_dim:
            raise InvalidInputError(
                f"collection {self.collection_name!r} has key/value dims "
                f"{coll.key_dim}/{coll.value_dim}, layer needs "
                f"{self.index.key_dim}/{self.index.value_dim}"
            )
        self._collection = coll
        if len(coll) > 0:
            self.index.load_collection(coll)
            self._snapshot()
            self._loaded = True

    def _queue_insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._pending.append(("insert", (keys, values)))

    def _queue_recombine(
        self, queries: torch.Tensor, distances: torch.Tensor, ids: torch.Tensor
    ) -> None:
        self._pending.append(("recombine", (queries, distances, ids)))

    @torch.no_grad()
    def _apply_pending(self) -> None:
        """Apply queued novel inserts and recombinations, in the order they were decided."""
        while self._pending:
            kind, payload = self._pending.pop(0)
            if kind == "insert":
                keys, values = payload
                self.index.insert(keys, values)
                self.index.counters["novel_inserts"] = (
                    self.index.counters.get("novel_inserts", 0) + keys.shape[0]
                )
                continue
            queries, dist, ids = payload
            # Rows evicted or merged since the search are dropped from the hits (id -1 pads too).
            alive = torch.isin(ids, self.index.ids) & (ids >= 0)
            slots = torch.full_like(ids, -1)
            if bool(alive.any()):
                slots[alive] = self.index.slots_of(ids[alive])
            d = torch.where(alive, dist, torch.full_like(dist, math.inf))
            self.index.recombine(queries, ResidentHits(d, slots, ids), self.recombine)

    def flush(self, conn: Any = None) -> dict[str, int]:
        """Write every changed row to the bound collection in one transaction.

        ``conn``: an open write transaction of the bound store to join (see
        :func:`memstore_torch.model_memory.flush_memory`)."""
        self._apply_pending()
        if self._collection is None:
            raise InvalidInputError(
                "this memory layer is not bound to a store; pass store= and collection="
            )
        self._mark_optimizer_changes()
        report = self.index.flush(self._collection, conn=conn)
        self._snapshot()
        return report

    # -------------------------------------------------------------- parameter groups
    def memory_parameters(self) -> list[nn.Parameter]:
        """Row Parameters (empty when rows are read-only); give them their own learning rate."""
        if not self.trainable_rows:
            return []
        return [self.memory_keys, self.memory_values]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other trainable Parameter (projections, biases)."""
        memory = {id(p) for p in (self.memory_keys, self.memory_values)}
        return [p for p in self.parameters() if id(p) not in memory and p.requires_grad]

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.index.key_storage, self.index.value_storage = self.memory_keys, self.memory_values
        self.index.relocate(self.memory_keys.device)
        return result


def _drop_memory_rows(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in MemoryLayer.ROW_PARAMETER_NAMES:
        state_dict.pop(prefix + name, None)


def _forgive_missing_memory_rows(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        if key.rsplit(".", 1)[-1] in MemoryLayer.ROW_PARAMETER_NAMES:
            missing.remove(key)
