"""memstore_torch: the store as differentiable memory layers, and the GPT-2 distillation trainer.

Public names are imported lazily so that ``import memstore_torch.cli_train`` (which the ``memstore``
CLI does at start-up) does not import torch; torch is only needed once a layer is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it; extend as modules land.
_EXPORTS: dict[str, str] = {
    "ResidentIndex": "memstore_torch.resident",
    "ResidentHits": "memstore_torch.resident",
    "FeaturalMemory": "memstore_torch.featural",
    "AssociativeMemory": "memstore_torch.associative",
    "TopKMemoryRead": "memstore_torch.functions",
    "StraightThroughQuery": "memstore_torch.functions",
    "StraightThroughInsert": "memstore_torch.functions",
    "topk_memory_read": "memstore_torch.functions",
    "straight_through_query": "memstore_torch.functions",
    "straight_through_insert": "memstore_torch.functions",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memstore_torch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
