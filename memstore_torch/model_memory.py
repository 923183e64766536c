"""Whole-model operations on memory layers, found by type wherever they sit in a model.

A training loop, a checkpoint writer or a report must not need to know *where* a model keeps its
memory: walking ``model.named_modules()`` for :class:`~memstore_torch.memory_layer.MemoryLayer`
instances finds a memory layer in a GPT-2 MLP slot, inside an attention block or in a user's own
module alike, so every one of them is flushed, checkpointed and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from torch import nn

from .memory_layer import MemoryLayer


def memory_layers(model: nn.Module) -> dict[str, MemoryLayer]:
    """``{qualified module name: layer}`` for every memory layer in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryLayer)}


@contextmanager
def recording_reads(model: nn.Module) -> Iterator[dict[str, MemoryLayer]]:
    """Within the block, every memory layer of ``model`` records what each forward reads.

    Yields ``{qualified module name: layer}``; after a forward, ``layer.last_read`` is a
    :class:`~memstore_torch.memory_layer.MemoryRead` (the ids and weights the forward itself
    selected). Each layer's previous setting is restored, and its record cleared, on exit.
    """
    layers = memory_layers(model)
    before = {name: layer.record_reads for name, layer in layers.items()}
    for layer in layers.values():
        layer.record_reads, layer.last_read = True, None
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            layer.record_reads, layer.last_read = before[name], None


def flush_memory(model: nn.Module) -> dict[str, dict[str, int]]:
    """Write every memory layer's changed rows to its collection (one transaction per layer)."""
    return {name: layer.flush() for name, layer in memory_layers(model).items()}


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable memory-row Parameter of ``model`` (their home is the database, not
    ``state_dict``), without duplicates."""
    out: dict[int, nn.Parameter] = {}
    for layer in memory_layers(model).values():
        out.update((id(p), p) for p in layer.memory_parameters())
    return list(out.values())


class ParameterSplit(NamedTuple):
    """A model's trainable parameters by the optimizer they need (see :func:`split_parameters`)."""

    #: Everything that is not a memory row: AdamW with weight decay.
    dense: list[nn.Parameter]
    #: Memory rows with dense gradients (featural, associative): AdamW, own lr, no weight decay.
    memory: list[nn.Parameter]
    #: Memory rows with *sparse* gradients (product-key values): an optimizer that takes sparse
    #: gradients (:class:`~memstore_torch.optim.RowwiseAdagrad`); AdamW raises on them.
    sparse: list[nn.Parameter]


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable memory-row Parameter of ``model`` whose gradient is a sparse tensor
    (:meth:`MemoryLayer.sparse_parameters` of each layer, whatever its kind), without
    duplicates."""
    out: dict[int, nn.Parameter] = {}
    for layer in memory_layers(model).values():
        out.update((id(p), p) for p in layer.sparse_parameters())
    return list(out.values())


def split_parameters(model: nn.Module) -> ParameterSplit:
    """``(dense, memory, sparse)`` trainable parameters, each in a stable order (optimizer state
    relies on it).

    Memory rows want their own learning rate and no weight decay, hence ``memory``; rows trained
    by sparse gradients cannot go to AdamW at all (it raises on a sparse gradient), hence
    ``sparse`` -- every memory layer says which of its rows those are, so the split holds for
    any model and any layer kind.
    """
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    memory_ids = {id(p) for p in memory_parameters(model)} - sparse_ids
    dense, memory, sparse = [], [], []
    for param in model.parameters():  # .parameters() de-duplicates tied weights already
        if param.requires_grad:
            if id(param) in sparse_ids:
                sparse.append(param)
            else:
                (memory if id(param) in memory_ids else dense).append(param)
    return ParameterSplit(dense, memory, sparse)


def is_memory_row_key(state_key: str, model: nn.Module) -> bool:
    """True when a ``state_dict`` key names memory rows (which ``state_dict`` leaves out)."""
    prefixes = tuple(f"{name}." if name else "" for name in memory_layers(model))
    return state_key.startswith(prefixes) and state_key.rsplit(".", 1)[-1] in (
        MemoryLayer.ROW_PARAMETER_NAMES
    )


def paging_stats(model: nn.Module, layers: Iterable[MemoryLayer] | None = None
                 ) -> dict[str, float | int]:  # fmt: skip
    """What the memory layers of ``model`` hold and have read: ``resident_rows`` (rows in memory
    now, all layers), ``paged_layers``, ``rows_read`` (rows paged in from the database),
    ``read_queries``, ``rows_written_back``, ``cache_lookups`` (distinct rows asked for, per
    forward) and ``cache_hit_rate`` (share of those found in the cache; 1.0 with no paging).
    ``layers``: the model's memory layers, found by the caller once (a server counts after
    every decoding step, where walking the modules again would cost a tenth of the step)."""
    from .paged_rows import PagedRows

    out: dict[str, float | int] = dict.fromkeys(
        ("resident_rows", "paged_layers", "rows_read", "read_queries", "rows_written_back"), 0
    )
    lookups = 0
    for layer in memory_layers(model).values() if layers is None else layers:
        index = layer.index
        if isinstance(index, PagedRows):
            out["paged_layers"] += 1
            out["resident_rows"] += index.resident_rows
            out["rows_read"] += index.stats["misses"]
            out["read_queries"] += index.stats["queries"]
            out["rows_written_back"] += index.stats["written_back"]
            lookups += index.stats["lookups"]
        else:
            out["resident_rows"] += len(index)
    out["cache_lookups"] = lookups
    out["cache_hit_rate"] = 1.0 - out["rows_read"] / lookups if lookups else 1.0
    return out


def memory_committed(model: nn.Module) -> None:
    """Tell every paged memory layer of ``model`` that the transaction holding its write-backs
    committed (their prefetch may read those rows from another connection again)."""
    from .paged_rows import PagedRows

    for layer in memory_layers(model).values():
        if isinstance(layer.index, PagedRows):
            layer.index.committed()
