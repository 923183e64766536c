"""Autograd Functions: the top-k memory read and the seed's straight-through rules.

Top-k selection and insertion into a database are not differentiable. What *is* differentiable is
what happens to the rows once chosen, and docs/design.md (Straight-through gradients) gives three straight-through
rules for what is not:

* ``dQuery = dKeyReturned`` -- a returned key is treated as "the query plus noise", so the gradient
  that reaches a returned key also reaches the query that fetched it (:class:`StraightThroughQuery`).
* ``dKeyInserted = dKeyReturned`` and ``dValueInserted = dValueReturned`` -- a row inserted in this
  step and returned in this step hands its gradients back to the tensors it was inserted from
  (:class:`StraightThroughInsert`).

:class:`TopKMemoryRead` is the featural read ``W_sparse @ V`` with exact gradients through the
selected rows. It never gathers a (N, k, d) tensor: both passes are dense matrix products with a
scatter/gather of k numbers per query, so it costs what the MLP it replaces costs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .graphless import needs_graph, weighted_bag

WeightFn = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(s: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` (tanh approximation)."""
    return F.gelu(s, approximate="tanh")


def make_weight_fn(weighting: str, temperature: float = 1.0) -> WeightFn:
    """Scores (N, k) -> weights (N, k). Softmax normalises over the k selected rows only."""
    if weighting == "softmax":
        return lambda s: torch.softmax(s / temperature, dim=-1)
    if weighting == "gelu":
        return lambda s: F.gelu(s / temperature) if temperature != 1.0 else F.gelu(s)
    if weighting in ("gelu_tanh", "gelu_new"):
        return lambda s: gelu_tanh(s / temperature) if temperature != 1.0 else gelu_tanh(s)
    if weighting == "relu":
        return lambda s: torch.relu(s / temperature)
    from memstore.errors import InvalidInputError

    raise InvalidInputError(
        f"unknown weighting {weighting!r}; expected softmax, gelu, gelu_tanh (= gelu_new) or relu"
    )


