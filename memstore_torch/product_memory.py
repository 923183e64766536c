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
:class:`~memstore_torch.resident.ResidentIndex` whose slot ``r`` is row ``r`` and holds id
``r + 1`` for ever (nothing is inserted, merged or deleted, so no row moves). In the collection a
row's key is its address ``[i, j]`` (two floats): the implicit key ``[C1[i], C2[j]]`` differs per
head and changes whenever a sub-key trains, so storing it would rewrite every row at each flush;
the sub-keys themselves are ordinary dense weights (``state_dict``). The collection has no SQL kNN
index (``index="none"``): the layer searches in torch. LRFU keeps its meaning: each training
forward is one tick and touches every row read (counted per read); the coldest rows
(:meth:`ProductKeyMemory.coldest_rows`) are those :meth:`~ProductKeyMemory.reuse_rows` hands to
new content. ``flush()`` writes the rows touched or read with gradient since the last flush --
the only rows a sparse gradient, hence any optimizer that accepts one, can have changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memstore.errors import InvalidInputError
from memstore.types import CollectionOptions

from .config import ProductKeyConfig
from .memory_layer import MemoryLayer, MemoryRead
from .product_keys import product_topk
from .resident import ResidentIndex
from .rows_source import CollectionStore
from .sparse_rows import sparse_row_read

#: Rows drawn per chunk when initial values are random (bounds the temporary copy).
_INIT_CHUNK = 65_536


