"""Continuous batching: one thread runs a decoding step for every active request per iteration.

Requests wait in a queue; between two steps the scheduler admits as many as ``max_batch`` allows
(each prompt is prefilled on its own, then its cache joins the batch's), runs one step for the
whole batch, hands each request its token, and drops those that finished or were cancelled. So a
request never waits for another to finish, and a short one leaves as soon as it is done.

The model is used by this thread only; HTTP threads talk to it through :class:`Request` (a queue
of events each way). ``max_batch=1`` turns batching off (one request at a time, first come first
served), which is what the benchmark compares against. Between two steps (never during one) the
scheduler may also let the memory re-read rows another process edited
(:mod:`memstore_gpt2.serve.refresh`).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from memstore.errors import bad_parameter, typed_first_line
from memstore_gpt2.serve.decoding import (
    TUNED_BATCHES,
    Decoder,
    KVBatch,
    Sampler,
    SamplingParams,
)


@dataclass
class TokenLogprobs:
    """A token's log-probability under the model (raw logits, before temperature and cuts) and
    the ``top`` most likely tokens at its position as ``(token id, log-probability)`` pairs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Token:
    """A generated token (``logprobs`` when the request asked for them)."""

    id: int
    logprobs: TokenLogprobs | None = None


@dataclass
class PromptScores:
    """Log-probabilities of prompt tokens 1..T-1 given those before them (``echo`` + ``logprobs``);
    the first prompt token has none."""

    scores: list[TokenLogprobs]


@dataclass
class Finished:
    """The request ended: ``"stop"`` (end-of-text token), ``"length"`` (``max_tokens``) or
    ``"cancelled"``."""

    reason: str


@dataclass
class Failed:
    """The model could not run the request (e.g. the memory database failed); one line."""

    message: str


