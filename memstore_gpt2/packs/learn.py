"""``memstore learn``: teach a frozen student new text by writing only a knowledge pack.

The student's language part never changes: every one of its weights and rows is frozen (and the
student's files are only read), so detaching the pack gives it back bit for bit. What trains is a
fresh pack (:mod:`memstore_gpt2.packs.modules`): per read block a zero-initialised product-key
memory, a vocabulary delta over the tokens the text selects, and the pack's mixing gate. The pack
never writes into the student's stream: it predicts its own next-token distribution, and the
attached model is the per-token mixture of the student's and the pack's (docs/design.md,
Knowledge packs), so the student runs without gradients and only the pack's parts train.

The objective (docs/design.md, What a pack learns) has three terms:

* next-token cross-entropy of the mixture on the new text;
* on *background* text, the KL divergence from the bare student's next-token distribution to the
  mixture (top-``BACKGROUND_TOPK`` tokens of the student plus the rest's mass as one outcome),
  through the gate only (the pack's own prediction is detached there): the gate learns where the
  pack does not know better, rather than the pack learning to imitate the student;
* on background text, the mean mixing weight (L1): the gate learns to close there, which is what
  keeps a pack quiet off its domain and lets packs compose.

The student is frozen, so what it computes on the background text is computed once: its top-k
targets, and the states a pack reads (when they fit ``BACKGROUND_STATES_BYTES``), from which a
step mixes the pack in without running the student again.

Background text is what the user gives with ``background`` (general text of the student's own
domain), else text the student samples itself (seeded): the student's distribution *is* the
knowledge to keep, so its own samples are background without any other data set.

Checkpoints live in the database only: each writes the pack's rows and its table row (manifest,
dense parts, optimizer state) in one transaction (:mod:`memstore_gpt2.packs.storage`), so a
``kill -9`` at any moment leaves the last checkpoint, and ``--resume`` continues from it and
computes what the uninterrupted run computes (batches are a function of the seed and the step, the
student is in eval mode, nothing else is random).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from memstore.errors import bad_parameter
from memstore_gpt2.errors import PackError, RunInterrupted
from memstore_gpt2.interrupts import StopRequests
from memstore_gpt2.lm_training import batch_for_step, next_token_ce, warmup_cosine
from memstore_gpt2.packs.attach import (
    attach,
    build_pack,
    dense_parts,
    record_student_states,
    student_fingerprint,
    student_shape,
)
from memstore_gpt2.packs.modules import Pack, VocabularyDelta
from memstore_gpt2.packs.storage import (
    PackRecord,
    check_pack_name,
    has_pack,
    layer_collection,
    read_pack,
    write_pack,
)
from memstore_torch import ProductKeyMemory
from memstore_torch.model_memory import flush_memory, split_parameters
from memstore_torch.optim import RowwiseAdagrad

#: Student tokens per background position whose probabilities the KL term keeps exactly.
BACKGROUND_TOPK = 32
#: The most the student's states on the background text may take in memory to be kept (see
#: :func:`background_reference`); beyond it every step runs the student on its background batch.
BACKGROUND_STATES_BYTES = 512 << 20


@dataclass(frozen=True)
class LearnOptions:
    """How a pack is learnt; each field keeps its ``memstore learn`` flag's name."""

    steps: int = 300
    #: Rows of the pack's memory in each block it reads in (rounded up to a square).
    rows: int = 4096
    #: Blocks the pack reads in (None: every block).
    layers: tuple[int, ...] | None = None
    #: AdamW's rate for the dense parts (queries, sub-keys, gates, vocabulary delta).
    lr: float = 3e-3
    #: Row-wise Adagrad's rate for the memory's value rows.
    rows_lr: float = 0.1
    batch_size: int = 16
    #: Tokens per training block (None: the student's context, at most 256).
    block_len: int | None = None
    heads: int = 1
    k: int = 32
    key_dim: int = 128
    #: Most tokens of the vocabulary delta (0: none), chosen by TF-IDF against the background.
    vocab_rows: int = 4096
    #: Background blocks (sampled by the student when no background text is given).
    background_blocks: int = 512
    background_batch: int = 16
    background_weight: float = 8.0
    gate_weight: float = 0.5
    warmup: int = 10
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self, n_layer: int) -> None:
        for name in ("steps", "vocab_rows", "checkpoint_every", "warmup"):
            if getattr(self, name) < 0:
                raise bad_parameter(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("rows", "batch_size", "heads", "k", "background_blocks", "background_batch"):
            if getattr(self, name) <= 0:
                raise bad_parameter(name, f"must be positive, got {getattr(self, name)}")
        for name in ("lr", "rows_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad_parameter(name, f"must be a positive number, got {value}")
        for name in ("background_weight", "gate_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad_parameter(name, f"must be >= 0, got {value}")
        if self.key_dim <= 0 or self.key_dim % 2:
            raise bad_parameter("key_dim", f"must be positive and even, got {self.key_dim}")
        if self.layers is not None:
            if not self.layers:
                raise bad_parameter("layers", "names no block")
            bad = [i for i in self.layers if not 0 <= i < n_layer]
            if bad:
                raise bad_parameter(
                    "layers", f"block(s) {bad} do not exist: the student has 0-{n_layer - 1}"
                )
            if len(set(self.layers)) != len(self.layers):
                raise bad_parameter("layers", f"names a block twice: {list(self.layers)}")

    def blocks(self, n_layer: int) -> list[int]:
        return sorted(self.layers) if self.layers is not None else list(range(n_layer))


#: Options a resumed pack may change (the others must equal the ones it started with, or the
#: resumed run would not compute what the uninterrupted one computes).
_RESUME_FREE = ("steps", "checkpoint_every")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# -- the pack's inputs ----------------------------------------------------------------------------
#: Sequences :func:`sample_background` decodes together (their KV caches side by side).
SAMPLE_BATCH = 64


@torch.no_grad()
def sample_background(model, tokenizer, n_blocks: int, block_len: int, seed: int) -> np.ndarray:
    """``(n_blocks, block_len)`` tokens the student samples itself from its end-of-text token
    (temperature 1, seeded): the distribution a pack must leave alone. Decoded with the KV cache
    (``memstore serve``'s decoder), :data:`SAMPLE_BATCH` sequences at a time, each step one token
    per sequence; the draws come from one generator in a fixed order, so a seed gives the same
    blocks."""
    from memstore_gpt2.serve.decoding import Decoder, unsupported

    generator = torch.Generator().manual_seed(int(seed))
    start = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
    if unsupported(model.config) is not None or block_len > int(model.config.n_positions):
        return _sample_without_cache(model, start, n_blocks, block_len, generator)
    was_training = model.training
    decoder = Decoder(model)  # (in eval mode, as every forward of the frozen student is)
    try:
        prompt, logits = decoder.prefill([start])  # every sequence starts from the same token
        blocks = []
        for first in range(0, n_blocks, SAMPLE_BATCH):
            n = min(SAMPLE_BATCH, n_blocks - first)
            batch, last = prompt.select([0] * n), logits[-1:].expand(n, -1)
            ids = torch.full((n, block_len), start, dtype=torch.long)
            for position in range(1, block_len):
                probs = torch.softmax(last.float().cpu(), dim=-1)  # (n, V)
                ids[:, position] = torch.multinomial(probs, 1, generator=generator)[:, 0]
                if position < block_len - 1:
                    batch, last = decoder.step(batch, ids[:, position].tolist())
            blocks.append(ids)
    finally:
        model.train(was_training)
    return torch.cat(blocks).numpy()


def _sample_without_cache(model, start: int, n_blocks: int, block_len: int, generator):
    """:func:`sample_background` for a model the decoder does not run: every step re-runs the
    blocks sampled so far."""
    ids = torch.full((n_blocks, 1), start, dtype=torch.long)
    for _ in range(block_len - 1):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids.numpy()


@torch.no_grad()
def background_reference(model, blocks: np.ndarray, read_blocks: Sequence[int], *,
                         keep_states: bool, batch: int = 16):  # fmt: skip
    """What the bare student computes on the background text, once (it is frozen): its top-k
    next-token log-probabilities at each position and the log of the remaining mass (what the
    KL term compares the attached model with), and with ``keep_states`` the states a pack reads
    (block MLP inputs, ``ln_f`` input), so a step mixes the pack in without running the
    student on it again. Returns ``(targets, states or None)``."""
    top_ids, top_logp, rest = [], [], []
    inputs: dict[str, list[torch.Tensor]] = {str(b): [] for b in read_blocks}
    residuals: list[torch.Tensor] = []
    for start in range(0, len(blocks), batch):
        ids = torch.from_numpy(np.ascontiguousarray(blocks[start : start + batch]))
        block_inputs, residual, logits = record_student_states(model, ids, read_blocks)
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = logp.topk(BACKGROUND_TOPK, dim=-1)
        top_ids.append(indices)
        top_logp.append(values)
        mass = values.exp().sum(-1).clamp(max=1.0 - 1e-6)
        rest.append(torch.log1p(-mass))
        if keep_states:
            for key, value in block_inputs.items():
                inputs[key].append(value)
            residuals.append(residual)
    targets = (torch.cat(top_ids), torch.cat(top_logp), torch.cat(rest))
    if not keep_states:
        return targets, None
    return targets, ({k: torch.cat(v) for k, v in inputs.items()}, torch.cat(residuals))


def background_state_bytes(blocks: np.ndarray, read_blocks: Sequence[int], d_model: int) -> int:
    """Bytes :func:`background_reference` keeps with ``keep_states`` (fp32)."""
    return int(blocks.size) * d_model * (len(read_blocks) + 1) * 4


def vocabulary_tokens(
    blocks: np.ndarray, background: np.ndarray, vocab_size: int, limit: int
) -> np.ndarray:
    """Token ids of the vocabulary delta: tokens the new text uses at least twice, ranked by
    TF-IDF -- their count in the text times log(background tokens / (1 + count there)) -- the
    ``limit`` best, in id order."""
    if limit == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(blocks.ravel(), minlength=vocab_size)[:vocab_size]
    background_counts = np.bincount(background.ravel(), minlength=vocab_size)[:vocab_size]
    idf = np.log((1.0 + background.size) / (1.0 + background_counts))
    score = np.where(counts >= 2, counts * idf, -np.inf)
    order = np.argsort(-score, kind="stable")
    chosen = [int(t) for t in order[:limit] if np.isfinite(score[t])]
    return np.array(sorted(chosen), dtype=np.int64)


def new_pack(
    name: str,
    model,
    store,
    options: LearnOptions,
    token_ids: np.ndarray,
    cache_rows: dict[int, int | None] | None = None,
) -> Pack:
    """A fresh pack for ``model``: zero values (nothing changes until it learns), its rows
    created in ``pack.<name>.layer<i>``. The seed makes its query projections and sub-keys."""
    torch.manual_seed(options.seed)
    d_model = int(model.config.n_embd)
    from memstore_gpt2.student import extra_rows_shape

    n_keys = extra_rows_shape(options.rows)
    blocks = {}
    for layer in options.blocks(int(model.config.n_layer)):
        memory = ProductKeyMemory(
            d_model,
            n_keys=n_keys,
            heads=options.heads,
            k=min(options.k, n_keys * n_keys),
            key_dim=options.key_dim,
            store=store,
            collection=layer_collection(name, layer),
            cache_rows=(cache_rows or {}).get(layer),
        )
        blocks[layer] = memory
    vocabulary = None
    if len(token_ids):
        vocabulary = VocabularyDelta(
            int(model.config.vocab_size), d_model, torch.from_numpy(token_ids)
        )
    return Pack(name, blocks, vocabulary, d_model)


# -- optimizer state as tensors (a pack's state blob is safetensors: no pickle) ---------------------
def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{prefix}.{index}.{key}"] = tensor.detach().cpu().clone()
    return out


def _restore_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    saved = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(f"{prefix}."):
            continue
        _, index, field = key.rsplit(".", 2)
        if optimizer.__class__ is RowwiseAdagrad and field == "step":
            value = int(value)
        state.setdefault(int(index), {})[field] = value
    saved["state"] = state
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PackError(f"the pack's optimizer state does not fit it ({exc})") from None


# -- the run --------------------------------------------------------------------------------------
@dataclass
class _Run:
    name: str
    loaded: Any
    pack: Pack
    options: LearnOptions
    blocks: np.ndarray
    background: np.ndarray
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    manifest: dict[str, Any]
    dense_optimizer: torch.optim.Optimizer
    row_optimizer: RowwiseAdagrad | None
    attachment: Any = None
    #: The bare student's states on ``background`` (block MLP inputs, ``ln_f`` input), when
    #: they fit :data:`BACKGROUND_STATES_BYTES`; None: steps run the student on it.
    background_states: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
    step: int = 0
    #: A paged pack writes rows back between checkpoints inside this (one transaction per
    #: checkpoint interval), so a kill loses them all and the database stays at the checkpoint.
    interval: Any = None

    def checkpoint(self, finished: bool = False) -> None:
        """Rows and the pack's table row in ONE transaction."""
        store = self.loaded.store
        state = None
        if not finished:
            state = _optimizer_tensors("dense", self.dense_optimizer)
            if self.row_optimizer is not None:
                state.update(_optimizer_tensors("rows", self.row_optimizer))
            state["background"] = torch.from_numpy(np.ascontiguousarray(self.background))
        manifest = dict(self.manifest, finished=finished, training={"step": self.step})
        with store.transaction():
            flush_memory(self.pack)
            write_pack(store, PackRecord(self.name, manifest, dense_parts(self.pack), state))
        if self.interval is not None:
            self.interval.commit()


def _tokenize(loaded, data, block_len: int) -> np.ndarray:
    from memstore_gpt2.text_data import load_blocks

    return load_blocks(loaded.tokenizer, data, block_len)


def learn_pack(
    student_dir: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike],
    pack: str,
    options: LearnOptions | None = None,
    *,
    db: str | None = None,
    memory_budget=None,
    resume: bool = False,
    background: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Learn ``data`` into pack ``pack`` of the student in ``student_dir`` (its database, or
    ``db``); returns a summary. ``resume`` continues an unfinished pack from its last
    checkpoint. ``progress(step, steps, loss)`` is called after every step."""
    from memstore_gpt2.checkpoint import WriteBackInterval
    from memstore_gpt2.db_lock import hold_database, release_writer
    from memstore_gpt2.student import load_student

    options = options or LearnOptions()
    check_pack_name(pack)
    loaded = load_student(student_dir, db=db, memory_budget=memory_budget)
    try:
        writer = hold_database(loaded.db_url, student_dir, "training")
        try:
            run = _start(
                loaded, student_dir, pack, options, data, background, resume, memory_budget
            )
            paged = any(m.paged for m in run.pack.blocks.values())
            with WriteBackInterval(loaded.store) if paged else nullcontext() as interval:
                run.interval = interval
                summary = _train(run, progress, handle_signals)
        finally:
            release_writer(writer, remove_file=True)
    finally:
        loaded.close()
    return summary


def _start(loaded, student_dir, name, options, data, background, resume, memory_budget) -> _Run:
    model, store = loaded.model, loaded.store
    n_layer = int(model.config.n_layer)
    for param in model.parameters():
        param.requires_grad_(False)
    exists = has_pack(store, name)
    record = read_pack(store, name) if exists else None
    if record is not None and not resume:
        if record.finished:
            raise PackError(
                f"pack {name!r} already exists; drop it first ('memstore packs drop {name}') "
                "or learn under another name"
            )
        raise PackError(
            f"pack {name!r} is unfinished (step {record.extra.get('step', 0)}): continue it with "
            "--resume, or drop it ('memstore packs drop " + name + "')"
        )
    if resume:
        if record is None:
            raise PackError(f"no pack named {name!r} to resume: start it without --resume")
        if record.finished:
            raise PackError(f"pack {name!r} has finished learning: nothing to resume")
        saved = record.manifest.get("options") or {}
        changed = [
            key
            for key, value in asdict(options).items()
            if key not in _RESUME_FREE and _as_json(value) != saved.get(key)
        ]
        if changed:
            raise PackError(
                f"pack {name!r} was started with other {', '.join(changed)}; resume it with the "
                "options it was started with"
            )
    options.validate(n_layer)
    block_len = options.block_len or min(int(model.config.n_positions), 256)
    if block_len < 2:
        raise bad_parameter("block_len", f"must be at least 2, got {block_len}")
    blocks = _tokenize(loaded, data, block_len)
    fingerprint = student_fingerprint(student_dir)
    if record is not None:
        if record.manifest.get("data", {}).get("sha256") != _digest(blocks):
            raise PackError(
                f"pack {name!r} was started on other text; resume it with the same --data"
            )
        if record.state is None or "background" not in record.state:
            raise PackError(f"pack {name!r} is damaged: its training state is missing")
        bg = record.state["background"].numpy()
    elif background is not None:
        bg = _tokenize(loaded, background, block_len)[: options.background_blocks]
    else:
        bg = sample_background(
            model, loaded.tokenizer, options.background_blocks, min(block_len, 64), options.seed
        )
    read_blocks = options.blocks(int(model.config.n_layer))
    keep = background_state_bytes(bg, read_blocks, int(model.config.n_embd))
    targets, states = background_reference(model, bg, read_blocks,
                                           keep_states=keep <= BACKGROUND_STATES_BYTES)  # fmt: skip
    pack_cache = _pack_cache_rows(options, model, memory_budget, loaded)
    if record is None:
        token_ids = vocabulary_tokens(blocks, bg, int(model.config.vocab_size), options.vocab_rows)
        with store.transaction():  # the collections and the unfinished pack's row together
            pack = new_pack(name, model, store, options, token_ids, pack_cache)
            manifest = _manifest(name, model, pack, options, blocks, fingerprint, data, background)
            write_pack(store, PackRecord(name, dict(manifest, finished=False), dense_parts(pack), {
                "background": torch.from_numpy(np.ascontiguousarray(bg)),
            }))  # fmt: skip
    else:
        manifest = {k: v for k, v in record.manifest.items() if k not in ("finished", "training")}
        manifest["steps"] = options.steps
        manifest["options"] = {k: _as_json(v) for k, v in asdict(options).items()}
        pack = build_pack(record, store, pack_cache)
    attachment = attach(model, [pack])
    attachment.states.learning = True  # the student runs without autograd, the pack with it
    sparse = split_parameters(pack).sparse
    dense = [p for p in pack.parameters() if p.requires_grad and all(p is not s for s in sparse)]
    dense_optimizer = torch.optim.AdamW(dense, lr=options.lr, weight_decay=0.0)
    row_optimizer = RowwiseAdagrad(sparse, lr=options.rows_lr) if sparse else None
    run = _Run(name, loaded, pack, options, blocks, bg, targets, manifest, dense_optimizer,
               row_optimizer, attachment, background_states=states)  # fmt: skip
    if record is not None:
        _restore_optimizer("dense", dense_optimizer, record.state)
        if row_optimizer is not None:
            _restore_optimizer("rows", row_optimizer, record.state)
        run.step = int(record.extra.get("step", 0))
    return run


def _as_json(value):
    return list(value) if isinstance(value, tuple) else value


def _pack_cache_rows(options, model, memory_budget, loaded) -> dict[int, int | None]:
    """Cache rows of the pack's memories under ``memory_budget`` (None: resident)."""
    if memory_budget is None:
        return {}
    from memstore_gpt2.student import extra_rows_shape
    from memstore_torch import PagedRows

    n_rows = extra_rows_shape(options.rows) ** 2
    per_row = PagedRows.bytes_per_slot(2, int(model.config.n_embd))
    layers = options.blocks(int(model.config.n_layer))
    rows = memory_budget.cache_rows([(n_rows, per_row)] * len(layers))
    return dict(zip(layers, rows, strict=True))


def _manifest(name, model, pack, options, blocks, fingerprint, data, background) -> dict:
    return {
        "name": name,
        "student": {**student_shape(model), "fingerprint": fingerprint},
        "layers": pack.layers,
        "memories": {str(i): m.extra_config() for i, m in pack.blocks.items()},
        "steps": options.steps,
        "options": {k: _as_json(v) for k, v in asdict(options).items()},
        "vocabulary_rows": 0 if pack.vocabulary is None else len(pack.vocabulary.token_ids),
        "data": {
            "sha256": _digest(blocks),
            "blocks": int(len(blocks)),
            "tokens": int(blocks.size),
            "paths": [str(p) for p in _as_list(data)],
        },
        "background": "given" if background is not None else "sampled from the student",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _kl_to_student(logits: torch.Tensor, targets) -> torch.Tensor:
    """KL(student || attached) over the student's top-k tokens plus the rest as one outcome."""
    top_ids, top_logp, rest = targets
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, top_ids)
    rest_attached = torch.log1p(-picked.exp().sum(-1).clamp(max=1.0 - 1e-6))
    kl = (top_logp.exp() * (top_logp - picked)).sum(-1) + rest.exp() * (rest - rest_attached)
    return kl.mean()


def _attached_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The attached model's log-mixture on ``ids``: the frozen student's forward without
    autograd (nothing of it trains), the pack's part with it (the attachment's learning flag)."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _train(run: _Run, progress, handle_signals: bool) -> dict[str, Any]:
    opts, model = run.options, run.loaded.model
    bg_rows = np.arange(len(run.background))[:, None]
    started, start_step = time.perf_counter(), run.step
    stop = StopRequests() if handle_signals else StopRequests(signals=())
    losses: list[float] = []
    first_ce = last_ce = None
    with stop:
        while run.step < opts.steps and not stop.requested:
            step = run.step
            scale = warmup_cosine(step, opts.steps, opts.warmup)
            for group in run.dense_optimizer.param_groups:
                group["lr"] = opts.lr * scale
            if run.row_optimizer is not None:
                for group in run.row_optimizer.param_groups:
                    group["lr"] = opts.rows_lr * scale
            ids = batch_for_step(run.blocks, step, opts.batch_size, opts.seed)
            ce = next_token_ce(_attached_logits(model, ids), ids)
            loss = ce
            if opts.background_weight > 0 or opts.gate_weight > 0:
                pick = batch_for_step(bg_rows, step, opts.background_batch, opts.seed + 1)[:, 0]
                bg_ids = torch.from_numpy(np.ascontiguousarray(run.background[pick.numpy()]))
                run.attachment.states.gate_only = True
                try:
                    if run.background_states is None:
                        bg_logits = _attached_logits(model, bg_ids)
                    else:
                        inputs, residual = run.background_states
                        bg_logits = run.attachment.mix_states(
                            {k: v[pick] for k, v in inputs.items()}, residual[pick], bg_ids
                        )
                finally:
                    run.attachment.states.gate_only = False
                targets = tuple(t[pick] for t in run.targets)
                if opts.background_weight > 0:
                    loss = loss + opts.background_weight * _kl_to_student(bg_logits, targets)
                if opts.gate_weight > 0:
                    loss = loss + opts.gate_weight * run.pack.last_weight.mean()
            if not torch.isfinite(loss):
                raise PackError(f"the loss became {float(loss)} at step {step}; lower --lr")
            run.dense_optimizer.zero_grad(set_to_none=True)
            if run.row_optimizer is not None:
                run.row_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.dense_optimizer.step()
            if run.row_optimizer is not None:
                run.row_optimizer.step()
            run.step += 1
            last_ce = float(ce.detach())
            first_ce = last_ce if first_ce is None else first_ce
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(run.step, opts.steps, losses[-1])
            if opts.checkpoint_every and run.step % opts.checkpoint_every == 0:
                if run.step < opts.steps:
                    run.checkpoint()
        if stop.requested and run.step < opts.steps:
            run.checkpoint()
            raise RunInterrupted(stop.name, stop.signum, run.step, opts.steps)
    run.checkpoint(finished=True)
    elapsed = time.perf_counter() - started
    done = run.step - start_step
    trainable = sum(p.numel() for p in run.pack.parameters() if p.requires_grad)
    return {
        "pack": run.name,
        "steps": run.step,
        "steps_this_run": done,
        "layers": run.pack.layers,
        "rows": run.pack.rows(),
        "vocabulary_rows": run.manifest["vocabulary_rows"],
        "trainable_parameters": int(trainable),
        "train_ce_first": first_ce,
        "train_ce_last": last_ce,
        "seconds": elapsed,
        "step_seconds": elapsed / done if done else None,
        "db": run.loaded.db_url,
    }
