"""Continuous batching: every request decodes the tokens it would decode alone, whichever
requests share its steps, join or leave around it."""

from __future__ import annotations

import pytest

from memstore_gpt2.serve.decoding import Decoder, Sampler, SamplingParams, decode, greedy_decode
from memstore_gpt2.serve.scheduler import (
    Failed,
    Finished,
    PromptScores,
    Request,
    Scheduler,
    Token,
)

PROMPTS = ["The for statement", "A list is", "x", "Functions return", "import sys"]


def _ids(student, text):
    return student.tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(scheduler, requests):
    """Submit all before the thread starts (so the admission order is fixed), then collect."""
    for request in requests:
        scheduler.submit(request)
    scheduler.start()
    try:
        out = []
        for request in requests:
            events = list(request.stream(timeout=60))
            assert not any(isinstance(e, Failed) for e in events), events
            out.append(events)
        return out
    finally:
        scheduler.stop()


def _tokens(events):
    return [e.id for e in events if isinstance(e, Token)]


def test_kv_batch_join_and_leave_keep_each_sequence_exact(student):
    """Driven by hand: A runs alone, B joins (left-padded), A leaves, C joins: greedy tokens of
    each equal its greedy tokens alone."""
    decoder = Decoder(student.model)
    ids = {name: _ids(student, text) for name, text in zip("ABC", PROMPTS[:3], strict=True)}
    alone = {name: greedy_decode(decoder, p, 10)[len(p) :] for name, p in ids.items()}
    got = {name: [] for name in ids}
    pick = Sampler(SamplingParams(0.0)).pick

    def start(name):
        cache, logits = decoder.prefill(ids[name])
        got[name].append(pick(logits[-1]))
        return cache

    batch = start("A")
    order = ["A"]
    for step in range(9):
        if step == 3:
            batch, order = batch.append(start("B")), order + ["B"]
        if step == 6:
            keep = [i for i, n in enumerate(order) if n != "A"]
            batch, order = batch.select(keep), [order[i] for i in keep]
            batch, order = batch.append(start("C")), order + ["C"]
        batch, logits = decoder.step(batch, [got[n][-1] for n in order])
        for row, name in enumerate(order):
            got[name].append(pick(logits[row]))
    for name in "ABC":
        n = len(got[name])
        assert got[name] == alone[name][:n], name


@pytest.mark.parametrize("max_batch", [1, 2, 16])
def test_batched_greedy_equals_unbatched_greedy(student, max_batch):
    """Different prompt lengths and max_tokens: with max_batch 2 requests leave at different
    steps and the waiting ones join a running batch."""
    decoder = Decoder(student.model)
    prompts = [_ids(student, text) for text in PROMPTS]
    lengths = [12, 3, 9, 1, 6]
    expected = [
        greedy_decode(decoder, p, n)[len(p) :] for p, n in zip(prompts, lengths, strict=True)
    ]
    requests = [Request(p, n) for p, n in zip(prompts, lengths, strict=True)]
    events = _run(Scheduler(decoder, max_batch=max_batch), requests)
    assert [_tokens(e) for e in events] == expected
    assert all(isinstance(e[-1], Finished) and e[-1].reason == "length" for e in events)


def test_seeded_requests_in_one_batch_draw_as_they_would_alone(student):
    decoder = Decoder(student.model)
    prompts = [_ids(student, text) for text in PROMPTS[:3]]
    params = [SamplingParams(0.9, top_k=40, seed=s) for s in (1, 2, 3)]
    expected = [
        decode(decoder, p, 8, Sampler(sp))[len(p) :] for p, sp in zip(prompts, params, strict=True)
    ]
    requests = [Request(p, 8, sp) for p, sp in zip(prompts, params, strict=True)]
    assert [_tokens(e) for e in _run(Scheduler(decoder, max_batch=8), requests)] == expected


def test_prompt_scores_and_token_logprobs(student):
    import torch

    decoder = Decoder(student.model)
    prompt = _ids(student, PROMPTS[0])
    request = Request(prompt, 2, logprobs=3, score_prompt=True)
    events = _run(Scheduler(decoder), [request])[0]
    scores = events[0]
    assert isinstance(scores, PromptScores) and len(scores.scores) == len(prompt) - 1
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), prompt[1:]]
    got = torch.tensor([s.logprob for s in scores.scores])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    token = events[1]
    assert isinstance(token, Token) and len(token.logprobs.top) == 3
    assert token.logprobs.top[0][0] == token.id  # greedy: the chosen token is the likeliest


def test_eos_ends_a_request_with_stop(student):
    decoder = Decoder(student.model)
    prompt = _ids(student, PROMPTS[0])
    first = greedy_decode(decoder, prompt, 1)[-1]
    events = _run(Scheduler(decoder), [Request(prompt, 5, eos_id=first)])[0]
    assert _tokens(events) == [first] and events[-1] == Finished("stop")


def test_bad_max_batch_is_refused(student):
    from memstore.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="max_batch"):
        Scheduler(Decoder(student.model), max_batch=0)


def test_a_tuning_scheduler_measures_its_threads_before_it_serves(student):
    """``tune_threads``: the scheduler thread times its thread counts at 1, 4 and ``max_batch``
    sequences first; ``ready`` is set once it takes requests, which decode as usual."""
    decoder = Decoder(student.model)
    scheduler = Scheduler(decoder, max_batch=8, tune_threads=True)
    assert not scheduler.ready.is_set()
    request = Request(_ids(student, PROMPTS[0]), max_tokens=6)
    [events] = _run(scheduler, [request])
    assert scheduler.ready.is_set()
    assert set(decoder.tuned_threads) == {1, 4, 8}
    tokens = [e.id for e in events if isinstance(e, Token)]
    expected = greedy_decode(Decoder(student.model), request.prompt_ids, 6)
    assert request.prompt_ids + tokens == expected
