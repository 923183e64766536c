"""What each memory layer of a loaded student saw and returned for a prompt, caught by hooks."""

from __future__ import annotations

import torch


def layer_io(mindset, prompt: str) -> dict:
    """``{layer name: (input, output)}`` of every memory layer for ``prompt``, caught by forward
    hooks (no read recording), so tests can rebuild an output from what a trace says it read."""
    caught, hooks = {}, []
    for name, entry in mindset.layers.items():
        hooks.append(
            entry.layer.register_forward_hook(
                lambda m, i, o, name=name: caught.__setitem__(
                    name, (i[0].detach()[0], o.detach()[0])
                )
            )
        )
    try:
        with torch.no_grad():
            mindset.model(input_ids=torch.tensor([mindset.encode(prompt)]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return caught
