"""Decoding a GPT-2 student with a KV cache, one token per step for a whole batch of sequences.

A memory layer replaces a block's MLP and, like the MLP, reads each token on its own, so only the
attention needs the past: caching its keys and values means every step runs the blocks on the new
token alone, and only the new token reads memory rows. The forward is written here over the
model's own modules (``wte``, ``wpe``, each block's ``ln_1``/``attn``/``ln_2``/``mlp``, ``ln_f``,
``lm_head``) rather than through transformers' ``past_key_values``, whose cache classes and
argument names change between versions (``memstore_gpt2.generate`` avoids them for that reason).

A :class:`KVBatch` holds the cache of several sequences of different lengths, left-padded to one
length with a mask, so one step runs them all. Sequences join (after a prefill of their prompt on
their own) and leave between steps; the columns every remaining sequence pads are dropped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memstore.errors import bad_parameter
from memstore_gpt2.lm_training import model_device
from memstore_gpt2.packs.attach import attached_packs, packs_acting

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: On a CPU, a forward that :meth:`Decoder.tune_threads` did not measure (one of more tokens than
#: its largest size: a long prefill, a larger batch; or a decoder never tuned, as ``memstore
#: generate``'s) gets one intra-op thread per this many multiply-adds of dense weights (tokens x
#: :func:`dense_work_per_token`, rounded up), up to all of them. A decoding step is hundreds of
#: small operations, and waking another thread for each costs more than it saves until each has
#: real work: with ``benchmarks/serve.py`` on 2 cores (docs/serve.md, Threads) a 128-wide student
#: (under 0.5M per token) served at 0.90 of the dense teacher's generate() on one thread and 0.60
#: on two.
WORK_PER_THREAD = 16_000_000

#: Sequences per step at which :meth:`Decoder.tune_threads` times the thread counts (those up to
#: a server's ``--max-batch``, and ``--max-batch`` itself).
TUNED_BATCHES = (1, 4, 16)

#: A thread count timed within this share of the fastest one's step time counts as fast: the
#: fewest such threads are chosen (more threads take cores from everything else for nothing).
THREADS_TOLERANCE = 0.05

#: :meth:`Decoder.tune_threads` times each count for at least this long per round.
ROUND_S = 0.02


def precision_context(device: torch.device, precision: str):
    """``torch.autocast`` to bf16/fp16 on ``device`` (weights stay fp32), nothing for fp32.

    bf16 is what ``memstore generate --precision bf16`` runs (``lm_training.autocast``); fp16 is
    offered for GPUs, where it is as fast and keeps three more mantissa bits.
    """
    if precision not in PRECISIONS:
        raise bad_parameter(
            "precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dense_work_per_token(model) -> int:
    """About the multiply-adds one token costs in ``model``'s dense weights: every parameter
    but the position table and memory rows (a token reads a few of those, by index); the token
    embedding counts once, as the output head it is tied to."""
    from memstore_torch.memory_layer import MemoryLayer

    skip = {id(model.transformer.wpe.weight)}
    for module in model.modules():
        if isinstance(module, MemoryLayer):
            for name in MemoryLayer.ROW_PARAMETER_NAMES:
                rows = getattr(module, name, None)
                if rows is not None:
                    skip.add(id(rows))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """torch's CPU intra-op threads set to ``count`` within the block (None: left as they
    are), as they were afterwards (the setting is process-wide)."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_summary(threads: dict[int, int]) -> str:
    """``1 at 1 sequence, 2 at 16 sequences`` of ``{sequences per step: threads}``."""
    return ", ".join(f"{t} at {n} sequence{'s' if n > 1 else ''}"
                     for n, t in sorted(threads.items()))  # fmt: skip


def check_threads(threads: int | None) -> None:
    """Refuse a thread count below 1 (None: the decoder's choice), before anything loads."""
    if threads is not None and threads < 1:
        raise bad_parameter("threads", f"must be >= 1, got {threads}")


def unsupported(config) -> str | None:
    """Why :class:`Decoder` cannot run a GPT-2 model of ``config`` (None: it can)."""
    if getattr(config, "reorder_and_upcast_attn", False):
        return "GPT-2 configs with reorder_and_upcast_attn are not served"
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 models with cross-attention are not served"
    return None


