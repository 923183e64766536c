"""A weighted read of a few rows of a large table, with a gradient for the rows it read only.

A product-key memory reads ``P`` rows per token out of millions. :class:`SparseRowRead` computes
``out[b] = sum_p weights[b, p] * values[rows[b, p]]`` without ever forming the ``(B, P, d)``
gathered rows (``torch.nn.functional.embedding_bag`` in ``sum`` mode with per-sample weights), and
its backward hands the table a *sparse* gradient: a coalesced COO tensor over the distinct rows
read, each row's gradient summed over its reads -- again an embedding bag, over ``grad_out``,
with one bag per distinct row. Nothing of size (tokens x rows) or (rows x d) is allocated; an
optimizer that accepts sparse gradients (:class:`memstore_torch.optim.RowwiseAdagrad`,
``torch.optim.SparseAdam``, ``torch.optim.SGD``) then updates those rows only.

Why not ``embedding_bag(..., sparse=True)`` itself: its gradient holds one row per *read*
(tokens x P rows of width d, uncoalesced), which at 2,048 tokens x 128 reads x 768 floats is
0.8 GB for the optimizer to coalesce again; here each distinct row appears once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .graphless import needs_graph, weighted_bag


class SparseRowRead(torch.autograd.Function):
    """``out (B, d) = sum_p weights (B, P) * values (N, d)[rows (B, P)]``.

    Gradients: ``weights`` dense (each read's dot product with ``grad_out``), ``values`` a
    coalesced sparse COO tensor of shape (N, d) over the distinct rows read; ``rows`` none.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, rows: torch.Tensor, values: torch.Tensor):
        ctx.save_for_backward(weights, rows, values)
        return F.embedding_bag(rows, values, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, rows, values = ctx.saved_tensors
        grad_out = grad_out.to(values.dtype).contiguous()
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:
            # d out[b] / d weights[b, p] = values[rows[b, p]]: the embedding bag's own backward
            # for per-sample weights computes those dot products without gathering the rows.
            with torch.enable_grad():
                w = weights.detach().requires_grad_(True)
                out = F.embedding_bag(rows, values.detach(), per_sample_weights=w, mode="sum")
                (grad_weights,) = torch.autograd.grad(out, w, grad_out)
        if ctx.needs_input_grad[2]:
            grad_values = row_gradient(grad_out, weights.to(values.dtype), rows, values.shape)
        return grad_weights, None, grad_values


def row_gradient(
    grad_out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """``d loss / d values`` as a coalesced sparse (N, d) tensor: for each distinct row read,
    the sum over its reads of ``weights[b, p] * grad_out[b]`` (one embedding bag per row)."""
    per_token = rows.shape[1]
    flat = rows.reshape(-1)
    ordered, perm = flat.sort(stable=True)  # each row's reads summed in token order, whatever
    # the row numbering (a paged cache's slots): the same sums, bit for bit
    distinct, counts = torch.unique_consecutive(ordered, return_counts=True)
    offsets = counts.cumsum(0) - counts
    tokens = perm // per_token
    summed = F.embedding_bag(
        tokens, grad_out, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[perm]
    )  # (U, d)
    return torch.sparse_coo_tensor(
        distinct[None], summed, tuple(shape), is_coalesced=True, check_invariants=False
    )


def sparse_row_read(
    weights: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Functional form of :class:`SparseRowRead`: weights (B, P), rows (B, P) int64, values
    (N, d) -> (B, d)."""
    if not needs_graph(weights, values):  # decoding, evaluation: the bag alone
        return weighted_bag(rows, values, weights)
    return SparseRowRead.apply(weights, rows, values)
