"""The OpenAI HTTP API over a :class:`~memstore_gpt2.serve.scheduler.Scheduler` (Flask).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (both with SSE streaming in OpenAI's format) and ``GET /metrics``
(Prometheus text, with the memory's paging counters). Errors are OpenAI's JSON, ``{"error":
{"message", "type", "param", "code"}}``; bad input is a 4xx, never a 500.

Each HTTP request runs in its own thread (werkzeug's threaded server) and only talks to the
scheduler through its :class:`~memstore_gpt2.serve.scheduler.Request`; the tokenizer is shared
behind a lock (a Rust tokenizer refuses concurrent use from several threads).

Safety: bound to a loopback address (the default), the server answers only requests whose
``Host`` is a loopback name, so a DNS-rebinding page cannot reach it; ``POST`` bodies must be
``application/json``, which a foreign page cannot send without a CORS preflight this server never
approves. ``--api-key`` requires ``Authorization: Bearer KEY`` on ``/v1/``.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from memstore.errors import InvalidInputError
from memstore_gpt2.commands import require_flask
from memstore_gpt2.local_pages import is_loopback_host
from memstore_gpt2.serve.decoding import SamplingParams
from memstore_gpt2.serve.scheduler import (
    Failed,
    Finished,
    PromptScores,
    Request,
    Scheduler,
    Token,
    TokenLogprobs,
)

#: Largest request body accepted (larger: 413); a prompt the model can read is far smaller.
MAX_BODY_BYTES = 1 << 20
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_PROMPTS = 64
#: completions' ``max_tokens`` when the request gives none (OpenAI's default).
DEFAULT_COMPLETION_TOKENS = 16
#: The plain chat template for base models (docs/serve.md): each message on its own paragraph as
#: ``Role: content``, then ``Assistant:`` for the model to continue; the reply stops where the
#: model starts the next turn.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: How long an HTTP thread waits for the scheduler's next event before giving up on it.
EVENT_TIMEOUT_S = 600.0


class ApiError(Exception):
    """An OpenAI-style error answer: HTTP ``status`` and the ``error`` object's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code
        )  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def render_chat(messages) -> str:
    """The plain chat template: ``System: ...``/``User: ...``/``Assistant: ...`` paragraphs, then
    ``Assistant:`` (the prompt the model continues)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                           f"got {role!r}", param="messages")  # fmt: skip
        parts.append(f"{CHAT_ROLES[role]}: {_message_text(message.get('content'), i)}")
    return "\n\n".join(parts) + "\n\nAssistant:"


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param="messages")  # fmt: skip


class TextStream:
    """Generated tokens -> text pieces, stopping at the first stop string.

    Holds back text that could still become a stop string and a trailing incomplete UTF-8
    character (decoded as U+FFFD), so a streamed piece is never taken back.
    """

    def __init__(self, decode, stops: list[str]) -> None:
        self._decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.decoded = 0  # tokens of ``ids`` that ``text`` is the decoding of
        self.emitted = 0
        self.stopped = False

    def hold(self, token: int) -> None:
        """Take one token without decoding yet: with no stop string to find, a text wanted only
        whole is decoded once, by :meth:`finish`."""
        self.ids.append(token)

    def add(self, token: int) -> str:
        """Take one token; the text now safe to send (possibly empty)."""
        self.ids.append(token)
        text = self._decode(self.ids)
        self.decoded = len(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in self.stops:
            for k in range(min(len(stop) - 1, safe - self.emitted), 0, -1):
                if text[safe - k : safe] == stop[:k]:
                    safe -= k
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text (the request ended)."""
        if self.decoded != len(self.ids):
            self.text, self.decoded = self._decode(self.ids), len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


@dataclass
class Metrics:
    """Counters for ``/metrics`` (one lock: HTTP threads update them)."""

    requests: dict = field(default_factory=dict)  # (endpoint, status) -> count
    latency_counts: dict = field(default_factory=dict)  # endpoint -> per-bucket counts (+Inf last)
    latency_sum: dict = field(default_factory=dict)
    pack_requests: dict = field(default_factory=dict)  # pack name -> requests it acted on
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, status: int, seconds: float | None) -> None:
        with self.lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is None:
                return
            counts = self.latency_counts.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def record_packs(self, names) -> None:
        with self.lock:
            for name in names:
                self.pack_requests[name] = self.pack_requests.get(name, 0) + 1


