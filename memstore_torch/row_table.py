"""RowTable: what a product-key memory needs of the table holding its value rows.

A :class:`~memstore_torch.product_memory.ProductKeyMemory` addresses its rows by row number
``0..n_rows-1`` (id ``r + 1`` in the collection) and reads them from *slots* of its values
Parameter. Two tables serve it:

* :class:`ResidentRows` -- every row in memory; slot ``r`` is row ``r`` for ever, so
  :meth:`~RowTable.fetch` hands the row numbers back unchanged;
* :class:`~memstore_torch.paged_rows.PagedRows` -- a bounded cache in front of the collection;
  :meth:`~RowTable.fetch` reads the missing rows in (one query) and returns their cache slots.

Both keep the same per-row fields (value, key ``[i, j]``, ``crf``, ``last_tick``, ``hits``,
``created_tick``) with the same LRFU arithmetic (:mod:`memstore_torch.lrfu`), so the layer
calls one protocol and computes the same numbers, bit for bit, whichever table it has
(tests/torch/test_paged_rows.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from .paged_rows import CREATE_CHUNK, Prefetch
from .resident import ResidentIndex
from .rows_source import PagedSource

#: ``keys_of(rows)``: the stored keys (n, key_dim) of row numbers ``rows``.
KeysOf = Callable[[torch.Tensor], torch.Tensor]
#: ``values_of(start, n)``: the initial values (n, value_dim) of rows ``start..start+n-1``.
ValuesOf = Callable[[int, int], torch.Tensor]


class RowTable(Protocol):
    """The value rows of a product-key memory, resident or paged: rows are numbers
    ``0..n_rows-1``, read and changed through the *slots* :meth:`fetch` returns."""

    n_rows: int
    device: torch.device
    clock: int
    counters: dict[str, int]
    key_storage: torch.Tensor  # (slots, key_dim): the layer's memory_keys Parameter
    value_storage: torch.Tensor  # (slots, value_dim): the layer's memory_values Parameter
    #: The most rows one :meth:`fetch` may bring in at once (a cache cannot hold more).
    fetch_limit: int

    # -- reading rows for a forward
    def fetch(
        self, rows: torch.Tensor, *, pin: bool = False, prefetched: Prefetch | None = None
    ) -> torch.Tensor:
        """Slots (the shape of ``rows``) holding row numbers ``rows``; ``pin`` keeps them
        until the optimizer steps (a gradient may reach them)."""
        ...

    def prefetch(self, rows: torch.Tensor) -> Prefetch | None:
        """Start reading ``rows`` ahead of the :meth:`fetch` that will want them (None: nothing
        to read ahead)."""
        ...

    # -- changing rows
    def update(self, slots: torch.Tensor, *, values: torch.Tensor) -> None: ...

    def touch(self, slots: torch.Tensor, *, tick: int | None = None) -> None:
        """One tick of the LRFU clock; every read (slot occurrence) counts."""
        ...

    def reset_lrfu(self, slots: torch.Tensor) -> None:
        """The LRFU state of a row inserted now."""
        ...

    def lrfu_state(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crf, last_tick)`` of ``slots``, as stored."""
        ...

    def mark_rows_changed(self, slots: torch.Tensor | None = None) -> None:
        """Rows an optimizer may change (written at the next flush)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (written at the next flush)."""
        ...

    def coldest_rows(self, m: int) -> torch.Tensor:
        """Row numbers of the ``m`` rows with the lowest stored LRFU score (the store's order)."""
        ...

    # -- the table's home
    def create(
        self, keys_of: KeysOf, values_of: ValuesOf | None, collection: PagedSource | None
    ) -> None:
        """Make a new table of ``n_rows`` rows (values zero or ``values_of``), written to
        ``collection`` when given."""
        ...

    def holds_table(self, keys_of: KeysOf) -> bool:
        """Whether the rows loaded are exactly the ``n_rows`` rows with keys ``keys_of``."""
        ...

    def load_collection(self, collection: PagedSource) -> None: ...

    def flush(self, collection: PagedSource) -> dict[str, int]: ...

    def relocate(self, device: str | torch.device) -> None: ...

    def bind_values(self, values: nn.Parameter) -> None:
        """Called once the values Parameter wraps :attr:`value_storage`."""
        ...

    def describe(self) -> str:
        """What ``extra_repr`` adds for this table (empty when nothing)."""
        ...


class ResidentRows(ResidentIndex):
    """Every row of the table in memory: slot ``r`` is row ``r`` (id ``r + 1``) for ever."""

    #: Any number of rows at once: nothing has to make room.
    fetch_limit = sys.maxsize

    def __init__(
        self,
        n_rows: int,
        *,
        key_dim: int,
        value_dim: int,
        lrfu_lambda: float,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(
            key_dim, value_dim, "l2", lrfu_lambda=lrfu_lambda, max_rows=n_rows, device=device
        )
        self.n_rows = int(n_rows)

    def fetch(
        self, rows: torch.Tensor, *, pin: bool = False, prefetched: Prefetch | None = None
    ) -> torch.Tensor:
        """``rows`` themselves: a resident row is its own slot (nothing to pin or read)."""
        return rows

    def prefetch(self, rows: torch.Tensor) -> None:
        """Nothing to read ahead."""
        return None

    def lrfu_state(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._crf[slots], self._last_tick[slots]

    def coldest_rows(self, m: int) -> torch.Tensor:
        """The first ``m`` slots (= rows) of :meth:`eviction_order`."""
        return self.eviction_order()[:m]

    @torch.no_grad()
    def create(
        self, keys_of: KeysOf, values_of: ValuesOf | None, collection: PagedSource | None
    ) -> None:
        """Rows ``0..n_rows-1`` with ids ``1..n_rows``, keys ``keys_of``, values zero or drawn
        chunk by chunk by ``values_of``; flushed to ``collection`` when given."""
        n = self.n_rows
        self.insert_blank(keys_of(torch.arange(n)).float())  # ids 1..n, values 0
        if values_of is not None:
            values = self.value_storage
            for start in range(0, n, CREATE_CHUNK):  # drawn on the CPU, chunk by chunk
                chunk = values_of(start, min(CREATE_CHUNK, n - start))
                values[start : start + chunk.shape[0]] = chunk
        if collection is not None:
            self.flush(collection)

    def holds_table(self, keys_of: KeysOf) -> bool:
        n = self.n_rows
        return self.n == n and bool(
            torch.equal(self.ids.cpu(), torch.arange(1, n + 1))
            and torch.equal(self.keys.detach().cpu(), keys_of(torch.arange(n)).float())
        )

    def bind_values(self, values: nn.Parameter) -> None:
        """Nothing to bind: the optimizer's rows are the table's rows."""

    def describe(self) -> str:
        return ""


def fetched_chunks(table: RowTable, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(chunk of rows, their slots)`` for row numbers ``rows``, at most ``table.fetch_limit``
    rows a chunk (one chunk, possibly empty, for a resident table)."""
    rows = rows.reshape(-1).to(table.device)
    step = table.fetch_limit
    for start in range(0, max(rows.numel(), 1), step):
        chunk = rows[start : start + step]
        yield chunk, table.fetch(chunk)
