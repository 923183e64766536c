"""LRFU state updates and order in torch: the one mirror of :mod:`memstore.lrfu` for tensors.

Both the resident index (every row in memory) and the paged cache (a bounded subset in front of
the database) keep LRFU state per row as tensors; they share these functions so that a row's
``crf`` / ``last_tick`` after a sequence of touches is the same number whichever holds it (tested
against the numpy reference in ``tests/torch/test_semantics_mirrors.py``; the definition is in
docs/design.md, LRFU).
"""

from __future__ import annotations

from typing import Any

import torch


def touched(
    crf: torch.Tensor, last_tick: torch.Tensor, counts: torch.Tensor, tick: int, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crf, last_tick)`` of rows after ``counts`` (> 0) hits each at ``tick``: the stored crf
    and the hits are both decayed to the later of ``last_tick`` and ``tick``, then summed, i.e.
    ``crf <- c + 2^(-lam*age) * crf`` for a row last touched before the tick (c successive
    single hits give the same). Mirror of ``memstore.lrfu.touch``."""
    row_age = (tick - last_tick).clamp_min(0)
    hit_age = (last_tick - tick).clamp_min(0)  # > 0 only for rows written ahead
    new_crf = counts.double() * decay(hit_age, lam) + decay(row_age, lam) * crf
    return new_crf, last_tick.clamp_min(tick)


def decay(ages: torch.Tensor, lam: float) -> torch.Tensor:
    """``2^(-lam * age)`` (float64) for integer ``ages``, the same number for the same age
    wherever it sits in the tensor: a vectorised ``exp2`` rounds lanes and tails differently, so
    a row would get another last bit in a cache (another position) than in the resident index.
    Ages take few distinct values per call; each is computed once, in scalar arithmetic."""
    distinct, where = torch.unique(ages, return_inverse=True)
    factors = [2.0 ** (-lam * age) for age in distinct.tolist()]
    return torch.tensor(factors, dtype=torch.float64, device=ages.device)[where]


def order_key(crf: torch.Tensor, last_tick: torch.Tensor, now: int, lam: float) -> torch.Tensor:
    """``log2(crf) - lam * (now - last_tick)``: higher = keep. Mirror of
    ``memstore.lrfu.order_key``."""
    return torch.log2(crf) - lam * (now - last_tick).double()


def eviction_order(
    crf: torch.Tensor, last_tick: torch.Tensor, ids: torch.Tensor, now: int, lam: float
) -> torch.Tensor:
    """Positions in eviction order: ascending order key, then older ``last_tick``, then lower
    id. Mirror of ``memstore.lrfu.eviction_order``, ties included."""
    order = ids.argsort()
    order = order[last_tick[order].argsort(stable=True)]
    return order[order_key(crf, last_tick, now, lam)[order].argsort(stable=True)]


def reset(rows: Any, slots: torch.Tensor) -> None:
    """Give ``slots`` of a row holder (``_crf``, ``_hits``, ``_last_tick``, ``_created_tick``,
    ``_dirty`` tensors and a ``clock``) the LRFU state of a row inserted now: crf 1, no hits,
    created and last touched at the clock."""
    rows._crf[slots] = 1.0
    rows._hits[slots] = 0
    rows._last_tick[slots] = rows.clock
    rows._created_tick[slots] = rows.clock
    rows._dirty[slots] = True