class ServeState:
    """What the HTTP threads share: the model's name and context, the tokenizer (behind a lock),
    the scheduler, the optional API key and the metrics."""

    def __init__(self, model_name: str, tokenizer, scheduler: Scheduler, *,
                 api_key: str | None = None, loopback_only: bool = True) -> None:  # fmt: skip
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.context = scheduler.decoder.context
        #: Counters of the pack watcher (``serve.pack_watch.PackWatchStats``); None: none.
        self.pack_watch = None
        self.api_key = api_key
        self.loopback_only = loopback_only
        self.metrics = Metrics()
        self.created = int(time.time())
        self.paging: dict = {}
        #: The memory refresher's counters (``serve.refresh.RefreshStats``); None: no memory.
        self.refresh = None
        self._tokenizer_lock = threading.Lock()

    @property
    def packs(self) -> list[str]:
        """The knowledge packs served now (``--pack``); a request chooses among them."""
        return list(self.scheduler.decoder.pack_names)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode([token])

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id


# -- request fields ----------------------------------------------------------------------------------
def _number(data: dict, name: str, default, low: float, high: float, *, integer=False):
    value = data.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind}, got {json.dumps(value)}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be within [{low}, {high}], got {value}", param=name)
    return value


def _flag(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(value)}", param=name)
    return value


def _stops(data: dict, extra: tuple[str, ...] = ()) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings", param="stop")
    return stops + list(extra)


def _sampling(data: dict) -> SamplingParams:
    top_k = _number(data, "top_k", None, -1, 1 << 30, integer=True)
    return SamplingParams(
        temperature=float(_number(data, "temperature", 1.0, 0.0, 100.0)),
        top_k=top_k if top_k and top_k > 0 else None,
        top_p=float(_number(data, "top_p", 1.0, 0.0, 1.0)) or 1.0,
        seed=_number(data, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
    )


def _common_checks(state: ServeState, data: dict) -> None:
    model = data.get("model")
    if model is not None and model != state.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has "
                       f"{state.model_name!r}", param="model", code="model_not_found")  # fmt: skip
    n = _number(data, "n", 1, 1, 1 << 30, integer=True)
    if n != 1:
        raise ApiError(400, "n must be 1 (one choice per prompt)", param="n")
    if data.get("top_p") == 0:
        raise ApiError(400, "top_p must be greater than 0", param="top_p")


def _packs(state: ServeState, data: dict) -> tuple[str, ...] | None:
    """The loaded packs a request chose (``"pack"``: a name or a list of names; absent or null:
    every loaded pack; ``[]``: the bare student)."""
    from memstore_gpt2.packs.attach import chosen_packs

    try:
        return chosen_packs(data.get("pack"), state.packs, "this server")
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param="pack") from None


def _prompts(state: ServeState, prompt) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt: a string, a list of strings, a list of token ids or a
    list of such lists (as OpenAI's completions accept)."""
    vocab = len(state.tokenizer)

    def ids_of(tokens) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                   for t in tokens):  # fmt: skip
            raise ApiError(400, f"prompt token ids must be integers in [0, {vocab})",
                           param="prompt")  # fmt: skip
        return list(tokens)

    if isinstance(prompt, str):
        items = [(prompt, state.encode(prompt))]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        items = [(p, state.encode(p)) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        items = [(None, ids_of(p)) for p in prompt]
    elif isinstance(prompt, list) and prompt:
        items = [(None, ids_of(prompt))]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings or of token ids",
                       param="prompt")  # fmt: skip
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    for _, ids in items:
        if not ids:
            raise ApiError(400, "a prompt is empty after tokenization", param="prompt")
    return items


def _max_tokens(state: ServeState, data: dict, prompt_len: int, default: int | None) -> int:
    room = state.context - prompt_len
    asked = _number(data, "max_tokens", None, 0, 1 << 30, integer=True)
    if asked is None:
        asked = _number(data, "max_completion_tokens", None, 0, 1 << 30, integer=True)
    if room < 0 or (room == 0 and asked != 0):
        raise ApiError(400, f"this model's maximum context length is {state.context} tokens; "
                       f"the prompt has {prompt_len}", param="prompt",
                       code="context_length_exceeded")  # fmt: skip
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise ApiError(400, f"this model's maximum context length is {state.context} tokens; "
                       f"the prompt has {prompt_len} and max_tokens asks {asked} more",
                       param="max_tokens", code="context_length_exceeded")  # fmt: skip
    return asked


