"""AssociativeMemory: attention over the top-k rows of a growing key/value memory.

Per head (docs/design.md, Associative memory): ``q, k, v = W_q x, W_k x, W_v x`` -> top-k stored keys for each ``q``
-> insert the ``(k, v)`` pairs that are novel -> ``softmax(q . K'^T / sqrt(d)) V'`` -> ``W_o``.
All heads share one table (one collection), each with its own projections.

Within a training step the pairs inserted by a sequence are visible to that sequence's later
positions only (causal: position t sees pairs from positions <= t), so a language model cannot read
the future through its memory. Those rows reach the table for good at the start of the next
forward (the backward pass still needs the table as it was read), and their gradients follow the
straight-through rules: ``dKeyInserted = dKeyReturned``, ``dValueInserted = dValueReturned``; every
returned key also passes its gradient to its query (``dQuery = dKeyReturned``). Stored rows, when
trainable, receive their exact (sparse) gradients through the gather.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from memstore.errors import InvalidInputError
from memstore.types import CollectionOptions

from . import knn
from .config import AssociativeConfig
from .functions import straight_through_insert, straight_through_query
from .memory_layer import MemoryLayer, MemoryRead
from .resident import ResidentHits, ResidentIndex
from .rows_source import CollectionStore


class AssociativeMemory(MemoryLayer):
    """Drop-in ``(B, T, d) -> (B, T, d)`` memory layer that writes what it reads about."""

    config_class = AssociativeConfig

    def __init__(
        self,
        config: AssociativeConfig | int | None = None,
        /,
        *,
        store: CollectionStore | None = None,
        collection: str | None = None,
        **options: Any,
    ) -> None:
        """``AssociativeMemory(AssociativeConfig(...))`` or ``AssociativeMemory(d_model,
        heads=..., ...)`` (keyword options: the fields of
        :class:`~memstore_torch.config.AssociativeConfig`, which also override a given config's);
        rows go to ``store``/``collection`` when given."""
        super().__init__()
        self.config = cfg = self.make_config(config, options)
        d, heads = cfg.d_model, cfg.heads
        self.query_proj = nn.Linear(d, heads * cfg.key_dim, bias=False)
        self.key_proj = nn.Linear(d, heads * cfg.key_dim, bias=False)
        self.value_proj = nn.Linear(d, heads * cfg.value_dim, bias=False)
        self.out_proj = nn.Linear(heads * cfg.value_dim, d)
        index = ResidentIndex(
            cfg.key_dim, cfg.value_dim, "ip", lrfu_lambda=cfg.lrfu_lambda, max_rows=cfg.capacity
        )
        self._init_memory(index, store, collection)
        self._bind()

    def collection_options(self) -> CollectionOptions:
        """An ``ip`` collection of per-head key/value pairs, as many as the table holds."""
        cfg = self.config
        return CollectionOptions(
            key_dim=cfg.key_dim,
            value_dim=cfg.value_dim,
            metric="ip",
            lrfu_lambda=cfg.lrfu_lambda,
            capacity=cfg.capacity,
        )

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise InvalidInputError(f"expected (B, T, {self.d_model}) input, got {tuple(x.shape)}")
        self._apply_pending()
        B, T, _ = x.shape
        H, dk, dv = self.heads, self.key_dim, self.value_dim
        M = B * T * H  # one query per (batch, position, head), flattened in that order
        rows_dtype = self.memory_keys.dtype  # read in the rows' precision (see FeaturalMemory)
        q = self.query_proj(x).reshape(M, dk).to(rows_dtype)
        key = self.key_proj(x).reshape(M, dk).to(rows_dtype)
        val = self.value_proj(x).reshape(M, dv).to(rows_dtype)
        writing = self.training or self.update_in_eval

        # Stored rows: exact top-k by q . k over the table as it stands.
        n = self.index.n
        kk = min(self.k, n) if n else 0
        if kk:
            mem = self.index.search(q.detach(), kk)
            mem_scores = -mem.distances  # (M, kk)
        else:
            mem = None
            mem_scores = q.new_zeros((M, 0))

        # Pairs of this step that are novel; visible causally within their own sequence.
        inserted = self._novel_mask(key.detach()) if writing and self.novel is not None else None
        if inserted is not None and bool(inserted.any()):
            loc_scores, loc_src = self._local_candidates(q.detach(), key.detach(), inserted, B, T)
        else:
            loc_scores = q.new_zeros((M, 0))
            loc_src = torch.zeros((M, 0), dtype=torch.int64, device=q.device)

        all_scores = torch.cat([mem_scores, loc_scores], dim=1)  # (M, kk + kl)
        if all_scores.shape[1] == 0:
            out = val.new_zeros((M, dv))
            if self.record_reads:
                self.last_read = MemoryRead.empty(B * T, H, (B, T), x.device)
        else:
            kt = min(self.k, all_scores.shape[1])
            top_scores, pick = all_scores.topk(kt, dim=1)  # (M, kt)
            from_mem = pick < kk
            valid = torch.isfinite(top_scores)
            mem_slot = (
                mem.slots.gather(1, pick.clamp_max(max(kk - 1, 0)))
                if kk
                else torch.zeros_like(pick)
            )
            source = torch.where(
                from_mem | ~valid,
                torch.full_like(pick, -1),
                loc_src.gather(1, (pick - kk).clamp(0, max(loc_src.shape[1] - 1, 0)))
                if loc_src.shape[1]
                else torch.full_like(pick, -1),
            )
            slot = torch.where(from_mem & valid, mem_slot, torch.zeros_like(mem_slot))
            # Returned rows (M, kt, d): stored rows through the (trainable) table, inserted rows as
            # detached copies that hand their gradients back by the straight-through rules.
            use_mem = (from_mem & valid)[..., None]
            src_safe = source.clamp_min(0)
            ret_k = torch.where(use_mem, self.memory_keys[slot], key.detach()[src_safe])
            ret_v = torch.where(use_mem, self.memory_values[slot], val.detach()[src_safe])
            if self.st_insert:
                ret_k, ret_v = straight_through_insert(ret_k, ret_v, source, key, val)
            if self.st_query:
                ret_k = straight_through_query(q, ret_k)
            logits = torch.einsum("md,mkd->mk", q, ret_k) / math.sqrt(dk)
            logits = logits.masked_fill(~valid, -math.inf)
            attn = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows with no candidate -> 0
            out = torch.einsum("mk,mkd->md", attn, ret_v)  # (M, dv)
            hit_slots = torch.where(from_mem & valid, mem_slot, torch.full_like(pick, -1))
            if self.record_reads:  # rows inserted in this forward have no stored id yet: -1
                read_ids = torch.where(hit_slots >= 0, self.index.ids[hit_slots.clamp_min(0)], -1)
                self.last_read = MemoryRead(
                    read_ids.reshape(B * T, H, kt),
                    attn.detach().reshape(B * T, H, kt).clone(),
                    (B, T),
                )
        if writing:
            # One LRFU tick per training forward, even when nothing stored was read.
            self.index.touch(hit_slots if kk and all_scores.shape[1] else q.new_zeros(0).long())
            self._queue_maintenance(q.detach(), mem, key.detach(), val.detach(), inserted)
        return self.out_proj(out.reshape(B, T, H * dv).to(x.dtype))

    @torch.no_grad()
    def _novel_mask(self, key: torch.Tensor) -> torch.Tensor:
        """(M,) True where the key's nearest stored key is farther than ``novel`` (cosine)."""
        if self.index.n == 0:
            return torch.ones(key.shape[0], dtype=torch.bool, device=key.device)
        dist, _ = knn.search(key, self.index.keys.detach(), 1, "cosine", backend=self.index.backend)
        return dist[:, 0] > self.novel

    @torch.no_grad()
    def _local_candidates(
        self, q: torch.Tensor, key: torch.Tensor, inserted: torch.Tensor, B: int, T: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top pairs inserted earlier in the same sequence and head: scores and flat sources."""
        H, dk = self.heads, self.key_dim
        qh = q.reshape(B, T, H, dk).transpose(1, 2)  # (B, H, T, dk)
        kh = key.reshape(B, T, H, dk).transpose(1, 2)  # (B, H, T, dk)
        scores = qh @ kh.transpose(-1, -2)  # (B, H, T, T): query position x key position
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        ins = inserted.reshape(B, T, H).transpose(1, 2)[:, :, None, :]  # (B, H, 1, T)
        scores = scores.masked_fill(~(causal & ins), -math.inf)
        kl = min(self.k, T)
        s, pos = scores.topk(kl, dim=-1)  # (B, H, T, kl)
        b = torch.arange(B, device=q.device)[:, None, None, None]
        h = torch.arange(H, device=q.device)[None, :, None, None]
        src = (b * T + pos) * H + h  # flat index of the (batch, position, head) pair
        return (
            s.permute(0, 2, 1, 3).reshape(B * T * H, kl),
            src.permute(0, 2, 1, 3).reshape(B * T * H, kl),
        )

    def _queue_maintenance(self, q, mem: ResidentHits | None, key, val, inserted) -> None:
        if self.recombine is not None and mem is not None:
            self._queue_recombine(q, mem.distances, mem.ids)
        if inserted is not None and bool(inserted.any()):
            keys, values = key[inserted], val[inserted]
            keep = min(keys.shape[0], self.capacity)
            self._queue_insert(keys[-keep:], values[-keep:])

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"d_model={cfg.d_model}, heads={cfg.heads}, k={cfg.k}, rows={self.index.n}/"
            f"{cfg.capacity}, novel={cfg.novel}, collection={self.collection_name!r}"
        )