def _weights_backward(weight_fn: WeightFn, s: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
    """d loss / d scores for the (N, k) selected scores; small, so local autograd is exact and cheap."""
    with torch.enable_grad():
        s_ = s.detach().requires_grad_(True)
        (grad_s,) = torch.autograd.grad(weight_fn(s_), s_, grad_w)
    return grad_s


class TopKMemoryRead(torch.autograd.Function):
    """``out = scatter(topk(q K^T + b), weights) @ V`` with exact gradients for q, K, b and V.

    Shapes: q (N, dk), keys (n, dk), bias (n,), values (n, dv) -> out (N, dv), idx (N, k),
    weights (N, k) or None.
    ``idx`` is returned (non-differentiable) so the caller can count hits for LRFU. With
    ``return_weights`` the weights each selected row's value got are returned too (a copy,
    non-differentiable), so a caller can record exactly what this read selected and how much each
    row counted (memory tracing, ``memstore trace``) instead of re-computing it; else None.
    With ``k >= n`` no selection happens and this is exactly ``act(q K^T + b) @ V``.
    """

    @staticmethod
    def forward(ctx, q, keys, bias, values, k: int, weight_fn: WeightFn, return_weights=False):
        n = keys.shape[0]
        scores = torch.addmm(bias, q, keys.T)  # (N, n)
        if k >= n:
            weights = weight_fn(scores)  # dense: the MLP itself
            idx = None
            w_full = weights
            s_sel = scores
        else:
            s_sel, idx = scores.topk(k, dim=1)  # (N, k)
            weights = weight_fn(s_sel)
            w_full = scores.zero_().scatter_(1, idx, weights)  # reuse the (N, n) buffer
        out = w_full @ values  # (N, dv)
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(q, keys, values, s_sel, weights, idx)
        if idx is None:  # every row is "selected"
            idx = torch.arange(n, device=q.device).expand(q.shape[0], n)
        idx_out = idx.clone()
        ctx.mark_non_differentiable(idx_out)
        if not return_weights:
            return out, idx_out, None
        weights_out = weights.detach().clone()
        ctx.mark_non_differentiable(weights_out)
        return out, idx_out, weights_out

    @staticmethod
    def backward(ctx, grad_out, _grad_idx, _grad_weights=None):
        q, keys, values, s_sel, weights, idx = ctx.saved_tensors
        need_q, need_k, need_b, need_v = ctx.needs_input_grad[:4]
        grad_q = grad_k = grad_b = grad_v = None
        grad_out = grad_out.contiguous()
        if need_v:
            if idx is None:
                grad_v = weights.T @ grad_out
            else:
                w_full = torch.zeros(
                    (q.shape[0], keys.shape[0]), dtype=weights.dtype, device=weights.device
                ).scatter_(1, idx, weights)
                grad_v = w_full.T @ grad_out  # (n, dv)
                del w_full
        if need_q or need_k or need_b:
            grad_w_full = grad_out @ values.T  # (N, n)
            grad_w = grad_w_full if idx is None else grad_w_full.gather(1, idx)
            grad_s = _weights_backward(ctx.weight_fn, s_sel, grad_w)
            grad_s_full = grad_s if idx is None else grad_w_full.zero_().scatter_(1, idx, grad_s)
            if need_q:
                grad_q = grad_s_full @ keys  # (N, dk)
            if need_k:
                grad_k = grad_s_full.T @ q  # (n, dk), nonzero only on selected rows
            if need_b:
                grad_b = grad_s_full.sum(0)
        return grad_q, grad_k, grad_b, grad_v, None, None, None


def topk_memory_read(
    q: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor,
    k: int,
    weight_fn: WeightFn,
    *,
    return_weights: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Functional form of :class:`TopKMemoryRead`: ``(out, idx)``, or ``(out, idx, weights)``
    with ``return_weights``; see there for shapes.

    Under ``torch.autocast`` the read runs in the autocast dtype: its inputs are cast first (the
    casts are differentiable, so fp32 rows still get fp32 gradients), because autograd runs a
    Function's backward outside autocast, where mixed bf16/fp32 products would fail.
    """
    # no gradient wanted (decoding, evaluation): the same read without the Function's bookkeeping
    read = TopKMemoryRead.apply if needs_graph(q, keys, bias, values) else _read_without_graph
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            q, keys, bias, values = (t.to(dtype) for t in (q, keys, bias, values))
            out, idx, weights = read(q, keys, bias, values, k, weight_fn, return_weights)
    else:
        out, idx, weights = read(q, keys, bias, values, k, weight_fn, return_weights)
    return (out, idx, weights) if return_weights else (out, idx)


def _read_without_graph(q, keys, bias, values, k: int, weight_fn: WeightFn, return_weights: bool):
    """:class:`TopKMemoryRead`'s forward where no gradient is wanted (decoding, evaluation):
    the ``k`` selected value rows are read by index (an embedding bag) instead of through the
    dense ``(N, n)`` weight matrix the backward needs, so a token reads ``k`` rows, not ``n``.
    The same selection and weights; the sum differs from the dense product by rounding only.
    Called with the inputs already in one dtype, outside autocast (:func:`topk_memory_read`)."""
    n = keys.shape[0]
    scores = torch.addmm(bias, q, keys.T)  # (N, n)
    if k >= n:
        weights = weight_fn(scores)  # dense: the MLP itself
        out = weights @ values
        idx = torch.arange(n, device=q.device).expand(q.shape[0], n)
    else:
        s_sel, idx = scores.topk(k, dim=1)  # (N, k)
        weights = weight_fn(s_sel)
        out = weighted_bag(idx, values, weights)  # (N, dv)
    return out, idx, (weights.clone() if return_weights else None)


class StraightThroughQuery(torch.autograd.Function):
    """Rule 1, ``dQuery = dKeyReturned``: identity on the returned keys (…, k, d); in backward the
    query (…, d) receives the sum of its k returned keys' gradients, and the returned keys keep
    theirs (so trainable rows and inserted keys still get them)."""

    @staticmethod
    def forward(ctx, query, returned_keys):
        return returned_keys.view_as(returned_keys)

    @staticmethod
    def backward(ctx, grad_returned):
        grad_query = grad_returned.sum(dim=-2) if ctx.needs_input_grad[0] else None
        return grad_query, grad_returned


def straight_through_query(query: torch.Tensor, returned_keys: torch.Tensor) -> torch.Tensor:
    """Returned keys (…, k, d) that pass their gradient to the query (…, d) as well."""
    return StraightThroughQuery.apply(query, returned_keys)


class StraightThroughInsert(torch.autograd.Function):
    """Rules 2 and 3: ``dKeyInserted = dKeyReturned``, ``dValueInserted = dValueReturned``.

    Identity on returned keys (M, k, dk) and values (M, k, dv). ``source`` (M, k) int64 names, for
    each returned row, the position in ``inserted_keys`` (I, dk) / ``inserted_values`` (I, dv) it was
    inserted from in this step, or -1 for rows that were already stored. In backward each inserted
    key/value receives the summed gradient of every returned copy of it.
    """

    @staticmethod
    def forward(ctx, returned_keys, returned_values, source, inserted_keys, inserted_values):
        ctx.save_for_backward(source)
        ctx.n_inserted = inserted_keys.shape[0]
        ctx.mark_non_differentiable(source)
        return returned_keys.view_as(returned_keys), returned_values.view_as(returned_values)

    @staticmethod
    def backward(ctx, grad_keys, grad_values):
        (source,) = ctx.saved_tensors
        flat_source = source.reshape(-1)
        hit = flat_source >= 0
        positions = flat_source[hit]
        grad_ins_k = grad_ins_v = None
        if ctx.needs_input_grad[3]:
            gk = grad_keys.reshape(-1, grad_keys.shape[-1])[hit]
            grad_ins_k = gk.new_zeros((ctx.n_inserted, gk.shape[-1])).index_add_(0, positions, gk)
        if ctx.needs_input_grad[4]:
            gv = grad_values.reshape(-1, grad_values.shape[-1])[hit]
            grad_ins_v = gv.new_zeros((ctx.n_inserted, gv.shape[-1])).index_add_(0, positions, gv)
        return grad_keys, grad_values, None, grad_ins_k, grad_ins_v


def straight_through_insert(
    returned_keys: torch.Tensor,
    returned_values: torch.Tensor,
    source: torch.Tensor,
    inserted_keys: torch.Tensor,
    inserted_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of :class:`StraightThroughInsert`."""
    return StraightThroughInsert.apply(
        returned_keys, returned_values, source, inserted_keys, inserted_values
    )
