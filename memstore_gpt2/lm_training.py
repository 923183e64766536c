"""Pieces shared by teacher training and distillation: batches, learning-rate schedule, perplexity.

Everything here is a pure function of its arguments (the batch of step ``s`` depends only on the
seed and ``s``), which is what makes a resumed run follow the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from memstore.errors import bad_parameter

#: Training precisions: "bf16" runs forwards under ``torch.autocast`` (weights stay fp32).
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is refused."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise bad_parameter("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise bad_parameter(
            "device", f"{device!r} was requested but CUDA is not available here; use cpu or auto"
        )
    return torch.device(device)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise bad_parameter(
            "precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return precision


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to bfloat16 on ``device`` for "bf16" (CPU included); nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_device(model) -> torch.device:
    """Where a model's weights are (CPU for a model without any)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def batch_for_step(blocks: np.ndarray, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The training batch of step ``step``: ``(batch_size, block_len)`` int64 token ids.

    Drawn without replacement within an epoch from a permutation seeded by ``(seed, epoch)``, so
    it depends on nothing but its arguments (no sampler state to checkpoint).
    """
    n = len(blocks)
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, slot = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n >= batch_size:
        idx = order[slot * batch_size : (slot + 1) * batch_size]
    else:  # tiny corpora (tests, demos on a few paragraphs): sample with repetition
        idx = np.resize(order, batch_size)
    return torch.from_numpy(np.ascontiguousarray(blocks[idx]))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` of the peak at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lm_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of a causal LM, without building a KV cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of predicting token t+1 from position t; logits (B,T,V), ids (B,T)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        input_ids[:, 1:].reshape(-1),
        reduction=reduction,
    )


#: Blocks per forward when a run measures held-out perplexity (and ``memstore evaluate``'s default).
EVAL_BATCH_SIZE = 16


@torch.no_grad()
def perplexity(
    model, blocks: np.ndarray, batch_size: int = EVAL_BATCH_SIZE, max_blocks: int | None = None
):
    """exp(mean next-token cross-entropy) over every predicted token of ``blocks``.

    Runs in eval mode and restores the model's previous mode, so it can be called mid-training.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    device = model_device(model)
    data = blocks if max_blocks is None else blocks[:max_blocks]
    try:
        for start in range(0, len(data), batch_size):
            ids = torch.from_numpy(np.ascontiguousarray(data[start : start + batch_size]))
            ids = ids.to(device)
            nll = next_token_ce(lm_logits(model, ids), ids, reduction="sum")
            total_nll += float(nll)
            total_tokens += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        model.train(was_training)
    return math.exp(total_nll / max(1, total_tokens))
