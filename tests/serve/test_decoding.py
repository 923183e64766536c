"""The KV-cache decoder against the loop that re-runs the whole context for every token
(``sample_tokens(cache=False)``): the same greedy tokens, the same seeded draws; ``memstore
generate`` (``sample_tokens``) decodes with the cache within the context, and slides a window
past it."""

from __future__ import annotations

import pytest

from memstore_gpt2.generate import sample_tokens
from memstore_gpt2.serve.decoding import Decoder, Sampler, SamplingParams, decode, greedy_decode

PROMPTS = ["The for statement", "A list is", "x"]


def _ids(student, text):
    return student.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_sample_tokens(student, prompt):
    ids = _ids(student, prompt)
    steps = 32 - len(ids)  # up to the end of the tiny model's context
    expected = sample_tokens(student.model, ids, max_new_tokens=steps, temperature=0, cache=False)
    assert greedy_decode(Decoder(student.model), ids, steps) == expected
    assert sample_tokens(student.model, ids, max_new_tokens=steps, temperature=0) == expected


def test_seeded_sampling_is_reproducible_and_draws_as_sample_tokens(student):
    ids = _ids(student, PROMPTS[0])
    params = dict(temperature=0.9, top_k=40, seed=7)
    first = decode(Decoder(student.model), ids, 20, Sampler(SamplingParams(**params)))
    again = decode(Decoder(student.model), ids, 20, Sampler(SamplingParams(**params)))
    other = decode(
        Decoder(student.model), ids, 20, Sampler(SamplingParams(**{**params, "seed": 8}))
    )
    assert first == again and first != other
    assert first == sample_tokens(student.model, ids, max_new_tokens=20, cache=False, **params)
    assert first == sample_tokens(student.model, ids, max_new_tokens=20, **params)


def test_generation_past_the_context_slides_a_window(student):
    """More tokens than the context holds: the cache cannot, so every token re-runs the last
    ``context`` tokens; within the context both loops give the same tokens."""
    ids = _ids(student, PROMPTS[0])
    steps = 40 - len(ids)  # the tiny model reads 32
    out = sample_tokens(student.model, ids, max_new_tokens=steps, temperature=0)
    assert len(out) == 40
    within = 32 - len(ids)
    assert out[:32] == sample_tokens(student.model, ids, max_new_tokens=within, temperature=0)


def test_step_logits_match_a_full_forward(student):
    """Each cached step's logits are those of the whole sequence run again (to float rounding)."""
    import torch

    decoder = Decoder(student.model)
    ids = _ids(student, PROMPTS[1])
    batch, logits = decoder.prefill(ids)
    tokens = [5, 17, 42]
    for token in tokens:
        batch, step_logits = decoder.step(batch, [token])
        ids = ids + [token]
        with torch.no_grad():
            full = student.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        torch.testing.assert_close(step_logits[0], full, rtol=1e-4, atol=1e-4)


def test_top_p_keeps_only_the_nucleus():
    import torch

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    picks = {sampler.pick(logits) for _ in range(200)}
    assert picks == {0, 1}


def test_threads_follow_the_size_of_a_forward(student, monkeypatch):
    """One intra-op thread per WORK_PER_THREAD multiply-adds (rounded up), at most the count
    torch had when the decoder was made; a fixed count is used as given; the process-wide
    setting is as before after each forward."""
    import torch

    from memstore_gpt2.serve import decoding

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    decoder = Decoder(student.model)
    per_token = decoder.work_per_token
    assert 0 < per_token < sum(p.numel() for p in student.model.parameters())  # rows left out
    monkeypatch.setattr(decoding, "WORK_PER_THREAD", per_token * 10)
    assert [decoder.threads_for(n) for n in (1, 10, 11, 25, 1000)] == [1, 1, 2, 3, 4]
    assert Decoder(student.model, threads=3).threads_for(1000) == 3
    from memstore.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="threads must be >= 1"):
        Decoder(student.model, threads=0)


def test_a_forward_runs_on_its_threads_and_restores_the_setting(student, monkeypatch):
    import torch

    from memstore_gpt2.serve import decoding

    seen = []
    original = decoding.Decoder._block

    def spy(self, *args):
        seen.append(torch.get_num_threads())
        return original(self, *args)

    monkeypatch.setattr(decoding.Decoder, "_block", spy)
    before = torch.get_num_threads()
    decoder = Decoder(student.model, threads=1 if before > 1 else 2)
    batch, _ = decoder.prefill(_ids(student, PROMPTS[0]))
    decoder.step(batch, [5])
    assert set(seen) == {decoder.threads} and torch.get_num_threads() == before