# -- running requests ------------------------------------------------------------------------------
@dataclass
class Choice:
    """One prompt's generation as it comes in: text pieces, logprobs, finish reason."""

    index: int
    request: Request
    stream: TextStream
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_scores: PromptScores | None = None
    finish_reason: str | None = None

    def text(self) -> str:
        """The whole generated text (a request that does not stream). With no stop string to
        watch for, nothing needs doing per token: this waits for the request's end and decodes
        once, rather than waking at every token beside the scheduler's thread."""
        whole = not self.stream.stops
        if whole:
            self.request.done.wait(EVENT_TIMEOUT_S)
        return "".join(self.events(whole=whole))

    def events(self, whole: bool = False) -> Iterator[str]:
        """Text pieces until the request ends (sets ``finish_reason``); cancels the request at a
        stop string, and when the consumer goes away. ``whole``: no piece before the end (no
        stop strings; see :meth:`text`)."""
        try:
            for event in self.request.stream(timeout=EVENT_TIMEOUT_S):
                if isinstance(event, PromptScores):
                    self.prompt_scores = event
                elif isinstance(event, Token):
                    self.tokens.append(event.id)
                    if event.logprobs is not None:
                        self.logprobs.append(event.logprobs)
                    if whole:
                        self.stream.hold(event.id)
                        continue
                    piece = self.stream.add(event.id)
                    if self.stream.stopped:
                        self.request.cancel()
                        self.finish_reason = "stop"
                        yield piece
                        return
                    if piece:
                        yield piece
                elif isinstance(event, Finished):
                    self.finish_reason = "length" if event.reason == "length" else "stop"
                    rest = self.stream.finish()
                    if rest:
                        yield rest
                    return
                elif isinstance(event, Failed):
                    raise ApiError(500, f"the model failed: {event.message}", type="server_error")
        finally:
            if self.finish_reason is None:
                self.request.cancel()


def _start(state: ServeState, data: dict, prompts, stops, *, logprobs, echo,
           default_tokens) -> list[Choice]:  # fmt: skip
    sampling = _sampling(data)
    try:
        sampling.validate()
    except InvalidInputError as exc:
        raise ApiError(400, str(exc), param=exc.parameter) from None
    packs = _packs(state, data)
    planned = []
    for _, ids in prompts:
        planned.append((ids, _max_tokens(state, data, len(ids), default_tokens)))
    choices = []
    for index, (ids, max_tokens) in enumerate(planned):
        request = Request(ids, max_tokens, SamplingParams(**vars(sampling)), logprobs=logprobs,
                          score_prompt=echo and logprobs is not None, eos_id=state.eos_id,
                          packs=packs)  # fmt: skip
        state.scheduler.submit(request)
        choices.append(Choice(index, request, TextStream(state.decode, stops)))
    state.metrics.record_packs(state.packs if packs is None else packs)
    return choices


def _completion_logprobs(state: ServeState, choice: Choice, prompt_ids: list[int] | None):
    """OpenAI's completions ``logprobs`` object: tokens, token_logprobs, top_logprobs,
    text_offset (characters into the returned text)."""
    tokens, token_logprobs, top_logprobs = [], [], []
    if prompt_ids is not None:
        scores = choice.prompt_scores.scores if choice.prompt_scores else []
        for i, token in enumerate(prompt_ids):
            tokens.append(state.token_text(token))
            if i == 0:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(scores[i - 1].logprob)
                top_logprobs.append(_top(state, scores[i - 1]))
    for token, scored in zip(choice.tokens, choice.logprobs, strict=False):
        tokens.append(state.token_text(token))
        token_logprobs.append(scored.logprob)
        top_logprobs.append(_top(state, scored))
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}  # fmt: skip


def _top(state: ServeState, scored: TokenLogprobs) -> dict[str, float]:
    return {state.token_text(token): value for token, value in scored.top}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _include_usage(data: dict) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return _flag(options, "include_usage")


