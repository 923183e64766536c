"""GrownMemory: a layer plus extra memory summed into the same output.

The way to give a model more memory than the MLP it started from: keep the MLP, or the
:class:`~memstore_torch.FeaturalMemory` made from it (exact at ``k = n_inner``, tail-corrected
below), and add a :class:`~memstore_torch.ProductKeyMemory` whose values start at zero -- so the
grown model computes exactly what it computed before, and the extra rows learn from there.
Whole-model helpers (``flush_memory``, ``memory_layers``, ``split_parameters``) find both parts
by type, as they find any memory layer anywhere in a model.
"""

from __future__ import annotations

import torch
from torch import nn


class GrownMemory(nn.Module):
    """``base(x) + sum(extra(x) for extra in extras)``, for any ``(..., d) -> (..., d)`` modules
    (typically a GPT-2 MLP or FeaturalMemory as ``base`` and ProductKeyMemory as the extra)."""

    def __init__(self, base: nn.Module, *extras: nn.Module) -> None:
        super().__init__()
        if not extras:
            raise TypeError("GrownMemory needs at least one extra module")
        self.base = base
        self.extras = nn.ModuleList(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Extras that search first (ProductKeyMemory.start) may read their rows ahead (when their
        # ``prefetch`` is on) while the base layer computes: a paged memory's database read
        # overlaps the base's arithmetic. Each extra is still called as a module (its hooks
        # run), handed its own search.
        started = [
            extra.start(x, read_ahead=True) if hasattr(extra, "start") else None
            for extra in self.extras
        ]
        out = self.base(x)
        for extra, searched in zip(self.extras, started, strict=True):
            out = out + (extra(x) if searched is None else extra(x, searched=searched))
        return out
