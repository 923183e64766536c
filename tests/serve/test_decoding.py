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


class _FakeClock:
    """``time.perf_counter`` for :meth:`Decoder.tune_threads`: every decoding step advances it
    by what ``cost(threads, sequences)`` says a step of that many sequences on the decoder's
    current thread count takes, so the choice is tested without timing anything."""

    def __init__(self, decoder, monkeypatch, cost):
        from memstore_gpt2.serve import decoding

        self.now = 0.0
        real_step = decoder.step

        def step(batch, tokens, packs=None):
            self.now += cost(decoder.threads, batch.size)
            return real_step(batch, tokens, packs)

        monkeypatch.setattr(decoder, "step", step)
        monkeypatch.setattr(decoding.time, "perf_counter", lambda: self.now)


def test_tuned_threads_are_the_fewest_within_the_tolerance_of_the_fastest(student, monkeypatch):
    """Per batch size the thread count whose steps were fastest, unless fewer threads came
    within THREADS_TOLERANCE of it; sizes between two measured ones use the smaller's count,
    larger ones the work rule; ``threads`` fixed or a budget spent measures nothing more."""
    decoder = Decoder(student.model)
    decoder.max_threads = 4  # counts 1, 2, 4 whatever this machine has
    # one sequence: 2 threads 3 % slower than 4 but within the tolerance; 4 sequences: 4 threads
    # clearly fastest; 16: one thread fastest
    cost = {1: {1: 1.0, 2: 0.62, 4: 0.60}, 4: {1: 2.0, 2: 1.5, 4: 1.0}, 16: {1: 3.0, 2: 3.3, 4: 4}}
    _FakeClock(decoder, monkeypatch, lambda threads, size: cost[size][threads])
    assert decoder.tune_threads((1, 4, 16), budget_s=1e9) == {1: 2, 4: 4, 16: 1}
    assert decoder.threads is None  # what it set while measuring is undone
    assert [decoder.threads_for(n) for n in (1, 3, 4, 15, 16)] == [2, 2, 4, 4, 1]
    from memstore_gpt2.serve import decoding

    monkeypatch.setattr(decoding, "WORK_PER_THREAD", decoder.work_per_token)
    assert decoder.threads_for(17) == 4  # past the largest measured size: the rule
    assert decoder.describe_threads() == (
        "threads 2 at 1 sequence, 4 at 4 sequences, 1 at 16 sequences (measured)"
    )
    fixed = Decoder(student.model, threads=3)
    assert fixed.tune_threads() == {} and fixed.describe_threads() == "threads 3"
    # each step takes 1 s: the budget is spent after the first size
    slow = Decoder(student.model)
    slow.max_threads = 2
    _FakeClock(slow, monkeypatch, lambda threads, size: 1.0)
    assert slow.tune_threads((1, 4), budget_s=2.0) == {1: 1}
    assert slow.describe_threads() == "threads 1 at 1 sequence (measured)"
    assert Decoder(student.model).describe_threads() == "threads by step size"
    # one thread is all torch has: nothing is timed
    single = Decoder(student.model)
    single.max_threads = 1
    monkeypatch.setattr(single, "step", lambda *a, **k: pytest.fail("stepped"))
    monkeypatch.setattr(single, "prefill", lambda *a, **k: pytest.fail("prefilled"))
    assert single.tune_threads((1, 4)) == {1: 1, 4: 1}


def test_tuning_steps_change_no_answer(student):
    """Measuring the threads runs steps on a probe sequence only: the decoder then decodes
    exactly what an untuned one does."""
    ids = _ids(student, PROMPTS[0])
    expected = greedy_decode(Decoder(student.model), ids, 12)
    tuned = Decoder(student.model)
    assert set(tuned.tune_threads((1, 2), steps=1, rounds=1)) == {1, 2}
    assert greedy_decode(tuned, ids, 12) == expected