# -- the application --------------------------------------------------------------------------------
def create_app(state: ServeState):
    """The Flask application answering the OpenAI API over ``state``."""
    require_flask("serve")
    from flask import Flask, Response, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("memstore_serve")
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    def error_response(exc: ApiError):
        return jsonify(exc.body()), exc.status

    @app.before_request
    def guard():
        g.started = time.perf_counter()
        if state.loopback_only:
            if not is_loopback_host(request.host or ""):
                raise ApiError(403, f"host {request.host!r} refused: this server answers "
                               "loopback names only", code="host_refused")  # fmt: skip
        if state.api_key is not None and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            if header != f"Bearer {state.api_key}":
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                               code="invalid_api_key")  # fmt: skip
        return None

    @app.after_request
    def count(response):
        if not response.is_streamed:  # a stream records itself when it ends
            started = getattr(g, "started", None)
            seconds = None if started is None else time.perf_counter() - started
            state.metrics.record(request.path if request.url_rule else "other",
                                 response.status_code, seconds)  # fmt: skip
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = {413: f"the request body is over {MAX_BODY_BYTES} bytes"}.get(
            exc.code, exc.description or exc.name
        )
        return error_response(ApiError(exc.code or 400, message, code=codes.get(exc.code)))

    @app.errorhandler(InvalidInputError)
    def invalid_input(exc: InvalidInputError):
        return error_response(ApiError(400, str(exc).splitlines()[0], param=exc.parameter))

    def body() -> dict:
        if not request.is_json:
            raise ApiError(415, "send a JSON object with Content-Type: application/json",
                           code="unsupported_media_type")  # fmt: skip
        raw = request.get_data(cache=True)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})",
                           code="invalid_json") from None  # fmt: skip
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def streamed(endpoint: str, chunks: Iterator[str]):
        started = g.started

        def run():
            status = 200
            try:
                yield from chunks
            except ApiError as exc:  # the model failed mid-stream: the client sees it
                status = exc.status
                yield _sse(exc.body())
            finally:
                state.metrics.record(endpoint, status, time.perf_counter() - started)
            yield "data: [DONE]\n\n"

        return Response(run(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.get("/health")
    def health():
        return jsonify(status="ok", model=state.model_name, packs=state.packs)

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[_model_card(state)])

    @app.get("/v1/models/<path:name>")
    def model(name):
        if name != state.model_name:
            raise ApiError(404, f"the model {name!r} does not exist", param="model",
                           code="model_not_found")  # fmt: skip
        return jsonify(_model_card(state))

    @app.post("/v1/completions")
    def completions():
        data = body()
        _common_checks(state, data)
        prompts = _prompts(state, data.get("prompt"))
        if data.get("logprobs") is True:  # some clients send a flag: the chosen token only
            logprobs = 0
        elif data.get("logprobs") is False:
            logprobs = None
        else:
            logprobs = _number(data, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        echo, stream = _flag(data, "echo"), _flag(data, "stream")
        include_usage = _include_usage(data) if stream else False
        stops = _stops(data)
        choices = _start(state, data, prompts, stops, logprobs=logprobs, echo=echo,
                         default_tokens=DEFAULT_COMPLETION_TOKENS)  # fmt: skip
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": state.model_name}  # fmt: skip
        prompt_tokens = sum(len(ids) for _, ids in prompts)

        def prompt_text(i):
            text, ids = prompts[i]
            return text if text is not None else state.decode(ids)

        if not stream:
            out = []
            for choice in choices:
                text = choice.text()
                if echo:
                    text = prompt_text(choice.index) + text
                lp = None
                if logprobs is not None:
                    lp = _completion_logprobs(state, choice,
                                              prompts[choice.index][1] if echo else None)  # fmt: skip
                out.append({"index": choice.index, "text": text, "logprobs": lp,
                            "finish_reason": choice.finish_reason})  # fmt: skip
            completion = sum(len(c.tokens) for c in choices)
            return jsonify({**head, "choices": out, "usage": _usage(prompt_tokens, completion)})

        def chunks():
            for choice in choices:
                if echo:
                    yield _sse({**head, "choices": [{"index": choice.index,
                                "text": prompt_text(choice.index), "logprobs": None,
                                "finish_reason": None}]})  # fmt: skip
                seen = 0
                for piece in choice.events():
                    lp = None
                    if logprobs is not None:
                        lp = _stream_logprobs(state, choice, seen)
                        seen = len(choice.logprobs)
                    yield _sse({**head, "choices": [{"index": choice.index, "text": piece,
                                "logprobs": lp, "finish_reason": None}]})  # fmt: skip
                yield _sse({**head, "choices": [{"index": choice.index, "text": "",
                            "logprobs": None, "finish_reason": choice.finish_reason}]})  # fmt: skip
            if include_usage:
                completion = sum(len(c.tokens) for c in choices)
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion)})

        return streamed("/v1/completions", chunks())

    @app.post("/v1/chat/completions")
    def chat_completions():
        data = body()
        _common_checks(state, data)
        if data.get("logprobs"):
            raise ApiError(400, "logprobs are not offered for chat; use /v1/completions",
                           param="logprobs")  # fmt: skip
        prompt = render_chat(data.get("messages"))
        prompts = _prompts(state, prompt)
        stream = _flag(data, "stream")
        include_usage = _include_usage(data) if stream else False
        stops = _stops(data, CHAT_STOPS)
        choices = _start(state, data, prompts, stops, logprobs=None, echo=False,
                         default_tokens=None)  # fmt: skip
        choice = choices[0]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": state.model_name}  # fmt: skip
        prompt_tokens = len(prompts[0][1])
        if not stream:
            text = choice.text()
            return jsonify({**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": choice.finish_reason}],
                "usage": _usage(prompt_tokens, len(choice.tokens))})  # fmt: skip
        head["object"] = "chat.completion.chunk"

        def chunks():
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                        "content": ""}, "logprobs": None, "finish_reason": None}]})  # fmt: skip
            for piece in choice.events():
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": piece},
                            "logprobs": None, "finish_reason": None}]})  # fmt: skip
            yield _sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                        "finish_reason": choice.finish_reason}]})  # fmt: skip
            if include_usage:
                yield _sse({**head, "choices": [],
                            "usage": _usage(prompt_tokens, len(choice.tokens))})  # fmt: skip

        return streamed("/v1/chat/completions", chunks())

    @app.get("/metrics")
    def metrics():
        return Response(render_metrics(state), mimetype="text/plain; version=0.0.4")

    return app


