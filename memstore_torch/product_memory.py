"""ProductKeyMemory: millions of value rows per layer, at a cost per token that grows ~sqrt(rows).

Product-key memory (Lample et al., 2019; Meta's "Memory Layers at Scale", 2024), as a memstore
memory layer (docs/layers.md, Large memory; docs/design.md, Product-key memory):

* per head, ``q = norm(W_q x)`` split in halves scores two tables of ``n_keys`` sub-keys, and
  :func:`~memstore_torch.product_keys.product_topk` finds the exact ``k`` best of the
  ``N = n_keys ** 2`` implicit keys ``[C1[i], C2[j]]`` (row ``i * n_keys + j``);
* the row weights are ``softmax`` over each head's ``k`` scores; the output is the weighted sum
  of the selected value rows over all heads (heads share the values), then ``W_o`` when
  ``value_dim`` is set -- read by :class:`~memstore_torch.sparse_rows.SparseRowRead`, which never
  gathers the rows and gives the values a sparse gradient over the rows read;
* values start at zero (``value_init_std=0``), so adding the layer's output to a model changes
  nothing until it is trained.

Where the rows live. The values are the table of a bounded
:class:`~memstore_torch.row_table.ResidentRows` whose slot ``r`` is row ``r`` and holds id
``r + 1`` for ever (nothing is inserted, merged or deleted, so no row moves). In the collection a
row's key is its address ``[i, j]`` (two floats): the implicit key ``[C1[i], C2[j]]`` differs per
head and changes whenever a sub-key trains, so storing it would rewrite every row at each flush;
the sub-keys themselves are ordinary dense weights (``state_dict``). The collection has no SQL kNN
index (``index="none"``): the layer searches in torch. LRFU keeps its meaning: each training
forward is one tick and touches every row read (counted per read); the coldest rows
(:meth:`ProductKeyMemory.coldest_rows`) are those :meth:`~ProductKeyMemory.reuse_rows` hands to
new content. ``flush()`` writes the rows touched or read with gradient since the last flush --
the only rows a sparse gradient, hence any optimizer that accepts one, can have changed.

Resident or paged, the layer calls one :class:`~memstore_torch.row_table.RowTable` protocol:
:class:`~memstore_torch.row_table.ResidentRows` or :class:`~memstore_torch.paged_rows.PagedRows`
(``cache_rows``). A paged layer pins the rows a forward reads with gradient until an optimizer
holding its values steps: a process-wide optimizer hook that the first ``PagedRows`` registers
(:func:`memstore_torch.paged_rows.unpin_after_step`), so gradient accumulation over several
forwards works and any optimizer releases them. Upkeep between steps --
:meth:`ProductKeyMemory.recombine_last_read`, :meth:`~ProductKeyMemory.insert_novel_last_read`,
:meth:`~ProductKeyMemory.reuse_cold_rows` -- takes the optimizer whose per-row state restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from memstore.errors import InvalidInputError, bad_parameter
from memstore.recombine import merge_group, merged_rows
from memstore.types import CollectionOptions

from . import lrfu
from .cofiring import cofiring_pairs, first_occurrences, near_duplicates
from .config import ProductKeyConfig
from .memory_layer import MemoryLayer, MemoryRead, OptimizerArg, reset_optimizer_rows
from .paged_rows import PagedRows, Prefetch
from .product_keys import product_topk_stacked
from .row_table import ResidentRows, RowTable, fetched_chunks
from .rows_source import CollectionStore, row_block
from .sparse_rows import sparse_row_read


@dataclass
class _Searched:
    """What :meth:`ProductKeyMemory.start` hands to :meth:`ProductKeyMemory.finish`."""

    lead: torch.Size
    h: torch.Tensor  # (T, d_model)
    scores: torch.Tensor  # (T, heads, k)
    rows: torch.Tensor  # (T, heads, k)
    ahead: Prefetch | None


class ProductKeyMemory(MemoryLayer):
    """``(..., d) -> (..., d)`` memory layer over ``n_keys ** 2`` value rows."""

    #: A paged memory inside a GrownMemory reads the rows its search picked ahead, in a worker
    #: thread, while the base layer computes (a runtime switch, not part of the config: results
    #: are the same either way). Off by default: measured on 2 cores with SQLite, it bought
    #: nothing in training and cost 15-20 % in generation (docs/benchmarks.md, Paging).
    prefetch: bool = False

    config_class = ProductKeyConfig
    #: ``self.query_norm`` is the normalisation submodule; the choice is ``config.query_norm``.
    unmirrored_options = ("query_norm",)

    def __init__(
        self,
        config: ProductKeyConfig | int | None = None,
        /,
        *,
        store: CollectionStore | None = None,
        collection: str | None = None,
        cache_rows: int | None = None,
        _init_rows: bool = True,
        **options: Any,
    ) -> None:
        """``ProductKeyMemory(ProductKeyConfig(...))`` or ``ProductKeyMemory(d_model, n_keys=...,
        ...)``; rows go to ``store``/``collection`` when given (loaded from there if it holds
        them, else made and flushed there). ``cache_rows`` below the row count pages the values
        from the collection through a cache of that many rows (:class:`PagedRows`) instead of
        loading them all."""
        super().__init__()
        self.config = cfg = self.make_config(config, options)
        d, heads, dk = cfg.d_model, cfg.heads, cfg.key_dim
        self.query_proj = nn.Linear(d, heads * dk, bias=False)
        if cfg.query_norm == "layernorm":
            self.query_norm: nn.Module = nn.LayerNorm(dk)
        elif cfg.query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(heads * dk)
        else:
            self.query_norm = nn.Identity()
        # (heads, 2 halves, n_keys, dk / 2), uniform as Lample et al.
        bound = 1.0 / math.sqrt(dk // 2)
        self.sub_keys = nn.Parameter(
            torch.empty(heads, 2, cfg.n_keys, dk // 2).uniform_(-bound, bound)
        )
        self.out_proj = None if cfg.value_dim is None else nn.Linear(cfg.value_dim, d, bias=False)
        index: RowTable
        if cache_rows is not None and cache_rows < cfg.n_rows:  # the one choice of table
            if store is None or not collection:
                raise InvalidInputError("a paged memory (cache_rows) needs store= and collection=")
            index = PagedRows(
                None, cfg.n_rows, cache_rows, key_dim=2, value_dim=cfg.row_value_dim,
                lrfu_lambda=cfg.lrfu_lambda,
            )  # fmt: skip
        else:
            index = ResidentRows(
                cfg.n_rows, key_dim=2, value_dim=cfg.row_value_dim, lrfu_lambda=cfg.lrfu_lambda
            )
        self._init_memory(index, store, collection)
        self._bind()
        if self._loaded:
            self._check_loaded_rows()
        elif _init_rows:
            index.create(self.addresses, self._initial_values(), self._collection)

    n_rows = property(lambda self: self.config.n_rows)
    #: Whether the rows are paged through a cache (:class:`PagedRows`) rather than resident.
    paged = property(lambda self: isinstance(self.index, PagedRows))
    row_value_dim = property(lambda self: self.config.row_value_dim)

    # -------------------------------------------------------------- rows and their home
    def collection_options(self) -> CollectionOptions:
        """Rows keyed by their address ``[i, j]``, values of ``row_value_dim``; no SQL index."""
        cfg = self.config
        return CollectionOptions(
            key_dim=2,
            value_dim=cfg.row_value_dim,
            metric="l2",
            lrfu_lambda=cfg.lrfu_lambda,
            capacity=cfg.n_rows,
            index="none",
        )

    def _adopt_storage(self) -> None:
        """Values become the trainable Parameter; the ``[i, j]`` addresses never train."""
        keys = nn.Parameter(self.index.key_storage, requires_grad=False)
        values = nn.Parameter(self.index.value_storage, requires_grad=self.trainable_rows)
        self.index.key_storage, self.index.value_storage = keys, values
        self.memory_keys, self.memory_values = keys, values
        self.index.bind_values(values)  # paged: the optimizer finds table rows through the cache

    def _snapshot(self) -> None:
        """Nothing to remember: rows that can change are marked dirty when read (below), so no
        copy of a multi-GiB table is kept to diff against."""

    def _mark_optimizer_changes(self) -> None:
        """See :meth:`_snapshot`."""

    def addresses(self, rows: torch.Tensor) -> torch.Tensor:
        """``[i, j]`` (…, 2) of row numbers ``rows``: sub-key ``i`` of the first half, ``j`` of
        the second."""
        return torch.stack([rows // self.config.n_keys, rows % self.config.n_keys], dim=-1)

    def _initial_values(self):
        """``values_of(start, n)`` drawing the random initial values chunk by chunk (the same
        numbers resident or paged), or None when they start at zero."""
        std = self.config.value_init_std
        if std <= 0:
            return None
        g = torch.Generator().manual_seed(0x9E37)
        dv = self.row_value_dim
        return lambda start, n: torch.empty(n, dv).normal_(0.0, std, generator=g)

    def _check_loaded_rows(self) -> None:
        if not self.index.holds_table(self.addresses):
            n = self.n_rows
            raise InvalidInputError(
                f"collection {self.collection_name!r} does not hold the {n} rows (ids 1..{n}, "
                f"keys [i, j]) of a product-key memory with n_keys={self.config.n_keys}"
            )

    def memory_parameters(self) -> list[nn.Parameter]:
        """The values Parameter (empty when read-only). Its gradient is sparse: train it with
        :class:`~memstore_torch.optim.RowwiseAdagrad` (or another optimizer that accepts sparse
        gradients, such as ``torch.optim.SparseAdam``)."""
        return [self.memory_values] if self.trainable_rows else []

    def sparse_parameters(self) -> list[nn.Parameter]:
        """All of :meth:`memory_parameters`: the values' gradient is sparse (``SparseRowRead``)."""
        return self.memory_parameters()

    def flush(self, all_rows: bool = False) -> dict[str, int]:
        """Write the rows that changed (touched or read with gradient since the last flush) to
        the collection in one transaction; ``all_rows`` writes every row (after editing values
        by hand)."""
        if all_rows:
            self.index.mark_rows_changed()
        return super().flush()

    # -------------------------------------------------------------- LRFU
    def coldest_rows(self, m: int) -> torch.Tensor:
        """Row numbers of the ``m`` rows with the lowest LRFU score (ties: older ``last_tick``,
        then lower id), the store's eviction order."""
        return self.index.coldest_rows(m)

    def _cached_chunks(self, rows: torch.Tensor):
        """``(chunk of rows, their slots)``: resident rows are their own slots (one chunk); a
        paged memory reads rows into its cache at most half a cache at a time."""
        return fetched_chunks(self.index, rows)

    @torch.no_grad()
    def row_values(self, rows: torch.Tensor) -> torch.Tensor:
        """The values (n, row_value_dim) of row numbers ``rows`` (read in when paged)."""
        parts = [
            self.memory_values[slots].detach().clone() for _, slots in self._cached_chunks(rows)
        ]
        return torch.cat(parts) if parts else self.memory_values[:0].detach().clone()

    @torch.no_grad()
    def recombine_rows(
        self, rows: torch.Tensor, weights: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """Merge near-duplicate rows that fired together in one read: ``rows`` and ``weights``
        ``(T, heads, k)`` as a forward selected them (``MemoryRead.ids - 1`` and ``.weights``;
        :mod:`memstore_torch.cofiring` says which pairs and how). Returns the rows made blank;
        their optimizer state is the caller's to reset, as after :meth:`reuse_rows`. Counted as
        ``recombinations`` (one per merged pair)."""
        if not threshold >= 0:
            raise bad_parameter("threshold", f"must be >= 0, got {threshold!r}")
        first, second, w_first, w_second, _ = cofiring_pairs(
            rows.to(self.index.device), weights.to(self.index.device)
        )
        chosen, _ = near_duplicates(first, second, self.row_values, threshold)
        if chosen.numel() == 0:
            return chosen
        keepers, blanks = first[chosen], second[chosen]
        nearness = (
            -torch.stack([w_first[chosen], w_second[chosen]], 1)
            .double()
            .clamp_min(torch.finfo(torch.float64).tiny)
            .log()
        )  # merge_group's "distances": the token's own weights, renormalised over the pair
        step = max(1, self.index.fetch_limit // 2)  # pairs per chunk: both rows must fit
        for start in range(0, keepers.numel(), step):
            part = slice(start, start + step)
            self._merge_pairs(keepers[part], blanks[part], nearness[part])
        self.index.count("recombinations", keepers.numel())
        return blanks

    def _merge_pairs(self, keepers: torch.Tensor, blanks: torch.Tensor, nearness) -> None:
        pair_rows = torch.cat([keepers, blanks])
        slots = self.index.fetch(pair_rows)
        block = row_block(self.index, slots, pair_rows + 1)
        n, lam = keepers.numel(), self.config.lrfu_lambda
        groups = [
            merge_group(block.take(np.array([i, n + i])), nearness[i].cpu().numpy(), lam)
            for i in range(n)
        ]
        merged = merged_rows(groups)
        keep_slots, blank_slots = slots[:n], slots[n:]
        self.index.update(keep_slots, values=torch.as_tensor(merged.values))
        lrfu.assign(self.index, keep_slots, merged)  # the keeper keeps its address (key)
        self.index.update(blank_slots, values=torch.zeros(n, self.row_value_dim))
        self.index.reset_lrfu(blank_slots)

    @torch.no_grad()
    def insert_novel(self, rows: torch.Tensor, scores: torch.Tensor, share: float) -> torch.Tensor:
        """Novelty for product keys: of one read's ``rows`` / ``scores`` ``(T, heads, k)`` (a
        recorded ``MemoryRead``: ``ids - 1``, ``scores``), the ``share`` of token-heads whose best
        match is weakest are novel, and each claims the coldest row it read (lowest stored LRFU
        score; ties: lower row), weakest first, a row at most once. Product keys cannot add a key,
        so the novel query takes over the coldest row at its own addresses: the row is handed
        out as by :meth:`reuse_rows` (blank; counted as an eviction and an insert) and counted as a
        ``novel_insert``; the query's gradient then writes it first. Returns the rows claimed."""
        if not 0 <= share <= 1:
            raise bad_parameter("share", f"must lie in [0, 1], got {share!r}")
        rows = rows.to(self.index.device).reshape(-1, rows.shape[-1])  # (T * heads, k)
        best = scores.to(self.index.device).reshape(-1, scores.shape[-1]).amax(dim=1)
        n_novel = min(int(share * best.numel()), best.numel())
        if n_novel == 0 or rows.shape[1] == 0:
            return rows.new_zeros(0)
        novel = best.argsort(stable=True)[:n_novel]  # weakest first
        candidates = rows[novel]  # (n, k)
        index, lam = self.index, self.config.lrfu_lambda
        key = torch.cat([  # each chunk's stored LRFU state read before the next is fetched
            lrfu.order_key(*index.lrfu_state(slots), index.clock, lam)
            for _, slots in self._cached_chunks(candidates.reshape(-1))
        ]).reshape(candidates.shape)  # fmt: skip
        # coldest first, then the lower row: sort each token's candidates by (key, row)
        by_row = candidates.argsort(dim=1)
        by_key = key.gather(1, by_row).argsort(dim=1, stable=True)
        coldest = candidates.gather(1, by_row.gather(1, by_key[:, :1]))[:, 0]
        _, first, _ = first_occurrences(coldest)
        claimed = coldest[first.sort().values]  # each row once, weakest query first
        self.reuse_rows(claimed)
        self.index.count("novel_inserts", claimed.numel())
        return claimed

    @torch.no_grad()
    def reuse_rows(self, rows: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Give ``rows`` new content: their values become ``values`` (default zero) and their LRFU
        state that of a new row (crf 1, no hits, created and last touched now); counted as that
        many ``evictions`` and ``inserts``. Their addresses (keys) stay: product keys cannot move
        one row's key. An optimizer's per-row state (``RowwiseAdagrad.reset_rows``) is the
        caller's to reset."""
        rows = rows.reshape(-1).to(self.index.device)
        if values is None:
            values = torch.zeros(rows.numel(), self.row_value_dim)
        done = 0
        for chunk, slots in self._cached_chunks(rows):
            self.index.update(slots, values=values[done : done + chunk.numel()])
            self.index.reset_lrfu(slots)
            done += chunk.numel()
        self.index.count("evictions", rows.numel())
        self.index.count("inserts", rows.numel())

    # -------------------------------------------------------------- upkeep between steps
    @torch.no_grad()
    def recombine_last_read(self, threshold: float, optimizer: OptimizerArg = None) -> int:
        """:meth:`recombine_rows` over what the last recorded forward read (``record_reads``;
        row ``r`` was recorded as id ``r + 1``); the rows made blank restart their state in
        ``optimizer``. Returns the rows merged away (0 without a record or trainable rows)."""
        read = self.last_read
        if read is None or not self.memory_parameters():
            return 0
        blanks = self.recombine_rows(read.ids - 1, read.weights, threshold)
        reset_optimizer_rows(optimizer, self.memory_values, blanks)
        return int(blanks.numel())

    @torch.no_grad()
    def insert_novel_last_read(self, share: float, optimizer: OptimizerArg = None) -> int:
        """:meth:`insert_novel` over what the last recorded forward read; the rows claimed
        restart their state in ``optimizer``. Returns the rows claimed."""
        read = self.last_read
        if read is None or read.scores is None or not self.memory_parameters():
            return 0
        claimed = self.insert_novel(read.ids - 1, read.scores, share)
        reset_optimizer_rows(optimizer, self.memory_values, claimed)
        return int(claimed.numel())

    @torch.no_grad()
    def reuse_cold_rows(self, fraction: float, optimizer: OptimizerArg = None) -> int:
        """LRFU eviction for a table that is always full: of the coldest ``ceil(fraction *
        n_rows)`` rows, those holding trained content (a non-zero value) become blank rows again
        (:meth:`reuse_rows`) and restart their state in ``optimizer``, so whatever reads them
        next writes new content at a full learning rate. Returns the rows reused."""
        if not 0 <= fraction <= 1:
            raise bad_parameter("fraction", f"must lie in [0, 1], got {fraction!r}")
        if not self.memory_parameters():
            return 0
        cold = self.coldest_rows(math.ceil(fraction * self.n_rows))
        cold = cold[self.row_values(cold).abs().amax(dim=1) > 0]
        if cold.numel():
            self.reuse_rows(cold)
            reset_optimizer_rows(optimizer, self.memory_values, cold)
        return int(cold.numel())

    # -------------------------------------------------------------- forward
    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head queries ``norm(W_q x)`` (T, heads, key_dim) for inputs ``x`` (T, d_model)."""
        cfg = self.config
        q = self.query_proj(x)  # (T, H * dk)
        if cfg.query_norm == "batchnorm":
            q = self.query_norm(q)
        q = q.view(x.shape[0], cfg.heads, cfg.key_dim)
        if cfg.query_norm == "layernorm":
            q = self.query_norm(q)
        return q

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and head, the ``k`` best rows: ``(scores (T, heads, k), rows (T, heads, k))``
        for inputs ``x`` (T, d_model), best first (ties: lower row). Differentiable in the
        scores."""
        cfg = self.config
        t, heads, half, n = x.shape[0], cfg.heads, cfg.key_dim // 2, cfg.n_keys
        q = self.queries(x).view(t, 2 * heads, half).transpose(0, 1)  # (2H, T, dk/2)
        sub = self.sub_keys if self.sub_keys.dtype == q.dtype else self.sub_keys.to(q.dtype)
        s = torch.bmm(q, sub.view(2 * heads, n, half).transpose(1, 2))  # (2H, T, n_keys)
        k = min(self.k, self.n_rows)
        if t == 1:  # a decoding token: (2H, 1, n) is already token-major
            halves = s.view(heads, 2, n)
        else:
            halves = s.view(heads, 2, t, n).permute(2, 0, 1, 3).reshape(t * heads, 2, n)
        scores, rows = product_topk_stacked(halves, k)  # (T * H, k), token-major
        return scores.view(t, heads, k), rows.view(t, heads, k)

    def forward(self, x: torch.Tensor, searched: _Searched | None = None) -> torch.Tensor:
        """``(..., d_model) -> (..., d_model)``; ``searched``: what :meth:`start` already found
        for this ``x`` (so the rows could be read ahead meanwhile)."""
        return self.finish(self.start(x) if searched is None else searched)

    def start(self, x: torch.Tensor, *, read_ahead: bool = False) -> _Searched:
        """The first half of :meth:`forward`: the search; with ``read_ahead``, a paged memory
        also starts reading the rows it picked in a worker thread, for a caller that computes
        something else meanwhile (``GrownMemory`` computes its base layer). :meth:`finish` (or
        ``forward(x, searched=...)``) completes the read."""
        if x.shape[-1] != self.d_model:
            raise InvalidInputError(f"expected (..., {self.d_model}) input, got {tuple(x.shape)}")
        h = x.reshape(-1, self.d_model)
        scores, rows = self.search(h)  # (T, H, k)
        ahead = self.index.prefetch(rows) if read_ahead and self.prefetch else None
        return _Searched(x.shape[:-1], h, scores, rows, ahead)

    def finish(self, searched: _Searched) -> torch.Tensor:
        """The second half of :meth:`forward`: the weighted read of the rows :meth:`start` found."""
        lead, h, scores, rows = searched.lead, searched.h, searched.scores, searched.rows
        values = self.memory_values
        # softmax in at least float32 (bf16 activations), the weights in the values' precision
        weights = torch.softmax(
            scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)
        )
        if weights.dtype != values.dtype:
            weights = weights.to(values.dtype)
        if self.record_reads:  # what this forward reads: row r is stored with id r + 1
            self.last_read = MemoryRead(
                rows.detach() + 1, weights.detach(), tuple(lead), scores.detach()
            )
        t = h.shape[0]
        reads = self.config.heads * scores.shape[-1]
        rows = rows.reshape(t, reads)
        may_train = values.requires_grad and torch.is_grad_enabled()
        # a paged memory reads missing rows in (one query) and reads them from their cache slots
        slots = self.index.fetch(rows, pin=may_train, prefetched=searched.ahead)
        out = sparse_row_read(weights.reshape(t, reads), slots, values)  # (T, dv)
        if may_train or self.training or self.update_in_eval:  # (decoding skips the bookkeeping)
            with torch.no_grad():
                if may_train:
                    self.index.mark_rows_changed(slots.reshape(-1))  # a gradient may reach them
                if self.training or self.update_in_eval:
                    self.index.touch(slots)  # one tick; every read counts
        if out.dtype != h.dtype:
            out = out.to(h.dtype)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out.reshape(*lead, self.d_model)

    # -------------------------------------------------------------- config
    @classmethod
    def from_config(
        cls, saved: Mapping[str, Any], store: CollectionStore, *, cache_rows: int | None = None
    ) -> ProductKeyMemory:
        """Rebuild the layer bound to its collection with rows loaded from ``store`` (paged
        through a cache of ``cache_rows`` rows when that is below the row count)."""
        config, collection = cls.split_saved_config(saved)
        layer = cls(
            config, store=store, collection=collection, cache_rows=cache_rows, _init_rows=False
        )
        if not layer._loaded:
            raise InvalidInputError(f"collection {collection!r} holds no rows")
        return layer

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"d_model={cfg.d_model}, rows={cfg.n_rows} ({cfg.n_keys}^2), heads={cfg.heads}, "
            f"k={cfg.k}, key_dim={cfg.key_dim}, value_dim={cfg.row_value_dim}, "
            f"collection={self.collection_name!r}" + self.index.describe()
        )
