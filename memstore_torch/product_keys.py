"""Exact top-k over a product set of keys, at the cost of two searches over sqrt(N) sub-keys.

Product keys (Lample et al., 2019, "Large Memory Layers with Product Keys"): two sub-key tables
``C1`` (n1 rows) and ``C2`` (n2 rows) define ``N = n1 * n2`` implicit keys ``[C1[i], C2[j]]``, and
a query split in halves ``[q1, q2]`` scores key ``(i, j)`` as ``q1 . C1[i] + q2 . C2[j]``. So the
caller scores the halves (``s1 = q1 C1^T``, ``s2 = q2 C2^T``: O(sqrt(N) d) per query) and
:func:`product_topk` finds the best k of the N sums from them: the best pairs can only combine a
best-k ``i`` with a best-k ``j``, and of those k x k pairs only the ~k ln k with rank product
``(a + 1)(b + 1) <= k`` can make the top k (:func:`candidate_pairs`). Row ``(i, j)`` is numbered
``i * n2 + j``.

**Exact, ties included.** The answer equals brute force over all N sums under one total order:
higher score first, then lower row number. Each half keeps its k best under "higher score, then
lower index": if ``(i, j)`` is among the k best pairs and ``i`` were not among the k best of
``s1``, the k halves ahead of ``i`` would each give a pair ``(i', j)`` at least as good and with a
lower row number, so ``(i, j)`` would not be among the k best -- the same for ``j``. The final
choice orders candidates by score, then row number. ``torch.topk`` leaves the order of equal
values unspecified, hence :func:`best_first`. Scores must be finite.

Gradients flow to ``s1`` and ``s2`` through the selected entries (each returned score is
``s1[i] + s2[j]``): the selection itself is piecewise constant.
"""

from __future__ import annotations

import functools

import torch

from memstore.errors import InvalidInputError