@dataclass
class KVBatch:
    """Keys and values of every block for ``B`` sequences, left-padded to a common length ``L``.

    ``keys[i]``/``values[i]``: block ``i``'s ``(B, heads, L, head_dim)``; ``mask``: ``(B, L)``,
    True where a real token sits; ``lengths``: each sequence's real token count, which is also the
    position of its next token.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def append(self, other: KVBatch) -> KVBatch:
        """This batch followed by ``other``'s sequences (the shorter side left-padded)."""
        width = max(self.width, other.width)
        a, b = self._padded(width), other._padded(width)
        return KVBatch(
            [torch.cat([x, y]) for x, y in zip(a.keys, b.keys, strict=True)],
            [torch.cat([x, y]) for x, y in zip(a.values, b.values, strict=True)],
            torch.cat([a.mask, b.mask]),
            a.lengths + b.lengths,
        )

    def select(self, rows: list[int]) -> KVBatch:
        """Only the sequences at ``rows`` (in that order), without the columns all of them pad."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        lengths = [self.lengths[r] for r in rows]
        start = self.width - max(lengths) if lengths else self.width
        return KVBatch(
            [k.index_select(0, index)[:, :, start:] for k in self.keys],
            [v.index_select(0, index)[:, :, start:] for v in self.values],
            self.mask.index_select(0, index)[:, start:],
            lengths,
        )

    def _padded(self, width: int) -> KVBatch:
        extra = width - self.width
        if extra == 0:
            return self

        def pad(t: torch.Tensor) -> torch.Tensor:
            zeros = t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])
            return torch.cat([zeros, t], dim=2)

        mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1)
        return KVBatch([pad(k) for k in self.keys], [pad(v) for v in self.values], mask,
                       list(self.lengths))  # fmt: skip


class Decoder:
    """Prefill and batched single-token steps of a GPT-2 (teacher or memory student).

    Runs where the model's weights are, under ``precision`` (fp32, bf16, fp16 autocast). On a
    CPU, each forward uses ``threads`` intra-op threads, or by default (None) what
    :meth:`tune_threads` measured for its batch size, else one per :data:`WORK_PER_THREAD`
    multiply-adds it does, up to torch's count when the decoder was made.
    Not thread-safe: one thread (the scheduler) owns it.
    """

    def __init__(self, model, precision: str = "fp32", threads: int | None = None) -> None:
        config = model.config
        refused = unsupported(config)
        if refused is not None:
            raise bad_parameter("model", refused)
        precision_context(torch.device("cpu"), precision)  # validates the name
        self.model = model.eval()
        self.precision = precision
        self.device = model_device(model)
        self.context = int(config.n_positions)
        self.transformer = model.transformer
        self.blocks = list(self.transformer.h)
        self.scales = [_attention_scale(block.attn, i) for i, block in enumerate(self.blocks)]
        check_threads(threads)
        self.threads = threads
        self.max_threads = torch.get_num_threads()
        self.work_per_token = dense_work_per_token(model)
        #: Sequences per step -> the intra-op threads :meth:`tune_threads` found fastest.
        self.tuned_threads: dict[int, int] = {}
        #: The knowledge packs attached to the model (all act unless a forward chooses); a
        #: tuple replaced whole (:meth:`refresh_packs`), so other threads may read it any time.
        self.pack_names: tuple[str, ...] = tuple(attached_packs(model))

    def refresh_packs(self) -> None:
        """Read the attached packs again (a :class:`~memstore_gpt2.serve.pack_watch.PackWatcher`
        swapped them between steps)."""
        self.pack_names = tuple(attached_packs(self.model))

    def threads_for(self, tokens: int) -> int | None:
        """Intra-op threads for a forward over ``tokens`` tokens (None: not a CPU model)."""
        if self.device.type != "cpu":
            return None
        if self.threads is not None:
            return self.threads
        if self.tuned_threads and tokens <= max(self.tuned_threads):
            return self.tuned_threads[max(b for b in self.tuned_threads if b <= tokens)]
        wanted = -(-tokens * self.work_per_token // WORK_PER_THREAD)  # each thread <= the unit
        return max(1, min(self.max_threads, wanted))

    def describe_threads(self) -> str:
        """What a startup line says of the threads: ``threads 2``, ``threads 1 at 1 sequence,
        2 at 16 (measured)``, ``threads by step size``; empty off a CPU."""
        if self.device.type != "cpu":
            return ""
        if self.threads is not None:
            return f"threads {self.threads}"
        if not self.tuned_threads:
            return "threads by step size"
        return f"threads {threads_summary(self.tuned_threads)} (measured)"

    def tune_threads(self, batch_sizes=TUNED_BATCHES, *, steps: int = 3, rounds: int = 3,
                     budget_s: float = 5.0) -> dict[int, int]:  # fmt: skip
        """Time decoding steps of ``batch_sizes`` sequences on 1, 2, 4... up to all intra-op
        threads and keep, per size, the fewest threads within :data:`THREADS_TOLERANCE` of the
        fastest (:meth:`threads_for` then uses them). Returns what it chose (empty off a CPU or
        with ``threads`` fixed).

        Why measure: whether a second thread pays for a step depends on the machine as much as
        on the model -- shared cores, memory bandwidth, and the thread that decodes (on a
        2-core VM, one thread stepped an 88M-parameter student 10 % faster in a server's
        scheduler thread, where the work rule gave it two; docs/serve.md, Threads). Run it in
        the thread that will decode. The counts take turns, ``rounds`` times ``steps`` steps
        each (more where that takes under :data:`ROUND_S`) after a warm-up step; sizes not
        reached within ``budget_s`` keep the rule. The
        steps read memory rows like any (a paged memory's cache counts them) and change
        nothing.
        """
        if self.device.type != "cpu" or self.threads is not None or self.context < 2:
            return {}
        counts = sorted({1, self.max_threads} | {2**i for i in range(8) if 2**i < self.max_threads})
        if counts == [1]:  # one thread is all there is: nothing to measure
            self.tuned_threads.update(dict.fromkeys(batch_sizes, 1))
            return dict(self.tuned_threads)
        start = time.perf_counter()
        probe, _ = self.prefill([0] * min(8, self.context - 1))
        try:
            for size in sorted(set(batch_sizes)):
                if time.perf_counter() - start > budget_s:
                    break
                self.tuned_threads[size] = self._fewest_fast_threads(probe.select([0] * size),
                                                                     counts, steps, rounds)  # fmt: skip
        finally:
            self.threads = None
        return dict(self.tuned_threads)

    def _fewest_fast_threads(self, batch: KVBatch, counts: list[int], steps: int,
                             rounds: int) -> int:  # fmt: skip
        tokens = [0] * batch.size
        self.threads = counts[0]
        began = time.perf_counter()
        self.step(batch, tokens)
        # a round lasts at least ROUND_S: steps of a small model take a millisecond, and three
        # of them are one scheduler tick of noise
        steps = max(steps, math.ceil(ROUND_S / max(time.perf_counter() - began, 1e-6)))
        seconds: dict[int, float] = {}
        for turn in range(rounds):
            shift = turn % len(counts)  # who goes first changes every round
            for count in counts[shift:] + counts[:shift]:
                self.threads = count
                self.step(batch, tokens)  # warm-up: a new count wakes its threads
                began = time.perf_counter()
                for _ in range(steps):
                    self.step(batch, tokens)
                took = time.perf_counter() - began
                seconds[count] = min(seconds.get(count, took), took)
        fastest = min(seconds.values())
        return min(c for c, t in seconds.items() if t <= fastest * (1 + THREADS_TOLERANCE))

    def _packs(self, per_row: list[tuple[str, ...] | None] | None):
        """Let each row's chosen packs act in the forward under way (``per_row[b]``: the names
        of sequence ``b``'s packs, None: all attached ones), every pack again afterwards."""
        chosen = None
        if self.pack_names and per_row is not None and any(n is not None for n in per_row):
            attached = self.pack_names  # a pack dropped since a request chose it acts no more
            chosen = [attached if n is None else tuple(x for x in n if x in attached)
                      for n in per_row]  # fmt: skip
        return packs_acting(self.model, chosen)

    # -- forwards ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int], packs: tuple[str, ...] | None = None
                ) -> tuple[KVBatch, torch.Tensor]:  # fmt: skip
        """Run one sequence's prompt: its cache (a batch of one) and its logits ``(T, V)`` fp32
        (every position's, so a request can score its prompt). ``packs``: the attached knowledge
        packs that act on it (None: all; empty: the bare student)."""
        if not ids:
            raise bad_parameter("prompt", "is empty after tokenization: give some text")
        if len(ids) > self.context:
            raise bad_parameter("prompt", f"has {len(ids)} tokens; the model reads {self.context}")
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        keys, values = [], []
        with (self._packs([packs]), precision_context(self.device, self.precision),
              intra_op_threads(self.threads_for(len(ids)))):  # fmt: skip
            hidden = self._embed(tokens, positions)
            for index, block in enumerate(self.blocks):
                hidden, k, v = self._block(index, block, hidden, None, None, None)
                keys.append(k)
                values.append(v)
            logits = self._logits(hidden)
        mask = torch.ones(1, len(ids), dtype=torch.bool, device=self.device)
        return KVBatch(keys, values, mask, [len(ids)]), logits[0].float()

    @torch.no_grad()
    def step(self, batch: KVBatch, tokens: list[int],
             packs: list[tuple[str, ...] | None] | None = None) -> tuple[KVBatch, torch.Tensor]:  # fmt: skip
        """Feed one new token per sequence: the extended cache and the next logits ``(B, V)``.
        ``packs[b]``: the knowledge packs acting on sequence ``b`` (None: all attached ones)."""
        if len(tokens) != batch.size:
            raise bad_parameter("tokens", f"{len(tokens)} tokens for {batch.size} sequences")
        if max(batch.lengths) >= self.context:
            raise bad_parameter("tokens", f"a sequence would pass the {self.context}-token context")
        new = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # (B, 1)
        positions = torch.tensor(batch.lengths, dtype=torch.long, device=self.device).unsqueeze(1)
        ones = torch.ones(batch.size, 1, dtype=torch.bool, device=self.device)
        mask = torch.cat([batch.mask, ones], dim=1)  # (B, L+1)
        # (B, 1, 1, L+1): SDPA's boolean mask, True attends; none when no sequence is padded
        attend = None if min(batch.lengths) == batch.width else mask[:, None, None, :]
        if packs is not None and len(packs) != batch.size:
            raise bad_parameter("packs", f"{len(packs)} pack choices for {batch.size} sequences")
        keys, values = [], []
        with (self._packs(packs), precision_context(self.device, self.precision),
              intra_op_threads(self.threads_for(batch.size))):  # fmt: skip
            hidden = self._embed(new, positions)
            for index, block in enumerate(self.blocks):
                hidden, k, v = self._block(index, block, hidden, batch.keys[index],
                                           batch.values[index], attend)  # fmt: skip
                keys.append(k)
                values.append(v)
            logits = self._logits(hidden)
        lengths = [n + 1 for n in batch.lengths]
        return KVBatch(keys, values, mask, lengths), logits[:, -1].float()

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(tokens) + self.transformer.wpe(positions)  # (eval: no dropout)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.transformer.ln_f(hidden))

    def _block(self, index, block, hidden, past_k, past_v, attend):
        """One GPT-2 block on ``hidden`` ``(B, T, D)`` after ``past_k``/``past_v`` (None: no
        past, causal over ``T``); returns (output, all keys, all values)."""
        attn = block.attn
        heads = attn.num_heads
        head_dim = attn.head_dim
        residual = hidden
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
        shape = (hidden.shape[0], hidden.shape[1], heads, head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        if past_k is not None:
            k = torch.cat([_as(past_k, k.dtype), k], dim=2)
            v = torch.cat([_as(past_v, v.dtype), v], dim=2)
        scale = self.scales[index]
        if attend is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, _as(k, q.dtype), _as(v, q.dtype),
                                                 attn_mask=attend, scale=scale)  # fmt: skip
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        hidden = attn.c_proj(out) + residual
        hidden = block.mlp(block.ln_2(hidden)) + hidden
        return hidden, k, v


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (a cache kept in fp32 under autocast); no call when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _attention_scale(attn, index: int) -> float:
    """The factor block ``index``'s attention scores are multiplied by."""
    scale = getattr(attn, "scaling", None)
    if scale is None:  # older transformers: the same factor from the config's flags
        scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
        if attn.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
    return scale


