"""Sampling text from a GPT-2 model (teacher or memory student) without relying on ``generate()``.

Memory layers are ordinary modules inside the blocks, so a new token needs only the keys and values
of the tokens before it: within the model's context the loop decodes with
:class:`~memstore_gpt2.serve.decoding.Decoder`'s KV cache (``memstore serve``'s decoder: the same
tokens as serving, each step one token's work). Past the context, or with ``cache=False``, it
re-runs the last ``context`` tokens for every new one (a sliding window; the reference the
decoder is tested against). Neither depends on transformers' cache classes, which change between
versions. The draws are the same either way: one seeded CPU generator, the same operations.
"""

from __future__ import annotations

import torch

from memstore.errors import bad_parameter
from memstore_gpt2.lm_training import autocast, model_device
from memstore_gpt2.serve.decoding import Decoder, Sampler, SamplingParams, decode, unsupported


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
    cache: bool = True,
) -> list[int]:
    """Extend ``prompt_ids`` by up to ``max_new_tokens`` sampled tokens (greedy if temperature 0).

    Runs where the model's weights are; ``precision="bf16"`` under ``torch.autocast``. Sampling
    itself draws on the CPU, so a seed gives the same tokens for the same logits on any device.
    ``cache``: decode with the KV cache where prompt and new tokens fit the context (the module
    docstring says when it cannot).
    """
    if max_new_tokens < 0:
        raise bad_parameter("max_new_tokens", f"must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise bad_parameter("temperature", f"must be >= 0, got {temperature}")
    if not prompt_ids:
        raise bad_parameter("prompt", "is empty after tokenization: give some text")
    context = context or model.config.n_positions
    fits = len(prompt_ids) + max_new_tokens <= min(context, model.config.n_positions)
    if cache and fits and unsupported(model.config) is None:
        return _cached(model, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id,
                       precision)  # fmt: skip
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


def _cached(model, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id, precision):
    """:func:`sample_tokens` through the KV-cache decoder (its draws: :class:`Sampler`)."""
    sampler = Sampler(SamplingParams(temperature, top_k, 1.0, seed))
    was_training = model.training
    model.eval()
    try:
        return decode(Decoder(model, precision), list(prompt_ids), max_new_tokens, sampler, eos_id)
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, prompt: str, **kwargs) -> str:
    """Prompt text -> prompt followed by the sampled continuation."""
    return sample_continuation(model, tokenizer, prompt, **kwargs)[0]


def sample_continuation(model, tokenizer, prompt: str, **kwargs) -> tuple[str, int]:
    """(prompt followed by the sampled continuation, number of new tokens): the count is what a
    tokens-per-second figure divides by (generation may stop early at the EOS token)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = sample_tokens(model, prompt_ids, eos_id=tokenizer.eos_token_id, **kwargs)
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids) - len(prompt_ids)