class ProductKeyMemory(MemoryLayer):
    """``(..., d) -> (..., d)`` memory layer over ``n_keys ** 2`` value rows."""

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
        _init_rows: bool = True,
        **options: Any,
    ) -> None:
        """``ProductKeyMemory(ProductKeyConfig(...))`` or ``ProductKeyMemory(d_model, n_keys=...,
        ...)``; rows go to ``store``/``collection`` when given (loaded from there if it holds
        them, else made and flushed there)."""
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
        index = ResidentIndex(
            2, cfg.row_value_dim, "l2", lrfu_lambda=cfg.lrfu_lambda, max_rows=cfg.n_rows
        )
        self._init_memory(index, store, collection)
        self._bind()
        if self._loaded:
            self._check_loaded_rows()
        elif _init_rows:
            self._init_table()
            if self._collection is not None:
                self.flush()

    n_rows = property(lambda self: self.config.n_rows)
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

    def _snapshot(self) -> None:
        """Nothing to remember: rows that can change are marked dirty when read (below), so no
        copy of a multi-GiB table is kept to diff against."""

    def _mark_optimizer_changes(self) -> None:
        """See :meth:`_snapshot`."""

    def addresses(self, rows: torch.Tensor) -> torch.Tensor:
        """``[i, j]`` (…, 2) of row numbers ``rows``: sub-key ``i`` of the first half, ``j`` of
        the second."""
        return torch.stack([rows // self.config.n_keys, rows % self.config.n_keys], dim=-1)

    @torch.no_grad()
    def _init_table(self) -> None:
        n, std = self.n_rows, self.config.value_init_std
        self.index.insert_blank(self.addresses(torch.arange(n)).float())  # ids 1..n, values 0
        if std > 0:
            g = torch.Generator().manual_seed(0x9E37)
            values = self.index.value_storage
            for start in range(0, n, _INIT_CHUNK):  # drawn on the CPU, chunk by chunk
                chunk = torch.empty(min(_INIT_CHUNK, n - start), values.shape[1])
                values[start : start + chunk.shape[0]] = chunk.normal_(0.0, std, generator=g)

    def _check_loaded_rows(self) -> None:
        n = self.n_rows
        index = self.index
        ok = index.n == n and bool(
            torch.equal(index.ids.cpu(), torch.arange(1, n + 1))
            and torch.equal(index.keys.detach().cpu(), self.addresses(torch.arange(n)).float())
        )
        if not ok:
            raise InvalidInputError(
                f"collection {self.collection_name!r} does not hold the {n} rows (ids 1..{n}, "
                f"keys [i, j]) of a product-key memory with n_keys={self.config.n_keys}"
            )

    def memory_parameters(self) -> list[nn.Parameter]:
        """The values Parameter (empty when read-only). Its gradient is sparse: train it with
        :class:`~memstore_torch.optim.RowwiseAdagrad` (or another optimizer that accepts sparse
        gradients, such as ``torch.optim.SparseAdam``)."""
        return [self.memory_values] if self.trainable_rows else []

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
        return self.index.eviction_order()[:m]

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
        self.index.update(rows, values=values)
        self.index.reset_lrfu(rows)
        self.index.count("evictions", rows.numel())
        self.index.count("inserts", rows.numel())

    # -------------------------------------------------------------- forward
    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head queries ``norm(W_q x)`` (T, heads, key_dim) for inputs ``x`` (T, d_model)."""
        cfg = self.config
        t = x.shape[0]
        q = self.query_proj(x)  # (T, H * dk)
        if cfg.query_norm == "batchnorm":
            q = self.query_norm(q)
        elif cfg.query_norm == "layernorm":
            q = self.query_norm(q.view(t, cfg.heads, cfg.key_dim))
        return q.reshape(t, cfg.heads, cfg.key_dim)

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and head, the ``k`` best rows: ``(scores (T, heads, k), rows (T, heads, k))``
        for inputs ``x`` (T, d_model), best first (ties: lower row). Differentiable in the
        scores."""
        cfg = self.config
        t, heads, dk = x.shape[0], cfg.heads, cfg.key_dim
        q = self.queries(x).reshape(t, heads, 2, dk // 2).permute(1, 2, 0, 3)  # (H, 2, T, dk/2)
        sub = self.sub_keys.to(q.dtype)
        s = torch.matmul(q, sub.transpose(-1, -2))  # (H, 2, T, n_keys)
        k = min(self.k, self.n_rows)
        scores, rows = product_topk(
            s[:, 0].reshape(heads * t, cfg.n_keys), s[:, 1].reshape(heads * t, cfg.n_keys), k
        )  # (H * T, k)
        return scores.view(heads, t, k).transpose(0, 1), rows.view(heads, t, k).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise InvalidInputError(f"expected (..., {self.d_model}) input, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        h = x.reshape(-1, self.d_model)
        values = self.memory_values
        scores, rows = self.search(h)  # (T, H, k)
        # softmax in at least float32 (bf16 activations), the weights in the values' precision
        weights = torch.softmax(
            scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)
        )
        weights = weights.to(values.dtype)
        if self.record_reads:  # what this forward reads: row r is stored with id r + 1
            self.last_read = MemoryRead(rows.detach() + 1, weights.detach(), tuple(lead))
        t = h.shape[0]
        reads = self.config.heads * scores.shape[-1]
        rows = rows.reshape(t, reads)
        out = sparse_row_read(weights.reshape(t, reads), rows, values)  # (T, dv)
        may_train = values.requires_grad and torch.is_grad_enabled()
        with torch.no_grad():
            if may_train:
                self.index.mark_rows_changed(rows.reshape(-1))  # a gradient may reach them
            if self.training or self.update_in_eval:
                self.index.touch(rows)  # one tick; every read counts
        out = out.to(h.dtype)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out.reshape(*lead, self.d_model)

    # -------------------------------------------------------------- config
    @classmethod
    def from_config(cls, saved: Mapping[str, Any], store: CollectionStore) -> ProductKeyMemory:
        """Rebuild the layer bound to its collection with rows loaded from ``store``."""
        config, collection = cls.split_saved_config(saved)
        layer = cls(config, store=store, collection=collection, _init_rows=False)
        if not layer._loaded:
            raise InvalidInputError(f"collection {collection!r} holds no rows")
        return layer

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"d_model={cfg.d_model}, rows={cfg.n_rows} ({cfg.n_keys}^2), heads={cfg.heads}, "
            f"k={cfg.k}, key_dim={cfg.key_dim}, value_dim={cfg.row_value_dim}, "
            f"collection={self.collection_name!r}"
        )
