"""Memory reads where no gradient is wanted (decoding, evaluation under ``torch.no_grad``).

A training read goes through an autograd Function that saves what its backward needs; a
decoding step reads one token or a few, where that bookkeeping -- and the Python checks of
``torch.nn.functional`` -- cost as much as the read itself. Callers test :func:`needs_graph` and
take the direct path when it is False; the answer is the same read.
"""

from __future__ import annotations

import functools

import torch


def needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether an autograd graph would be recorded through any of ``tensors`` (grad mode on and
    one of them requires a gradient)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def weighted_bag(rows: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out (B, d) = sum_p weights (B, P) * values (N, d)[rows (B, P)]``: what
    ``F.embedding_bag(rows, values, per_sample_weights=weights, mode="sum")`` computes, called on
    torch's op itself. No gradient reaches ``values`` through it."""
    bags, per_bag = rows.shape
    offsets = _offsets(bags, per_bag, rows.device)
    return torch.embedding_bag(values, rows.reshape(-1), offsets, False, 0, False,
                               weights.reshape(-1), False, None)[0]  # fmt: skip


@functools.lru_cache(maxsize=256)
def _offsets(bags: int, per_bag: int, device: torch.device) -> torch.Tensor:
    """Where each of ``bags`` equal bags starts (made once per shape: read, never written)."""
    return torch.arange(0, bags * per_bag, per_bag, device=device)
