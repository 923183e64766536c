"""The seam between the layer library and the store: exactly what resident rows and layers use.

A :class:`~memstore_torch.resident.ResidentIndex` loads a collection's rows once and writes its
changes back in one call; a memory layer additionally asks a store for its collection by name.
These protocols spell out that contract and nothing more, so the layer library depends on the
shape of a ``memstore.Collection`` / ``memstore.Store``, not on their classes: anything with
these members (a test double, another store) can serve as a layer's home.
``memstore.Collection`` and ``memstore.Store`` satisfy them (``tests/torch/test_rows_source.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from memstore.types import CollectionOptions, RowBlock


@runtime_checkable
class RowsSource(Protocol):
    """What a :class:`~memstore_torch.resident.ResidentIndex` needs from a collection."""

    @property
    def key_dim(self) -> int: ...

    @property
    def value_dim(self) -> int: ...

    @property
    def metric(self) -> str: ...

    @property
    def lrfu_lambda(self) -> float: ...

    def stats(self) -> Mapping[str, Any]:
        """At least ``"clock"`` (the logical tick) and ``"next_id"`` (the next unused id)."""
        ...

    def export_rows(self) -> RowBlock:
        """Every row, ordered by id."""
        ...

    def apply_changes(
        self,
        upserts: RowBlock | None = None,
        deletes: np.ndarray | None = None,
        *,
        clock: int | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        """One transaction: delete ``deletes``, insert-or-replace ``upserts`` field by field, set
        the clock and add ``counters`` to the lifetime counters."""
        ...


@runtime_checkable
class RefreshSource(RowsSource, Protocol):
    """What :meth:`ResidentIndex.refresh` also needs: some rows by id, the missing ones left out
    (they were deleted since the copy was made)."""

    def get_existing(self, ids) -> RowBlock:
        """The rows among ``ids`` that exist, ordered by id."""
        ...


@runtime_checkable
class LayerCollection(RowsSource, Protocol):
    """What a memory layer needs from its bound collection: the rows, and whether there are any."""

    def __len__(self) -> int: ...

    def max_id(self) -> int | None:
        """The largest stored id, None when empty (cheap, unlike ``len``)."""
        ...


@runtime_checkable
class CollectionStore(Protocol):
    """What a memory layer needs from a store: its collection by name, made on first use with the
    layer's options, or an existing one checked against the options that must agree."""

    def has_collection(self, name: str) -> bool: ...

    def create_collection(
        self, name: str, options: CollectionOptions | None = None, **kwargs: Any
    ) -> LayerCollection:
        """A new, empty collection with these options."""
        ...

    def get_or_create_collection(
        self, name: str, options: CollectionOptions | None = None, **kwargs: Any
    ) -> LayerCollection:
        """The existing collection (checked against the options given) or a new one."""
        ...


@runtime_checkable
class WriteBackHost(Protocol):
    """The store behind a paged collection: its per-thread transactions."""

    def in_transaction(self) -> bool:
        """Whether this thread has a write transaction open."""
        ...

    @property
    def concurrent_reads(self) -> bool:
        """Whether another thread can read while this one holds a transaction."""
        ...

    def transaction(self) -> AbstractContextManager[Any]:
        """One write transaction that every call of this thread inside it joins."""
        ...


@runtime_checkable
class PagedSource(LayerCollection, Protocol):
    """What :class:`~memstore_torch.paged_rows.PagedRows` needs beyond a layer's collection: rows
    by id in one call, the store's LRFU order, and the store's transactions."""

    @property
    def store(self) -> WriteBackHost: ...

    @property
    def clock(self) -> int:
        """The collection's LRFU clock (read from the catalog, not from the rows)."""
        ...

    def get(self, ids: np.ndarray) -> RowBlock:
        """Rows in the order of ``ids`` (one query)."""
        ...

    def evict(
        self, capacity: int | None = None, *, min_score: float | None = None, dry_run: bool = False
    ) -> np.ndarray:
        """Ids of the lowest-LRFU rows beyond ``capacity``, lowest first (``dry_run``: kept)."""
        ...


def row_block(rows: Any, slots: torch.Tensor, ids: torch.Tensor) -> RowBlock:
    """Slots ``slots`` of a row holder (``key_storage``, ``value_storage``, ``_crf``,
    ``_last_tick``, ``_hits``, ``_created_tick`` tensors on any device, in any float precision),
    with ids ``ids``, as the ``RowBlock`` a store takes."""
    return RowBlock(
        ids=ids.cpu().numpy().astype(np.int64),
        keys=rows.key_storage[slots].detach().float().cpu().numpy(),
        values=rows.value_storage[slots].detach().float().cpu().numpy(),
        crf=rows._crf[slots].cpu().numpy().astype(np.float64),
        last_tick=rows._last_tick[slots].cpu().numpy().astype(np.int64),
        hits=rows._hits[slots].cpu().numpy().astype(np.int64),
        created_tick=rows._created_tick[slots].cpu().numpy().astype(np.int64),
    )
