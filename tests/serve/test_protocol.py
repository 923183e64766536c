"""The HTTP layer's pieces that need no model: streamed text and stop strings, the chat template,
and a model failure reaching the requests without stopping the scheduler."""

from __future__ import annotations

import pytest

from memstore_gpt2.serve.app import ApiError, TextStream, render_chat

PIECES = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\ufffd"}


def _decode(ids):
    """Tokens -> text as a byte-level tokenizer decodes them (5: half of a character, which
    decodes to U+FFFD until its second half, 6, arrives)."""
    text = ""
    for token in ids:
        if token == 6:
            text = text.removesuffix("\ufffd") + "é"
        else:
            text += PIECES[token]
    return text


def test_pieces_join_to_the_text_and_are_never_taken_back():
    stream = TextStream(_decode, [])
    pieces = [stream.add(t) for t in (1, 2, 5, 6, 3)]
    assert pieces == ["Hel", "lo", "", "é", " wo"]  # the half character is held back
    assert stream.finish() == "" and not stream.stopped


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
    stream = TextStream(_decode, ["o wor"])
    assert stream.add(1) == "Hel"
    assert stream.add(2) == "l"  # "o" may start the stop string: held back
    assert stream.add(3) == ""  # "o wo" still may
    assert stream.add(4) == "" and stream.stopped  # "o wor" found: the text ends before it
    assert stream.text == "Hell" and stream.finish() == ""


def test_held_back_text_that_is_no_stop_is_released():
    stream = TextStream(_decode, ["lo!"])
    assert stream.add(1) == "He"  # "l" may start "lo!"
    assert stream.add(2) == "l"  # so may "lo"
    assert stream.add(3) == "lo wo" and not stream.stopped


def test_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "And?"}]  # fmt: skip
    assert render_chat(messages) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: And?\n\nAssistant:"
    )
    for bad in ([], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ApiError) as error:
            render_chat(bad)
        assert error.value.status == 400 and error.value.param == "messages"


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on(student):
    from memstore_gpt2.serve.decoding import Decoder
    from memstore_gpt2.serve.scheduler import Failed, Finished, Request, Scheduler, Token

    class BrokenOnce(Decoder):
        broken = True

        def step(self, batch, tokens, packs=None):
            if self.broken:
                self.broken = False
                raise RuntimeError("database is locked\nsecond line")
            return super().step(batch, tokens, packs)

    ids = student.tokenizer("A list is", add_special_tokens=False)["input_ids"]
    scheduler = Scheduler(BrokenOnce(student.model), max_batch=4)
    first = [scheduler.submit(Request(ids, 3)) for _ in range(2)]
    scheduler.start()
    try:
        for request in first:
            events = list(request.stream(timeout=60))
            assert isinstance(events[0], Token)  # the prefill's token came before the failure
            assert events[-1] == Failed("RuntimeError: database is locked")
        after = list(scheduler.submit(Request(ids, 3)).stream(timeout=60))
        assert [type(e) for e in after] == [Token, Token, Token, Finished]
        assert scheduler.stats.failures == 1
    finally:
        scheduler.stop()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_decodes(student, precision):
    from memstore_gpt2.serve.decoding import Decoder, greedy_decode

    ids = student.tokenizer("A list is", add_special_tokens=False)["input_ids"]
    out = greedy_decode(Decoder(student.model, precision), ids, 6)
    assert out[: len(ids)] == ids and len(out) == len(ids) + 6
