"""A memory budget: how much of a model's paged memory may be resident, as bytes or a share.

``--memory-budget 512MB`` or ``--memory-budget 10%``. Only memory layers that can page
(:class:`~memstore_torch.ProductKeyMemory`, through :class:`~memstore_torch.paged_rows.PagedRows`)
count against it; their search structure (sub-keys, projections) and every other weight of the
model are the fixed part. A share applies to each paged layer's rows; bytes are split over the
paged layers in proportion to their tables, each cached row costing
:meth:`PagedRows.bytes_per_slot`. A budget that covers every row keeps them all resident (no cache
at all: exactly the unpaged layer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from memstore.errors import bad_parameter

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of ``bytes`` (resident bytes of cached rows) or ``share`` (of each table's
    rows, in (0, 1])."""

    bytes: int | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.share is None):
            raise bad_parameter("memory_budget", "needs exactly one of bytes or share")
        if self.bytes is not None and self.bytes < 1:
            raise bad_parameter("memory_budget", f"must be at least 1 byte, got {self.bytes}")
        if self.share is not None and not 0 < self.share <= 1:
            raise bad_parameter("memory_budget", f"share must lie in (0, 1], got {self.share}")

    @classmethod
    def parse(cls, text: str) -> MemoryBudget:
        """``"512MB"``, ``"1.5GiB"``, ``"4096"`` (bytes) or ``"10%"``."""
        match = _PATTERN.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or (unit != "%" and unit not in _UNITS):
            raise bad_parameter(
                "memory_budget",
                f"must be bytes such as 512MB or 2GiB, or a share of rows such as 10%, "
                f"got {text!r}",
            )
        number = float(match.group(1))
        if unit == "%":
            return cls(share=number / 100.0)
        return cls(bytes=int(number * _UNITS[unit]))

    @property
    def whole(self) -> bool:
        """A share of 100 %: every row resident."""
        return self.share == 1.0

    def cache_rows(self, tables: Sequence[tuple[int, int]]) -> list[int | None]:
        """For tables given as ``(rows, bytes per cached row)``, the rows each may cache (None:
        all of them, so the layer stays fully resident)."""
        if self.share is not None:
            wanted = [math.ceil(self.share * rows) for rows, _ in tables]
        else:
            total = sum(rows * row_bytes for rows, row_bytes in tables)
            fraction = self.bytes / total if total else 1.0
            wanted = [max(1, math.floor(fraction * rows)) for rows, _ in tables]
        return [
            None if want >= rows else want for want, (rows, _) in zip(wanted, tables, strict=True)
        ]

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share is not None else f"{self.bytes}B"