@dataclass
class SamplingParams:
    """How a request picks its tokens: greedy when ``temperature`` is 0; else the logits are
    divided by it, cut to the ``top_k`` best and to the smallest set of probability ``top_p``,
    and drawn from with a generator seeded by ``seed`` (the same draw as ``memstore generate``)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if not 0 <= self.temperature <= 100:
            raise bad_parameter("temperature", f"must be within [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad_parameter("top_p", f"must be within (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise bad_parameter("top_k", f"must be >= 0 (0: no cut), got {self.top_k}")


class Sampler:
    """One sequence's token picker (owns its seeded generator, so draws never mix between
    requests that share a batch)."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.generator = (
            torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        )

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from fp32 CPU logits ``(V,)``: the same operations, in the same order,
        as :func:`memstore_gpt2.generate.sample_tokens` (top-p is applied after them)."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k is not None and 0 < p.top_k < logits.numel():
            threshold = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def greedy_decode(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int,
                  eos_id: int | None = None) -> list[int]:  # fmt: skip
    """Prompt followed by up to ``max_new_tokens`` greedy tokens, one sequence, with the cache
    (what the tests compare with ``sample_tokens`` and the batched scheduler)."""
    return decode(decoder, prompt_ids, max_new_tokens, Sampler(SamplingParams(0.0)), eos_id)


def decode(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
           eos_id: int | None = None) -> list[int]:  # fmt: skip
    """Prompt followed by up to ``max_new_tokens`` tokens from ``sampler``, one sequence."""
    ids = list(prompt_ids)
    if max_new_tokens <= 0:
        return ids
    if len(ids) + max_new_tokens > decoder.context:
        raise bad_parameter("max_new_tokens", f"prompt + new tokens pass the {decoder.context}-token"
                            " context")  # fmt: skip
    batch, logits = decoder.prefill(ids)
    next_logits = logits[-1]
    for n in range(max_new_tokens):
        token = sampler.pick(next_logits.cpu())
        ids.append(token)
        if (eos_id is not None and token == eos_id) or n == max_new_tokens - 1:
            break
        batch, step_logits = decoder.step(batch, [token])
        next_logits = step_logits[0]
    return ids
