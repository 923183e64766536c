"""Exact top-k over a product set of keys, at the cost of two searches over sqrt(N) sub-keys.

Product keys (Lample et al., 2019, "Large Memory Layers with Product Keys"): two sub-key tables
``C1`` (n1 rows) and ``C2`` (n2 rows) define ``N = n1 * n2`` implicit keys ``[C1[i], C2[j]]``, and
a query split in halves ``[q1, q2]`` scores key ``(i, j)`` as ``q1 . C1[i] + q2 . C2[j]``. So the
caller scores the halves (``s1 = q1 C1^T``, ``s2 = q2 C2^T``: O(sqrt(N) d) per query) and
:func:`product_topk` finds the best k of the N sums from them: the best pairs can only combine a
best-k ``i`` with a best-k ``j``, and of those k x k pairs only the ~k ln k with rank product
``(a + 1)(b + 1) <= k`` can make the top k (:func:`candidate_pairs`). Row ``(i, j)`` is numbered
``i * n2 + j``. A small call (equal halves, rows x N at most :data:`FULL_SEARCH_SUMS`: one
decoding token) skips the two stages and takes the top k of all N sums -- brute force itself, in
fewer operators, which is what such a call's time is made of.

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

#: Up to this many sums in one call (rows x n^2), :func:`product_topk_stacked` scores all of them
#: and takes their top k: brute force itself, in fewer operators than the two-stage search, which
#: is cheaper beyond (a decoding step of one sequence is the case: 4,096 or 16,384 rows, one
#: token; ``python benchmarks/pkm_search.py`` measures both routes).
FULL_SEARCH_SUMS = 16384


def best_first(scores: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (m, k) of the k best entries of each row of ``scores`` (m, c), ordered best
    first under "higher score, then lower id" (``ids`` (m, c), distinct within a row; default:
    the positions themselves) -- the same answer for equal inputs on any device."""
    return _best_first(scores, k, ids)[1]


def _best_first(scores: torch.Tensor, k: int, ids: torch.Tensor | None = None):
    """``(values (m, k), positions (m, k))`` of :func:`best_first`; ``values`` are entries of
    ``scores`` (differentiable where ``scores`` is).

    ``torch.topk`` of k + 1, sorted, is already that answer wherever its k + 1 values are strictly
    decreasing; only rows with two equal values there (almost none, for real-valued scores; the
    ``k``-th equal to the ``k+1``-th makes the chosen set itself ambiguous) are ordered in full.
    """
    m, c = scores.shape
    if not 0 < k <= c:
        raise InvalidInputError(f"k must be in [1, {c}], got {k}")
    values, chosen = _detached(scores).topk(min(k + 1, c), dim=1)  # equal values in any order
    equal = values[:, 1:] == values[:, :-1]
    if bool(equal.any()):  # one test for the whole batch: ties are rare
        rows = equal.any(dim=1).nonzero().reshape(-1)
        row_ids = (
            torch.arange(c, device=scores.device).expand(rows.numel(), c)
            if ids is None
            else ids[rows]
        )
        chosen = chosen[:, :k].clone()
        chosen[rows] = _lexsorted(_detached(scores)[rows], row_ids)[:, :k]
        return scores.gather(1, chosen), chosen
    chosen = chosen[:, :k]
    if scores.requires_grad:  # read through the graph, so a gradient reaches the entries
        return scores.gather(1, chosen), chosen
    return values[:, :k], chosen


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
    v1, i1 = _best_first(s1, k1)  # (m, k1): best sub-key scores and indices, best first
    v2, i2 = _best_first(s2, k2)
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
    if m * n * n <= FULL_SEARCH_SUMS:  # every sum, searched at once: row i * n + j is its column
        first, second = halves.unbind(1)  # (m, n) each
        return _best_first((first.unsqueeze(2) + second.unsqueeze(1)).view(m, n * n), k)
    k1 = min(k, n)
    flat = halves.reshape(2 * m, n)  # row 2i: token i's first half, 2i + 1: its second
    picked, chosen = _best_first(flat, k1)  # (2m, k1): best sub-key scores and indices
    picked, chosen = picked.reshape(m, 2 * k1), chosen.reshape(m, 2 * k1)  # [first | second]
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
    scores, pos = _best_first(candidates, k, ids)
    return scores, ids.gather(1, pos)