@dataclass
class Request:
    """One sequence to decode. ``logprobs``: how many top alternatives to report per token
    (None: no log-probabilities); ``score_prompt``: also score the prompt tokens; ``packs``: the
    server's knowledge packs that act on it (None: all it loaded; empty: the bare student)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(0.0))
    logprobs: int | None = None
    score_prompt: bool = False
    eos_id: int | None = None
    packs: tuple[str, ...] | None = None
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Set once the last event (:class:`Finished` or :class:`Failed`) is queued: a consumer
    #: that wants only the whole result waits on it instead of waking at every token.
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    id: int = field(default_factory=itertools.count().__next__)

    def put(self, event: object) -> None:
        """Hand the consumer an event (the scheduler's side)."""
        self.events.put(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def cancel(self) -> None:
        """Stop decoding this request (the client left, or a stop sequence was found)."""
        self.cancelled.set()

    def stream(self, timeout: float | None = None) -> Iterator[object]:
        """The request's events in order, ending with a :class:`Finished` or :class:`Failed`."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if isinstance(event, Finished | Failed):
                return


@dataclass
class _Active:
    request: Request
    sampler: Sampler
    last: int
    generated: int = 1


@dataclass
class SchedulerStats:
    """Counters since start: tokens run through the model (prompts + decode steps), generated
    tokens, decoding steps and the sequences those steps ran (their mean is the batch size)."""

    model_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    stepped_sequences: int = 0
    active: int = 0
    waiting: int = 0
    failures: int = 0


class Scheduler:
    """Owns the decoder and its thread; :meth:`submit` from any thread."""

    def __init__(self, decoder: Decoder, max_batch: int = 16, on_step=None, *,
                 refresh=None, refresh_interval: float = 0.5,
                 tune_threads: bool = False) -> None:  # fmt: skip
        """``on_step()`` runs in the scheduler thread after each iteration; ``refresh(admitting)``
        before each one, between steps (never during one): where the memory re-reads rows that
        another process changed (:mod:`memstore_gpt2.serve.refresh`); ``admitting`` is True when
        new requests are about to join. With ``refresh`` an idle scheduler still wakes every
        ``refresh_interval`` seconds to call it. ``tune_threads``: the thread first measures
        the decoder's CPU threads per batch size (:meth:`Decoder.tune_threads`, in this thread,
        at 1, 4, 16 sequences up to ``max_batch`` and at ``max_batch``); :attr:`ready` is set
        once it serves."""
        if max_batch < 1:
            raise bad_parameter("max_batch", f"must be >= 1, got {max_batch}")
        self.decoder = decoder
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._on_step = on_step
        self._refresh = refresh
        self._refresh_interval = refresh_interval
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._tune_threads = tune_threads
        #: Set when the thread takes requests (after measuring its threads, if asked to).
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memstore-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; it joins the running batch at the next step with room."""
        if request.max_tokens < 0:
            raise bad_parameter("max_tokens", f"must be >= 0, got {request.max_tokens}")
        if len(request.prompt_ids) + request.max_tokens > self.decoder.context:
            raise bad_parameter("max_tokens", "prompt and completion pass the model's context")
        with self._cond:
            self._pending.append(request)
            self.stats.waiting = len(self._pending)
            self._cond.notify_all()
        return request

    # -- the thread -------------------------------------------------------------------------------
    def _tune(self) -> None:
        sizes = [b for b in TUNED_BATCHES if b < self.max_batch] + [self.max_batch]
        try:
            self.decoder.tune_threads(sizes)
        except Exception:  # noqa: BLE001 - the rule then picks; a broken model fails requests
            self.stats.failures += 1

    def _run(self) -> None:
        if self._tune_threads:
            self._tune()
        self.ready.set()
        batch: KVBatch | None = None
        active: list[_Active] = []
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not active:
                    if self._refresh is None:
                        self._cond.wait()
                    elif not self._cond.wait(self._refresh_interval):
                        break  # idle: look for changes of the memory, then wait again
                if self._stopping:
                    break
                room = self.max_batch - len(active)
                admitted, self._pending = self._pending[:room], self._pending[room:]
                self.stats.waiting = len(self._pending)
            if self._refresh is not None:
                self._refresh(bool(admitted))
                if not admitted and not active:
                    continue
            try:
                for request in admitted:
                    batch, active = self._admit(request, batch, active)
                if active:
                    batch, active = self._step(batch, active)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory joining caches
                self.stats.failures += 1
                for entry in active:
                    entry.request.put(Failed(typed_first_line(exc)))
                batch, active = None, []
            self.stats.active = len(active)
            if self._on_step is not None:
                self._on_step()
        for entry in active:
            entry.request.put(Finished("cancelled"))
        with self._cond:
            for request in self._pending:
                request.put(Finished("cancelled"))
            self._pending = []

    def _admit(self, request: Request, batch, active):
        if request.cancelled.is_set():
            request.put(Finished("cancelled"))
            return batch, active
        try:
            cache, logits = self.decoder.prefill(request.prompt_ids, request.packs)
            self.stats.model_tokens += len(request.prompt_ids)
            self.stats.prompt_tokens += len(request.prompt_ids)
            if request.score_prompt:
                request.put(_prompt_scores(logits, request.prompt_ids, request.logprobs))
            if request.max_tokens == 0:
                request.put(Finished("length"))
                return batch, active
            sampler = Sampler(request.sampling)
            entry = _Active(request, sampler, last=-1, generated=0)
            if self._emit(entry, logits[-1]):
                return batch, active
            joined = cache if batch is None else batch.append(cache)
        except Exception as exc:  # noqa: BLE001 - reported to the request, the server goes on
            self.stats.failures += 1
            request.put(Failed(typed_first_line(exc)))
            return batch, active
        return joined, [*active, entry]

    def _step(self, batch: KVBatch, active: list[_Active]):
        try:
            batch, logits = self.decoder.step(
                batch, [entry.last for entry in active], [entry.request.packs for entry in active]
            )
        except Exception as exc:  # noqa: BLE001 - every request in the batch learns it
            self.stats.failures += 1
            for entry in active:
                entry.request.put(Failed(typed_first_line(exc)))
            return None, []
        self.stats.steps += 1
        self.stats.stepped_sequences += len(active)
        self.stats.model_tokens += len(active)
        keep = [row for row, entry in enumerate(active) if not self._emit(entry, logits[row])]
        if len(keep) == len(active):
            return batch, active
        if not keep:
            return None, []
        return batch.select(keep), [active[row] for row in keep]

    def _emit(self, entry: _Active, logits: torch.Tensor) -> bool:
        """Pick and hand over ``entry``'s next token; True when the request is done."""
        request = entry.request
        if request.cancelled.is_set():
            request.put(Finished("cancelled"))
            return True
        logits = logits.cpu()
        token = entry.sampler.pick(logits)
        scores = None
        if request.logprobs is not None:
            scores = _token_logprobs(torch.log_softmax(logits, dim=-1), token, request.logprobs)
        entry.last = token
        entry.generated += 1
        self.stats.generated_tokens += 1
        request.put(Token(token, scores))
        if request.eos_id is not None and token == request.eos_id:
            request.put(Finished("stop"))
            return True
        if entry.generated >= request.max_tokens:
            request.put(Finished("length"))
            return True
        return False


def _token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top > 0 else None
    pairs = (
        [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    )
    return TokenLogprobs(float(logprobs[token]), pairs)


def _prompt_scores(logits: torch.Tensor, ids: list[int], top: int | None) -> PromptScores:
    logprobs = torch.log_softmax(logits[:-1].cpu(), dim=-1)  # position t predicts ids[t + 1]
    return PromptScores(
        [_token_logprobs(logprobs[t], ids[t + 1], top or 0) for t in range(len(ids) - 1)]
    )
