"""Whole-model operations on memory layers, found by type wherever they sit in a model.

A training loop, a checkpoint writer or a report must not need to know *where* a model keeps its
memory: walking ``model.named_modules()`` for :class:`~memstore_torch.memory_layer.MemoryLayer`
instances finds a memory layer in a GPT-2 MLP slot, inside an attention block or in a user's own
module alike, so every one of them is flushed, checkpointed and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, memory) trainable parameters in a stable order (optimizer state relies on it).

    Memory rows usually want their own learning rate and no weight decay, hence the split.
    """
    memory_ids = {id(p) for p in memory_parameters(model)}
    dense, memory = [], []
    for param in model.parameters():  # .parameters() de-duplicates tied weights already
        if param.requires_grad:
            (memory if id(param) in memory_ids else dense).append(param)
    return dense, memory


def is_memory_row_key(state_key: str, model: nn.Module) -> bool:
    """True when a ``state_dict`` key names memory rows (which ``state_dict`` leaves out)."""
    prefixes = tuple(f"{name}." if name else "" for name in memory_layers(model))
    return state_key.startswith(prefixes) and state_key.rsplit(".", 1)[-1] in (
        MemoryLayer.ROW_PARAMETER_NAMES
    )
