"""Sampling text from a causal LM (teacher or memory student) without relying on ``generate()``.

A hand-written loop because memory layers are ordinary modules inside the blocks: every new token
re-runs the (short) context, so no KV cache is needed and nothing depends on transformers' cache
classes, which change between versions.
"""

from __future__ import annotations

import torch

from memstore.errors import bad_parameter
from memstore_gpt2.lm_training import autocast, model_device


@torch.no_grad()
def sample_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int | None = None,
    context: int | None = None,
    eos_id: int | None = None,
    precision: str = "fp32",
) -> list[int]:
    """Extend ``prompt_ids`` by up to ``max_new_tokens`` sampled tokens (greedy if temperature 0).

    Runs where the model's weights are; ``precision="bf16"`` under ``torch.autocast``. Sampling
    itself draws on the CPU, so a seed gives the same tokens for the same logits on any device.
    """
    if max_new_tokens < 0:
        raise bad_parameter("max_new_tokens", f"must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise bad_parameter("temperature", f"must be >= 0, got {temperature}")
    if not prompt_ids:
        raise bad_parameter("prompt", "is empty after tokenization: give some text")
    context = context or model.config.n_positions
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    device = model_device(model)
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-context:]], dtype=torch.long, device=device)  # (1, T)
            with autocast(device, precision):
                logits = model(input_ids=window, use_cache=False).logits[0, -1]
            logits = logits.float().cpu()  # (V,)
            if temperature == 0:
                next_id = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k is not None and 0 < top_k < logits.numel():
                    threshold = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(next_id)
            if eos_id is not None and next_id == eos_id:
                break
    finally:
        model.train(was_training)
    return ids


def generate_text(model, tokenizer, prompt: str, **kwargs) -> str:
    """Prompt text -> prompt followed by the sampled continuation."""
    return sample_continuation(model, tokenizer, prompt, **kwargs)[0]


def sample_continuation(model, tokenizer, prompt: str, **kwargs) -> tuple[str, int]:
    """(prompt followed by the sampled continuation, number of new tokens): the count is what a
    tokens-per-second figure divides by (generation may stop early at the EOS token)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = sample_tokens(model, prompt_ids, eos_id=tokenizer.eos_token_id, **kwargs)
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids) - len(prompt_ids)
