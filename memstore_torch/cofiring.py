"""Recombination for product-key memory: near-duplicate rows that fire together become one.

A product-key memory cannot merge rows the way the store does (rows whose *keys* lie near one
query): its keys are implicit addresses that never move. What it can merge are rows that fire
together and hold the same content. Two rows read by one token and head at adjacent ranks of its
top-k were both selected by that query; when their values are also near-duplicates -- relative
distance ``|v_a - v_b| / max(|v_a|, |v_b|)`` at most ``threshold`` -- the memory spends two rows on
one piece of content. They are merged by the store's own rule (:func:`memstore.recombine.
merge_group`, with the token's scores as the nearness: the better-scored row keeps its id, the
value is the pair's ``softmax``-weighted mean, crf decayed and summed, hits summed), except that
the keeper keeps its own key, its address. The other row becomes blank, free for new content like
a row :meth:`~memstore_torch.ProductKeyMemory.reuse_rows` hands out.

Pairs are taken greedily, nearest values first, each row in at most one merge per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Candidate pairs whose values are compared per call, at most (the most frequent pairs first).
MAX_CANDIDATES = 65_536


def cofiring_pairs(rows: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Distinct adjacent-rank pairs of each token and head's read, ``rows`` / ``weights``
    ``(T, heads, k)`` best first: ``(first, second, weight_first, weight_second, times)``, the
    better-ranked row first, the weights of the pair's first occurrence, and how many reads
    made the pair (most frequent first, at most :data:`MAX_CANDIDATES`)."""
    a, b = rows[..., :-1].reshape(-1), rows[..., 1:].reshape(-1)
    wa, wb = weights[..., :-1].reshape(-1), weights[..., 1:].reshape(-1)
    keep = (a >= 0) & (b >= 0) & (a != b)
    a, b, wa, wb = a[keep], b[keep], wa[keep], wb[keep]
    if a.numel() == 0:
        empty = a.new_zeros(0)
        return empty, empty, wa[:0], wb[:0], empty
    n = int(torch.maximum(a.max(), b.max())) + 1
    pair = a * n + b
    distinct, first, times = first_occurrences(pair)
    order = times.argsort(descending=True, stable=True)[:MAX_CANDIDATES]
    first, times = first[order], times[order]
    return a[first], b[first], wa[first], wb[first], times


def first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(distinct values, position of each one's first occurrence, its count)``."""
    distinct, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full_like(distinct, values.numel()).scatter_reduce_(
        0, inverse, positions, reduce="amin"
    )
    return distinct, first, counts


def near_duplicates(
    first: torch.Tensor,
    second: torch.Tensor,
    values_of: Callable[[torch.Tensor], torch.Tensor],
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of candidate pairs, the disjoint ones to merge: ``(positions into the candidates, their
    relative distances)``, greedy by distance. ``values_of(rows)`` gives rows' values."""
    if first.numel() == 0:
        return first, torch.zeros(0, dtype=torch.float64)
    va, vb = values_of(first).double(), values_of(second).double()
    scale = torch.maximum(va.norm(dim=1), vb.norm(dim=1))
    distance = (va - vb).norm(dim=1) / scale.clamp_min(torch.finfo(torch.float64).tiny)
    eligible = ((scale > 0) & (distance <= threshold)).nonzero().reshape(-1)
    eligible = eligible[distance[eligible].argsort(stable=True)]
    taken: set[int] = set()
    chosen: list[int] = []
    for position, x, y in zip(
        eligible.tolist(), first[eligible].tolist(), second[eligible].tolist(), strict=True
    ):
        if x in taken or y in taken:
            continue
        taken.update((x, y))
        chosen.append(position)
    chosen_t = torch.tensor(chosen, dtype=torch.int64, device=first.device)
    return chosen_t, distance[chosen_t]