def best_first(scores: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (m, k) of the k best entries of each row of ``scores`` (m, c), ordered best
    first under "higher score, then lower id" (``ids`` (m, c), distinct within a row; default:
    the positions themselves) -- the same answer for equal inputs on any device.

    ``torch.topk`` of k + 1, sorted, is already that answer wherever its k + 1 values are strictly
    decreasing; only rows with two equal values there (almost none, for real-valued scores; the
    ``k``-th equal to the ``k+1``-th makes the chosen set itself ambiguous) are ordered in full.
    """
    m, c = scores.shape
    if not 0 < k <= c:
        raise InvalidInputError(f"k must be in [1, {c}], got {k}")
    values, chosen = scores.topk(min(k + 1, c), dim=1)  # best first; equal values in any order
    chosen = chosen[:, :k]
    equal = values[:, 1:] == values[:, :-1]
    if bool(equal.any()):  # one test for the whole batch: ties are rare
        rows = equal.any(dim=1).nonzero().reshape(-1)
        row_ids = (
            torch.arange(c, device=scores.device).expand(rows.numel(), c)
            if ids is None
            else ids[rows]
        )
        chosen = chosen.clone()
        chosen[rows] = _lexsorted(scores[rows], row_ids)[:, :k]
    return chosen


def _lexsorted(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Positions ordering each row by higher score, then lower id (a stable sort by score of the
    positions sorted by id)."""
    by_id = ids.argsort(dim=1)
    by_score = scores.gather(1, by_id).argsort(dim=1, descending=True, stable=True)
    return by_id.gather(1, by_score)


def candidate_pairs(k1: int, k2: int, k: int, device: torch.device | str = "cpu"):
    """See :func:`_candidate_pairs` (made once per shape and device: a decoding step searches
    one token, where building them again would cost as much as the search itself)."""
    return _candidate_pairs(k1, k2, k, torch.device(device))


@functools.lru_cache(maxsize=64)
def _candidate_pairs(k1: int, k2: int, k: int, device: torch.device):
    """Rank pairs ``(a, b)`` of two best-first lists that can hold one of the k best sums:
    those with ``(a + 1) * (b + 1) <= k``. Every other pair is beaten by the ``(a+1)(b+1) - 1``
    pairs of ranks ``a' <= a, b' <= b``, all at least as good and with lower row numbers (both
    lists are ordered by higher score, then lower index), so it can never be among the k best.
    About ``k ln k`` pairs instead of ``k^2`` (119 instead of 1,024 for k = 32)."""
    a = torch.arange(k1, device=device)[:, None]
    b = torch.arange(k2, device=device)[None, :]
    keep = (a + 1) * (b + 1) <= k
    pa, pb = keep.nonzero(as_tuple=True)
    return pa, pb


def product_topk(s1: torch.Tensor, s2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the ``n1 * n2`` sums ``s1[:, i] + s2[:, j]`` for each row of ``s1`` (m, n1)
    and ``s2`` (m, n2): ``(scores (m, k), rows (m, k))``, best first, ties by lower row number
    ``i * n2 + j`` (the module docstring says why this equals brute force). Differentiable in
    ``s1`` and ``s2``; ``rows`` is int64."""
    if s1.dim() != 2 or s2.dim() != 2 or s1.shape[0] != s2.shape[0]:
        raise InvalidInputError(
            f"s1 and s2 must be (m, n1) and (m, n2), got {tuple(s1.shape)} and {tuple(s2.shape)}"
        )
    m, n1 = s1.shape
    n2 = s2.shape[1]
    if not 0 < k <= n1 * n2:
        raise InvalidInputError(f"k must be in [1, {n1 * n2}], got {k}")
    if n1 == n2:  # both halves in one search (fewer operations: a decoding step's cost)
        return product_topk_stacked(torch.stack([s1, s2], dim=1), k)
    k1, k2 = min(k, n1), min(k, n2)
    i1 = best_first(_detached(s1), k1)  # (m, k1): sub-key indices, best first
    i2 = best_first(_detached(s2), k2)
    v1, v2 = s1.gather(1, i1), s2.gather(1, i2)  # (m, k1), (m, k2): differentiable
    a, b = candidate_pairs(k1, k2, k, s1.device)  # (c,) rank pairs, c ~ k ln k
    candidates = v1[:, a] + v2[:, b]  # (m, c)
    ids = i1[:, a] * n2 + i2[:, b]  # (m, c) row numbers, distinct within a row
    return _best_candidates(candidates, ids, k)


def product_topk_stacked(halves: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`product_topk` of ``s1 = halves[:, 0]`` and ``s2 = halves[:, 1]`` (``halves``
    (m, 2, n): each row's two halves, as a product-key layer scores them in one product),
    searched together: one top-k over the 2m halves, and the candidate pairs read from each
    row's 2k best as they lie."""
    if halves.dim() != 3 or halves.shape[1] != 2 or not 0 < k <= halves.shape[2] ** 2:
        raise InvalidInputError(f"halves must be (m, 2, n) with k in [1, n^2], got "
                                f"{tuple(halves.shape)} and k={k}")  # fmt: skip
    m, _, n = halves.shape
    k1 = min(k, n)
    flat = halves.reshape(2 * m, n)  # row 2i: token i's first half, 2i + 1: its second
    chosen = best_first(_detached(flat), k1)  # (2m, k1): sub-key indices, best first
    picked = flat.gather(1, chosen).reshape(m, 2 * k1)  # differentiable; [first k1 | second k1]
    chosen = chosen.reshape(m, 2 * k1)
    a, b = _candidate_columns(k1, k, halves.device)
    candidates = picked[:, a] + picked[:, b]  # (m, c)
    ids = chosen[:, a] * n + chosen[:, b]  # (m, c) row numbers, distinct within a row
    return _best_candidates(candidates, ids, k)


@functools.lru_cache(maxsize=64)
def _candidate_columns(k1: int, k: int, device: torch.device):
    """:func:`candidate_pairs` of two k1-lists as columns of their concatenation."""
    a, b = candidate_pairs(k1, k1, k, device)
    return a, b + k1


def _detached(scores: torch.Tensor) -> torch.Tensor:
    return scores.detach() if scores.requires_grad else scores


def _best_candidates(candidates, ids, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of the candidate sums (m, c) with row numbers ``ids``: ``(scores, rows)``."""
    pos = best_first(_detached(candidates), k, ids)
    return candidates.gather(1, pos), ids.gather(1, pos)
