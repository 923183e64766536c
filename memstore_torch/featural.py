"""FeaturalMemory: a feed-forward layer whose key/value rows live in a memstore collection.

Seed steps 1-4 (docs/design.md, Featural memory): ``q = W_q x`` -> top-k stored keys by ``q . key + bias`` ->
weighted sum of their values (``softmax(score / tau)`` or an activation such as GELU) -> ``W_o``.
A GPT-2 MLP ``c_proj(act(c_fc x))`` is exactly this with ``n_inner`` rows, so
:meth:`FeaturalMemory.from_mlp` turns one into the other; with ``k < n_inner`` the mean of the
unselected rows' contribution (the "tail") is folded into the trainable output bias.

Each row is stored as key ``[k, b]`` (the bias as an extra coordinate) so that an ``ip`` collection
queried with ``[q, 1]`` gives exactly the layer's scores.

Maintenance that moves rows (inserting novel queries, recombining near-duplicates) is queued during
a training forward and applied at the start of the next forward or at :meth:`flush`, because the
backward pass still needs the rows exactly as they were read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memstore.errors import InvalidInputError
from memstore.types import CollectionOptions

from .config import FeaturalConfig
from .functions import make_weight_fn, topk_memory_read
from .memory_layer import MemoryLayer, MemoryRead
from .resident import ResidentIndex
from .rows_source import CollectionStore

_ACTIVATION_WEIGHTING = {
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "ReLU": "relu",
}


class FeaturalMemory(MemoryLayer):
    """Drop-in ``(B, T, d) -> (B, T, d)`` replacement for a transformer MLP."""

    config_class = FeaturalConfig
    #: ``self.dropout`` is the ``nn.Dropout`` submodule; the rate is ``config.dropout``.
    unmirrored_options = ("dropout",)

    def __init__(
        self,
        config: FeaturalConfig | int | None = None,
        /,
        *,
        store: CollectionStore | None = None,
        collection: str | None = None,
        _init_rows: bool = True,
        **options: Any,
    ) -> None:
        """``FeaturalMemory(FeaturalConfig(...))`` or ``FeaturalMemory(d_model, k=..., ...)``
        (keyword options: the fields of :class:`~memstore_torch.config.FeaturalConfig`, which
        also override a given config's); rows go to ``store``/``collection`` when given."""
        super().__init__()
        self.config = cfg = self.make_config(config, options)
        self._weight_fn = make_weight_fn(cfg.weighting, cfg.temperature)

        # q = W_q x only when key_dim is given; from_mlp uses the identity.
        d = cfg.d_model
        self.query_proj = None if cfg.key_dim is None else nn.Linear(d, cfg.key_dim, bias=False)
        self.out_proj = None if cfg.value_dim is None else nn.Linear(cfg.value_dim, d, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(d))  # c_proj bias + tail correction
        self.dropout = nn.Dropout(cfg.dropout)

        index = ResidentIndex(
            cfg.head_dim + 1,
            cfg.row_value_dim,
            "ip",
            lrfu_lambda=cfg.lrfu_lambda,
            max_rows=cfg.n_rows,
        )
        self._init_memory(index, store, collection)
        self._bind()
        if not self._loaded and _init_rows:
            self._init_random_rows()
            if self._collection is not None:
                self.flush()

    # ``head_dim``: query width per head; ``row_value_dim``: width of a row's value.
    head_dim = property(lambda self: self.config.head_dim)
    row_value_dim = property(lambda self: self.config.row_value_dim)
    dropout_p = property(lambda self: self.config.dropout)

    # -------------------------------------------------------------- construction helpers
    def collection_options(self) -> CollectionOptions:
        """An ``ip`` collection of ``[key, bias]`` rows, as many as the layer holds."""
        cfg = self.config
        return CollectionOptions(
            key_dim=cfg.head_dim + 1,
            value_dim=cfg.row_value_dim,
            metric="ip",
            lrfu_lambda=cfg.lrfu_lambda,
            capacity=cfg.n_rows,
        )

    def _init_random_rows(self) -> None:
        g = torch.Generator().manual_seed(0x5EED)
        keys = torch.randn(self.n_rows, self.head_dim, generator=g) / math.sqrt(self.head_dim)
        values = torch.randn(self.n_rows, self.row_value_dim, generator=g) * 0.02
        self.index.insert(torch.cat([keys, torch.zeros(self.n_rows, 1)], dim=1), values)

    def set_rows(self, keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor) -> None:
        """Replace every row: keys (n, head_dim), bias (n,), values (n, row_value_dim)."""
        n = keys.shape[0]
        if n > self.n_rows:
            raise InvalidInputError(f"{n} rows do not fit n_rows={self.n_rows}")
        self.index.replace_all(torch.cat([keys, bias[:, None]], dim=1).float(), values.float())

    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        k: int = 128,
        calibration: torch.Tensor | None = None,
        store: CollectionStore | None = None,
        collection: str | None = None,
        *,
        trainable_rows: bool = True,
        **kwargs: Any,
    ) -> FeaturalMemory:
        """Featural memory equal to a GPT-2 MLP (``c_fc``, ``act``, ``c_proj``) at ``k = n_inner``.

        ``calibration`` (N, d) or (B, T, d): sample inputs of this MLP; with ``k < n_inner`` the
        mean contribution of the rows top-k leaves out is added to the output bias (docs/design.md,
        The tail correction: without it a top-k GELU MLP loses badly). Rows go to ``store``/``collection``
        (replacing what the collection held) when given.
        """
        fc_w, fc_b = _linear_weight(mlp.c_fc)  # (n_inner, d), (n_inner,)
        proj_w, proj_b = _linear_weight(mlp.c_proj)  # (d, n_inner), (d,)
        n_inner, d_model = fc_w.shape
        act_name = type(mlp.act).__name__
        weighting = _ACTIVATION_WEIGHTING.get(act_name)
        if weighting is None:
            raise InvalidInputError(f"unsupported MLP activation {act_name}")
        dropout = getattr(getattr(mlp, "dropout", None), "p", 0.0)
        layer = cls(
            d_model,
            n_rows=kwargs.pop("n_rows", n_inner),
            k=min(k, n_inner),
            weighting=weighting,
            trainable_rows=trainable_rows,
            dropout=kwargs.pop("dropout", dropout),
            _init_rows=False,
            **kwargs,
        )
        values = proj_w.T.contiguous()  # (n_inner, d)
        layer.set_rows(fc_w, fc_b, values)
        with torch.no_grad():
            layer.out_bias.copy_(proj_b)
            if k < n_inner:
                if calibration is None:
                    warnings.warn(
                        "from_mlp with k < n_inner and no calibration inputs: no tail correction",
                        stacklevel=2,
                    )
                else:
                    layer.out_bias += tail_correction(
                        calibration.reshape(-1, d_model).float(),
                        fc_w,
                        fc_b,
                        values,
                        k,
                        layer._weight_fn,
                    )
        if store is not None:
            layer.attach(store, collection)
        return layer.to(fc_w.device).train(mlp.training)  # the mode of the MLP it replaces

    def attach(self, store: CollectionStore, collection: str | None) -> None:
        """Bind to ``store``/``collection`` and write this layer's rows there, replacing any."""
        if not collection:
            raise InvalidInputError("attach needs a collection name")
        self._store, self.collection_name = store, collection
        coll = self._collection_for(store, collection)
        self._collection = coll
        # Our rows are written over whatever the collection held; its other rows are deleted.
        self.index.adopt_store(coll.export_rows().ids if len(coll) else [])
        self.flush()

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise InvalidInputError(f"expected (..., {self.d_model}) input, got {tuple(x.shape)}")
        if self._pending:  # (a decoding step has none: skip the no_grad call)
            self._apply_pending()
        lead = x.shape[:-1]
        h = x.reshape(-1, self.d_model)  # (N, d)
        q = h if self.query_proj is None else self.query_proj(h)  # (N, H * dh)
        # The rows keep their own dtype (float32 unless the layer was converted): reduced-precision
        # activations (autocast) are read in the rows' precision and cast back on the way out.
        q = q.reshape(-1, self.head_dim)  # (N * H, dh)
        if q.dtype != self.memory_keys.dtype:
            q = q.to(self.memory_keys.dtype)
        n = self.index.n
        if n == 0:
            out = h.new_zeros((h.shape[0], self.row_value_dim))
            if self.record_reads:
                self.last_read = MemoryRead.empty(h.shape[0], self.heads, tuple(lead), h.device)
        else:
            rows = self.memory_keys[:n]  # (n, dh + 1): key and bias
            out, idx, *weights = topk_memory_read(
                q,
                rows[:, : self.head_dim],
                rows[:, self.head_dim],
                self.memory_values[:n],
                min(self.k, n),
                self._weight_fn,
                return_weights=self.record_reads,
            )  # (N * H, dv), (N * H, k), [(N * H, k)]
            if self.record_reads:
                self.last_read = MemoryRead(
                    self.index.ids[idx].reshape(h.shape[0], self.heads, -1),
                    weights[0].reshape(h.shape[0], self.heads, -1),
                    tuple(lead),
                )
            if self.heads > 1:
                out = out.reshape(h.shape[0], self.heads, -1).sum(1)
            if out.dtype != h.dtype:
                out = out.to(h.dtype)  # (N, dv)
            if self.training or self.update_in_eval:
                self._after_read(q.detach(), idx)
        if self.out_proj is not None:
            out = self.out_proj(out)  # (N, d)
        out = out + self.out_bias
        if self.training:  # (an identity in eval, and a module call costs a decoding step)
            out = self.dropout(out)
        return out.reshape(*lead, self.d_model)

    @torch.no_grad()
    def _after_read(self, q: torch.Tensor, idx: torch.Tensor) -> None:
        """LRFU touches now; row-moving maintenance queued for the next forward."""
        n = self.index.n
        if idx.shape[1] >= n:  # dense read: every row hit once by every query
            self.index.touch_counts(torch.full((n,), idx.shape[0], device=idx.device))
        else:
            self.index.touch(idx)
        if self.novel is None and self.recombine is None:
            return
        r = min(idx.shape[1], 4)
        q_aug = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)  # (M, dh + 1): scores = ip
        if idx.shape[1] >= n:  # dense read: idx is not ordered by score, find the best rows
            top = (q_aug @ self.index.keys.T).topk(r, dim=1).indices  # (M, r)
        else:
            top = idx[:, :r]  # (M, r): topk returns them best first
        rows = self.index.keys[top]  # (M, r, dh + 1)
        dist = -(rows * q_aug[:, None, :]).sum(-1)  # ip distance of the top hits (M, r)
        if self.recombine is not None:
            self._queue_recombine(q_aug, dist, self.index.ids[top])
        if self.novel is not None:
            fresh = dist[:, 0] > self.novel
            if bool(fresh.any()):
                new_keys = q_aug[fresh][: self.n_rows].clone()
                new_keys[:, -1] = 0.0  # a new row starts with bias 0 and value 0
                self._queue_insert(
                    new_keys, new_keys.new_zeros((new_keys.shape[0], self.row_value_dim))
                )

    # -------------------------------------------------------------- config
    @classmethod
    def from_config(cls, saved: Mapping[str, Any], store: CollectionStore) -> FeaturalMemory:
        """Rebuild the layer bound to its collection with rows loaded from ``store``."""
        config, collection = cls.split_saved_config(saved)
        layer = cls(config, store=store, collection=collection, _init_rows=False)
        if not layer._loaded:
            raise InvalidInputError(f"collection {collection!r} holds no rows")
        return layer

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"d_model={cfg.d_model}, rows={self.index.n}/{cfg.n_rows}, k={cfg.k}, "
            f"heads={cfg.heads}, weighting={cfg.weighting}, collection={self.collection_name!r}"
        )


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight and (out,) bias of an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    if isinstance(module, nn.Linear):
        return w, b
    return w.T.contiguous(), b  # Conv1D stores (in, out)


@torch.no_grad()
def tail_correction(
    x: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor,
    k: int,
    weight_fn,
    chunk: int = 1024,
) -> torch.Tensor:
    """Mean over ``x`` (N, d) of the contribution of the rows top-k leaves out: full MLP output
    minus the top-k output (d,)."""
    total = torch.zeros(values.shape[1], dtype=torch.float64, device=values.device)
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk].to(keys.device)
        scores = torch.addmm(bias, xs, keys.T)  # (c, n)
        full = weight_fn(scores) @ values
        s_top, idx = scores.topk(k, dim=1)
        sparse = torch.zeros_like(scores).scatter_(1, idx, weight_fn(s_top)) @ values
        total += (full - sparse).double().sum(0)
    return (total / max(1, x.shape[0])).to(values.dtype)