def _stream_logprobs(state: ServeState, choice: Choice, seen: int) -> dict:
    """The logprobs of the tokens a streamed piece added (text_offset from the piece's start)."""
    tokens = choice.tokens[seen : len(choice.logprobs)]
    scored = choice.logprobs[seen:]
    texts = [state.token_text(t) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [_top(state, s) for s in scored], "text_offset": offsets}  # fmt: skip


def _model_card(state: ServeState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "memstore", "max_model_len": state.context,
            "packs": state.packs}  # fmt: skip


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(state: ServeState) -> str:
    """Prometheus text exposition: requests, tokens, latency, batching and the memory's paging
    (counters since the server loaded the student)."""
    stats = state.scheduler.stats
    paging = dict(state.paging)
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{name}{label} {value}")

    with state.metrics.lock:
        requests = sorted(state.metrics.requests.items())
        latency = {k: list(v) for k, v in state.metrics.latency_counts.items()}
        latency_sum = dict(state.metrics.latency_sum)
        pack_requests = dict(state.metrics.pack_requests)
    metric("memstore_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
           [((("endpoint", e), ("status", s)), n) for (e, s), n in requests])  # fmt: skip
    lines.append("# HELP memstore_request_duration_seconds Time from request to last byte.")
    lines.append("# TYPE memstore_request_duration_seconds histogram")
    for endpoint, counts in sorted(latency.items()):
        for bound, n in zip(LATENCY_BUCKETS, counts, strict=False):
            lines.append(f'memstore_request_duration_seconds_bucket{{endpoint="{endpoint}",'
                         f'le="{bound}"}} {n}')  # fmt: skip
        lines.append(f'memstore_request_duration_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}}'
                     f" {counts[-1]}")  # fmt: skip
        lines.append(f'memstore_request_duration_seconds_sum{{endpoint="{endpoint}"}} '
                     f"{latency_sum.get(endpoint, 0.0)}")  # fmt: skip
        lines.append(f'memstore_request_duration_seconds_count{{endpoint="{endpoint}"}} '
                     f"{counts[-1]}")  # fmt: skip
    metric("memstore_pack_requests_total", "counter",
           "Requests each loaded knowledge pack acted on (a request chooses with \"pack\").",
           [((("pack", _label(name)),), pack_requests.get(name, 0)) for name in state.packs])  # fmt: skip
    metric("memstore_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [((), stats.prompt_tokens)])  # fmt: skip
    metric("memstore_generation_tokens_total", "counter", "Tokens generated.",
           [((), stats.generated_tokens)])  # fmt: skip
    metric("memstore_model_tokens_total", "counter",
           "Tokens run through the model (prompts and decoding steps).",
           [((), stats.model_tokens)])  # fmt: skip
    metric("memstore_decode_steps_total", "counter", "Batched decoding steps.",
           [((), stats.steps)])  # fmt: skip
    metric("memstore_decode_step_sequences_total", "counter",
           "Sequences run by those steps (divided by the steps: the mean batch size).",
           [((), stats.stepped_sequences)])  # fmt: skip
    metric("memstore_active_sequences", "gauge", "Sequences in the running batch.",
           [((), stats.active)])  # fmt: skip
    metric("memstore_waiting_requests", "gauge", "Requests waiting to join the batch.",
           [((), stats.waiting)])  # fmt: skip
    metric("memstore_model_failures_total", "counter", "Model runs that failed (e.g. database).",
           [((), stats.failures)])  # fmt: skip
    decoder = state.scheduler.decoder
    metric("memstore_decode_threads", "gauge",
           "CPU threads a decoding step of that many sequences uses (measured at start, or "
           "--threads); 0 off a CPU.",
           [((("sequences", n),), decoder.threads_for(n) or 0)
            for n in sorted({1, *decoder.tuned_threads, state.scheduler.max_batch})])  # fmt: skip
    tokens = stats.model_tokens
    rows_read = paging.get("rows_read", 0)
    lookups = paging.get("cache_lookups", 0)
    metric("memstore_memory_resident_rows", "gauge", "Memory rows held in memory now.",
           [((), paging.get("resident_rows", 0))])  # fmt: skip
    metric("memstore_memory_paged_layers", "gauge", "Memory layers paging from the database.",
           [((), paging.get("paged_layers", 0))])  # fmt: skip
    metric("memstore_memory_rows_paged_total", "counter",
           "Memory rows read from the database (cache misses of the paged layers).",
           [((), rows_read)])  # fmt: skip
    metric("memstore_memory_row_lookups_total", "counter",
           "Distinct memory rows the paged layers asked their cache for, per forward.",
           [((), lookups)])  # fmt: skip
    metric("memstore_memory_cache_hit_rate", "gauge",
           "Share of those lookups found in the cache (1 when nothing pages).",
           [((), paging.get("cache_hit_rate", 1.0))])  # fmt: skip
    metric("memstore_memory_rows_paged_per_token", "gauge",
           "Memory rows read from the database per token run through the model.",
           [((), rows_read / tokens if tokens else 0.0)])  # fmt: skip
    metric("memstore_memory_row_lookups_per_token", "gauge",
           "Paged-layer row lookups per token run through the model.",
           [((), lookups / tokens if tokens else 0.0)])  # fmt: skip
    counters = (  # (metric, help, counters object, its field); an absent object counts 0
        ("memstore_memory_refreshes_total", "Memory collections re-read after another process "
         "recorded a change of them (an edit, a pack), between decoding steps.",
         state.refresh, "refreshes"),
        ("memstore_memory_rows_refreshed_total", "Memory rows those refreshes read again or "
         "dropped from a cache.", state.refresh, "rows"),
        ("memstore_memory_reloads_total", "Changes recorded for any row of a collection, "
         "which reload it whole.", state.refresh, "reloads"),
        ("memstore_memory_refresh_checks_total", "Checks for changes of the memory.",
         state.refresh, "checks"),
        ("memstore_memory_refresh_failures_total", "Checks or refreshes that failed (retried at "
         "the next check).", state.refresh, "failures"),
        ("memstore_pack_swaps_total", "Times the served knowledge packs changed (a pack learnt, "
         "imported or dropped while serving), between decoding steps.",
         state.pack_watch, "swaps"),
        ("memstore_pack_watch_failures_total", "Pack checks that failed, or packs refused (they "
         "do not fit this student).", state.pack_watch, "failures"),
    )  # fmt: skip
    for name, help_text, source, field_name in counters:
        value = 0 if source is None else getattr(source, field_name)
        metric(name, "counter", help_text, [((), value)])
    return "\n".join(lines) + "\n"
