"""GPT-2 surgery: clone a teacher and swap the MLPs of chosen blocks for other modules.

Written against a *factory* — any callable that turns ``(layer_index, teacher_mlp)`` into a
``(B, T, d) -> (B, T, d)`` module — so the same code builds memory students, dense controls and the
"MLPs removed" lower bound, and every non-MLP weight is copied from the teacher untouched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from memstore.errors import InvalidInputError, bad_parameter

MlpFactory = Callable[[int, nn.Module], nn.Module]


def gpt2_blocks(model) -> nn.ModuleList:
    """The transformer blocks of a GPT2LMHeadModel (or bare GPT2Model)."""
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if blocks is None:
        raise InvalidInputError(f"{type(model).__name__} is not a GPT-2 model (no transformer.h)")
    return blocks


def parse_layers(spec: str | Sequence[int] | None, n_layer: int) -> list[int]:
    """``"all"`` / ``None`` / ``"0,2"`` / ``"1-3"`` / ``"-1"`` -> sorted unique block indices.

    Negative indices count from the end like Python's. Anything else is a clear ``layers`` error.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(n_layer))
    if isinstance(spec, str):
        indices: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            range_match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if range_match:
                lo, hi = int(range_match.group(1)), int(range_match.group(2))
                if lo > hi:
                    raise bad_parameter("layers", f"{spec!r}: range {part!r} is empty")
                indices.extend(range(lo, hi + 1))
            elif re.fullmatch(r"-?\d+", part):
                indices.append(int(part))
            else:
                raise bad_parameter(
                    "layers",
                    f"{spec!r}: expected 'all' or comma-separated block indices "
                    f"or ranges like '0,2' or '1-3'",
                )
    else:
        indices = [int(i) for i in spec]
    resolved = []
    for index in indices:
        real = index + n_layer if index < 0 else index
        if not 0 <= real < n_layer:
            raise bad_parameter(
                "layers",
                f"{spec!r}: block {index} does not exist (the teacher has {n_layer} blocks, "
                f"0..{n_layer - 1})",
            )
        resolved.append(real)
    if not resolved:
        raise bad_parameter("layers", f"{spec!r}: no block selected")
    return sorted(set(resolved))


def clone_with_mlps(teacher, layers: Sequence[int], factory: MlpFactory):
    """A deep copy of ``teacher`` whose ``layers`` MLPs are replaced by ``factory``'s modules.

    The factory receives the *teacher's* MLP (never the clone's) so it can read its weights, e.g.
    to initialise a featural memory from them. The teacher itself is left unchanged.
    """
    student = copy.deepcopy(teacher)
    for param in student.parameters():  # the teacher may have been frozen for an earlier run
        param.requires_grad_(True)
    teacher_blocks, student_blocks = gpt2_blocks(teacher), gpt2_blocks(student)
    for index in layers:
        replacement = factory(index, teacher_blocks[index].mlp)
        if not isinstance(replacement, nn.Module):
            raise TypeError(f"MLP factory returned {type(replacement).__name__}, not a Module")
        student_blocks[index].mlp = replacement
    return student


class ZeroMlp(nn.Module):
    """Stands in for a removed MLP: the block keeps only its residual path (quality lower bound)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B,T,d) -> (B,T,d)
        return torch.zeros_like(hidden_states)


def remove_mlps(module_index: int, mlp: nn.Module) -> nn.Module:
    """Factory for the "MLPs removed" student."""
    return ZeroMlp()


def keep_mlps(module_index: int, mlp: nn.Module) -> nn.Module:
    """Factory for the dense control: an independent, trainable copy of the teacher's MLP."""
    return _trainable_copy(mlp)


def reinit_mlps(seed: int = 0) -> MlpFactory:
    """Factory for a dense student whose MLPs start from fresh GPT-2 initialisation."""

    def factory(module_index: int, mlp: nn.Module) -> nn.Module:
        fresh = _trainable_copy(mlp)
        generator = torch.Generator().manual_seed(seed + module_index)
        with torch.no_grad():
            for name, param in fresh.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        return fresh

    return factory


def _trainable_copy(module: nn.Module) -> nn.Module:
    """deepcopy that is trainable even when the source (a teacher) has been frozen."""
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.requires_grad_(True)
    return clone


@torch.no_grad()
def capture_mlp_inputs(model, layers: Sequence[int], batches, max_rows: int = 8192):
    """Inputs ``(N, d)`` reaching each chosen block's MLP, gathered over ``batches`` of token ids.

    Used as calibration data for MLP -> memory initialisation (the tail correction needs the
    typical distribution of MLP inputs; docs/design.md, The tail correction).
    """
    blocks = gpt2_blocks(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for index in layers:

        def hook(_module, args, _output, index=index):
            captured[index].append(args[0].reshape(-1, args[0].shape[-1]).detach())

        handles.append(blocks[index].mlp.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
            if sum(len(x) for x in captured[layers[0]]) * 1 >= max_rows:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: torch.cat(xs)[:max_rows] for i, xs in captured.items()}


def non_mlp_state(model) -> dict[str, torch.Tensor]:
    """Every weight outside the blocks' ``mlp`` submodules (what surgery must leave untouched)."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not re.search(r"\.h\.\d+\.mlp\.", name)
    }
