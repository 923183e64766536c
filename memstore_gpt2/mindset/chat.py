"""Mindset's chat pane: the student replies as ``memstore serve`` would, and every reply token
carries the memory rows that fired for it.

Nothing here generates text on its own: the conversation goes through serve's plain chat
template (:func:`memstore_gpt2.serve.app.render_chat`), the reply is decoded by serve's KV-cache
:class:`~memstore_gpt2.serve.decoding.Decoder` under its :class:`~memstore_gpt2.serve.scheduler.
Scheduler` (one sequence at a time here) and cut at the next turn by serve's
:class:`~memstore_gpt2.serve.app.Choice`, so a reply equals what ``/v1/chat/completions`` answers
for the same messages and sampling. The rows are then the trace of the conversation and its reply,
token for token (:func:`memstore_gpt2.mindset.trace.trace_tokens`): the top-k each memory layer
selected in one forward pass over that text -- exactly what ``memstore trace`` shows for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memstore.errors import InvalidInputError, MemstoreError, bad_parameter

#: Reply length when the page asks none (the context may leave less).
DEFAULT_REPLY_TOKENS = 48
#: The most messages one conversation may send (each is checked before anything runs).
MAX_MESSAGES = 500


class ChatFailedError(MemstoreError, RuntimeError):
    """The model could not produce a reply (e.g. the memory database failed mid-decoding)."""


@dataclass
class ChatReply:
    """One reply: its text (cut where the model starts the next turn), the token ids the model
    generated for it, the rendered conversation it continued and why it ended (``"stop"``: the
    next turn or the end-of-text token; ``"length"``: ``max_tokens``)."""

    text: str
    token_ids: list[int]
    prompt: str
    prompt_ids: list[int]
    finish_reason: str


def chat_prompt(messages) -> str:
    """The conversation rendered by serve's template, after checking every message is text the
    tokenizer can read (JSON may carry a lone surrogate, which it would reject with a 500)."""
    from memstore_gpt2.serve.app import ApiError, render_chat

    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise bad_parameter("messages", f"holds {len(messages)} messages; at most {MAX_MESSAGES}")
    try:
        prompt = render_chat(messages)
    except ApiError as exc:  # serve's 400: the same words, as Mindset's error
        raise InvalidInputError(exc.message, parameter="messages") from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_parameter(
            "messages", f"are not valid Unicode: a lone surrogate {prompt[exc.start]!r}"
        ) from None
    return prompt


class ChatEngine:
    """Serve's decoder and scheduler over one loaded model; :meth:`reply` runs one request at a
    time (the caller holds Mindset's model lock, so nothing else uses the model meanwhile)."""

    def __init__(self, model, tokenizer) -> None:
        from memstore_gpt2.serve.decoding import Decoder
        from memstore_gpt2.serve.scheduler import Scheduler

        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(Decoder(model), max_batch=1).start()

    def close(self) -> None:
        self.scheduler.stop()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def reply(self, prompt: str, prompt_ids: list[int], max_tokens: int, sampling,
              packs: tuple[str, ...] | None = None) -> ChatReply:  # fmt: skip
        """The reply to a rendered conversation, decoded as serve decodes a chat completion;
        ``packs``: the attached knowledge packs that act on it (None: all; empty: none)."""
        from memstore_gpt2.serve.app import (
            CHAT_STOPS,
            EVENT_TIMEOUT_S,
            ApiError,
            Choice,
            TextStream,
        )
        from memstore_gpt2.serve.scheduler import Request

        eos = self.tokenizer.eos_token_id
        request = Request(list(prompt_ids), max_tokens, sampling, eos_id=eos, packs=packs)
        choice = Choice(0, request, TextStream(self.decode, list(CHAT_STOPS)))
        self.scheduler.submit(request)
        try:
            text = choice.text()
        except ApiError as exc:  # the scheduler reported a failure of the model
            raise ChatFailedError(exc.message) from None
        if choice.stream.stopped:  # cancelled at the next turn: wait until the scheduler lets go
            for _ in request.stream(timeout=EVENT_TIMEOUT_S):
                pass
        ids = self._covering(choice.tokens, text, eos)
        return ChatReply(text, ids, prompt, list(prompt_ids), choice.finish_reason or "stop")

    def _covering(self, tokens: list[int], text: str, eos: int | None) -> list[int]:
        """The fewest generated tokens whose text starts with the reply: the reply's tokens. The
        last may reach past the cut (``"\\n\\n"`` where the reply ends in ``"\\n"`` before the
        next ``User:``); the end-of-text token is never one of them."""
        if not text:
            return []
        for n in range(1, len(tokens) + 1):
            if self.decode(tokens[:n]).startswith(text):
                return list(tokens[:n])
        return [t for t in tokens if t != eos]
