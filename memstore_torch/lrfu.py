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
    """``2^(-lam * age)`` (float64) for integer ``ages`` >= 0, the same number for the same age
    wherever it sits in the tensor: a vectorised ``exp2`` rounds SIMD lanes and tails
    differently, so a row would get another last bit in a cache (another position) than in the
    resident index. The factors come from a table of scalar results, one per age, grown on
    demand; ages beyond it (rows untouched for very long) are computed once per distinct age."""
    if ages.numel() == 0:
        return torch.zeros(ages.shape, dtype=torch.float64, device=ages.device)
    oldest = int(ages.max())
    if oldest >= _TABLE_LIMIT:
        distinct, where = torch.unique(ages, return_inverse=True)
        factors = [2.0 ** (-lam * age) for age in distinct.tolist()]
        return torch.tensor(factors, dtype=torch.float64, device=ages.device)[where]
    return _decay_table(lam, oldest + 1, ages.device)[ages]


#: Ages (in ticks) the decay table covers at most; 2^20 floats = 8 MB per lambda and device.
_TABLE_LIMIT = 1 << 20
_TABLES: dict[tuple[float, torch.device], torch.Tensor] = {}


def _decay_table(lam: float, size: int, device: torch.device) -> torch.Tensor:
    key = (float(lam), torch.device(device))
    table = _TABLES.get(key)
    if table is None or table.numel() < size:
        size = min(_TABLE_LIMIT, max(size, 1024, 2 * (0 if table is None else table.numel())))
        factors = [2.0 ** (-lam * age) for age in range(size)]
        table = torch.tensor(factors, dtype=torch.float64).to(device)
        _TABLES[key] = table
    return table


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


def assign(rows: Any, slots: torch.Tensor, block: Any) -> None:
    """Set the LRFU fields of ``slots`` of a row holder (as :func:`reset`) to those of a
    ``RowBlock`` (a merged row's, from ``memstore.recombine``), and mark them changed."""
    device = rows._crf.device
    rows._crf[slots] = torch.as_tensor(block.crf, dtype=torch.float64).to(device)
    rows._last_tick[slots] = torch.as_tensor(block.last_tick, dtype=torch.int64).to(device)
    rows._hits[slots] = torch.as_tensor(block.hits, dtype=torch.int64).to(device)
    rows._created_tick[slots] = torch.as_tensor(block.created_tick, dtype=torch.int64).to(device)
    rows._dirty[slots] = True
