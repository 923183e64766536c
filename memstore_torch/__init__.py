"""memstore_torch: the layer library -- a memstore collection as differentiable memory layers.

Usable in any torch model; it imports neither ``transformers`` nor ``tokenizers`` (the GPT-2
application built on it is :mod:`memstore_gpt2`). Public names are imported lazily, so importing
the package costs nothing until a layer is used.
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
    "MemoryLayer": "memstore_torch.memory_layer",
    "MemoryRead": "memstore_torch.memory_layer",
    "FeaturalConfig": "memstore_torch.config",
    "AssociativeConfig": "memstore_torch.config",
    "ProductKeyConfig": "memstore_torch.config",
    "ProductKeyMemory": "memstore_torch.product_memory",
    "GrownMemory": "memstore_torch.grown",
    "RowwiseAdagrad": "memstore_torch.optim",
    "SparseRowRead": "memstore_torch.sparse_rows",
    "sparse_row_read": "memstore_torch.sparse_rows",
    "product_topk": "memstore_torch.product_keys",
    "memory_layers": "memstore_torch.model_memory",
    "flush_memory": "memstore_torch.model_memory",
    "recording_reads": "memstore_torch.model_memory",
    "memory_parameters": "memstore_torch.model_memory",
    "split_parameters": "memstore_torch.model_memory",
    "sparse_parameters": "memstore_torch.model_memory",
    "ParameterSplit": "memstore_torch.model_memory",
    "paging_stats": "memstore_torch.model_memory",
    "PagedRows": "memstore_torch.paged_rows",
    "save_memory_model": "memstore_torch.saving",
    "load_memory_state": "memstore_torch.saving",
    "MemoryBudget": "memstore_torch.budget",
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
