"""Knowledge packs against the usual ways of teaching a language model a new text.

    python benchmarks/knowledge.py [--data-dir ../shared/data/wikitext-2] [--steps 300] [--json]

Builds once, cached under ``--work`` while the recipe is the same: a small GPT-2-architecture
teacher (2 blocks, width 128, 4 heads, n_inner 512, byte-level BPE 2048, context 64) trained on
WikiText-2 ``valid.txt``, and a student distilled from it with ``--memory-rows`` extra product-key
rows per layer (``memstore distill gpt2 --memory-rows``). That student is the **base**.

Two domains. **A** is what the base knows: WikiText-2, ``valid.txt`` to learn from (the text the
base was trained on) and ``test.txt`` to test on (the first ``--a-test-blocks`` blocks). **B** is
text a user would add: Python's help topics (``pydoc_data.topics``, shipped with every CPython),
split **by document** (seeded, ``--b-test-share`` of the topics held out), so that no test topic
is in training; ``ngram_overlap`` is the share of B-test's token 8-grams that also occur in
B-train (the help topics quote one another, so it is not zero).

Arms, each adapting the base to B-train with the same ``--steps`` steps of ``--batch-size``
blocks, the batch of step ``s`` being ``batch_for_step(B-train, s, batch, --seed)`` for every arm
(next-token cross-entropy, linear warm-up then cosine decay):

* **full fine-tune**: every weight of the student, its memory rows included (AdamW for the dense
  weights and the featural rows, row-wise Adagrad for the product-key values, as the distiller);
* **LoRA** (``peft``): rank ``--lora-r`` adapters on every linear layer of the blocks (attention
  ``c_attn``/``c_proj``; the student's MLPs are memory layers, and the memory layers' own linear
  parts, if any, are included), the rest frozen;
* **embeddings only**: the token embedding table alone (GPT-2 ties it to the output projection,
  so both sides of the vocabulary move);
* **kNN-LM**: no training; a datastore of (the base's final hidden state, next token) over
  B-train, exact L2 search (faiss's flat index, else torch) for ``--knn-k`` neighbours,
  interpolated with the base's distribution.
  Its weight and temperature are chosen on a held-out slice of B-train (the last 10 % of its
  blocks, searched against a datastore of the rest), never on B-test;
* **learn**: ``memstore_gpt2.packs.learn.learn_pack`` (``memstore learn``): the student frozen,
  what is learnt written as a pack in the student's database; evaluated loaded with
  ``packs=("python",)``.

Where the student is written to. The student's memory layers are bound to its database; every
arm that trains works on its **own copy of the student directory and its database** (a temp
directory under ``--work``), and the fine-tuning arms never flush their rows, so the base student
stays byte for byte as it was built. ``learn`` writes its packs into its copy's database (that is
what a pack is).

Measured per arm: B-test and A-test perplexity with the adaptation attached, trainable parameters,
rows it adds (pack rows; kNN datastore entries), mean wall seconds per step. Then:
``detach_identical``: the learn copy loaded with ``packs=()`` gives the base's logits bit for bit
(A-test and B-test blocks); composition: an A pack learnt on A-train and the B pack attached
together, ``compose_a_ratio`` = A-test ppl with both / with the A pack alone, ``compose_b_ratio``
= B-test ppl with both / with the B pack alone. ``*_gain_share`` = (ln ppl_base - ln ppl) /
(ln ppl_base - ln ppl_full_ft) on B-test; ``*_a_ratio`` = A-test ppl / the base's;
``step_time_ratio`` = learn's mean step time / full fine-tuning's (learn's steps include its
background forward and its checkpoints, as ``memstore learn`` runs them). ``base_unchanged``: the
base student's files hash the same after every arm as before.

Prints a table and the machine; ``--json`` prints one JSON object as the last line with the keys
above plus ``arms`` (the table's rows) and ``machine``; a run that fails says why in one line (and
``{"error": ...}`` as the JSON line, exit status 1).
"""

# No ``from __future__ import annotations``: the tests import this script as a module that is not
# in ``sys.modules`` (tests/benchmark_scripts.py), where dataclasses cannot resolve string
# annotations; every annotation here evaluates on Python 3.10.
import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: CPU settings as the other benchmarks (benchmarks/layer.py says why), unless already set.
CPU_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in CPU_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])

#: The teacher besides its width, vocabulary and context (flags): the issue's prototype.
TEACHER = {"layers": 2, "heads": 4, "batch_size": 16, "lr": 2e-3, "warmup": 20, "dropout": 0.1}
#: Pack names of the two domains.
PACK_B, PACK_A = "python", "wiki"
#: Blocks compared logit for logit for ``detach_identical`` (from each test domain).
DETACH_BLOCKS = 32


class BenchmarkError(RuntimeError):
    """A run cannot go on; the message is the one line the benchmark ends with."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def split_documents(
    documents: list[str], test_share: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, test) documents: a seeded permutation, the first ``test_share`` of it held out
    (at least one document each side). By document, so no test document is seen in training."""
    if len(documents) < 2:
        raise BenchmarkError(f"domain B needs at least 2 documents to split, got {len(documents)}")
    order = np.random.default_rng(seed).permutation(len(documents))
    n_test = min(len(documents) - 1, max(1, round(len(documents) * test_share)))
    test = sorted(order[:n_test].tolist())
    train = sorted(order[n_test:].tolist())
    return [documents[i] for i in train], [documents[i] for i in test]


def write_documents(documents: list[str], directory: Path) -> Path:
    """One file per document (names sort in document order), so that reading the directory
    back separates documents by EOS as the corpus list does; the directory is replaced."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    width = len(str(len(documents)))
    for i, text in enumerate(documents):
        (directory / f"{i:0{width}d}.txt").write_text(text, encoding="utf-8")
    return directory


def ngram_overlap(train_tokens: np.ndarray, test_tokens: np.ndarray, n: int = 8) -> float:
    """Share of ``test_tokens``' n-grams (token ids) that occur anywhere in ``train_tokens``."""
    if len(test_tokens) < n:
        return 0.0

    def grams(tokens: np.ndarray) -> np.ndarray:
        windows = np.lib.stride_tricks.sliding_window_view(np.ascontiguousarray(tokens), n)
        return np.ascontiguousarray(windows.astype(np.int64)).view(f"V{8 * n}").ravel()

    seen = set(grams(train_tokens).tolist()) if len(train_tokens) >= n else set()
    test = grams(test_tokens).tolist()
    return sum(g in seen for g in test) / len(test)


@dataclass
class Domains:
    """Token blocks of both domains, and where their training text lies (for ``learn``)."""

    a_train: np.ndarray
    a_test: np.ndarray
    b_train: np.ndarray
    b_test: np.ndarray
    a_train_path: Path
    b_train_dir: Path
    b_documents: tuple[int, int]  # (train, test)
    ngram_overlap: float


def load_domains(args, tokenizer, context: int) -> Domains:
    from memstore_gpt2.text_data import (
        load_blocks,
        python_docs_corpus,
        read_texts,
        tokenize_texts,
    )

    work = Path(args.work)
    corpus = python_docs_corpus()
    corpus = corpus[: args.b_documents] if args.b_documents else corpus
    b_train_docs, b_test_docs = split_documents(corpus, args.b_test_share, args.seed)
    b_train_dir = write_documents(b_train_docs, work / "b_train")
    b_test_dir = write_documents(b_test_docs, work / "b_test")
    a_test = load_blocks(tokenizer, args.a_test, context)
    b_test = load_blocks(tokenizer, b_test_dir, context)
    overlap = ngram_overlap(
        tokenize_texts(tokenizer, read_texts(b_train_dir)),
        tokenize_texts(tokenizer, read_texts(b_test_dir)),
    )
    return Domains(
        a_train=load_blocks(tokenizer, args.a_train, context),
        a_test=a_test[: args.a_test_blocks] if args.a_test_blocks else a_test,
        b_train=load_blocks(tokenizer, b_train_dir, context),
        b_test=b_test[: args.b_test_blocks] if args.b_test_blocks else b_test,
        a_train_path=Path(args.a_train),
        b_train_dir=b_train_dir,
        b_documents=(len(b_train_docs), len(b_test_docs)),
        ngram_overlap=overlap,
    )


# ----------------------------------------------------------------------------- the base student
def build(args) -> Path:
    """The base student's directory, trained once and reused while the recipe is the same."""
    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.teacher import TeacherSpec, train_teacher
    from memstore_gpt2.text_data import read_texts
    from memstore_gpt2.trainer import DistillConfig

    work = Path(args.work)
    teacher_dir, student_dir = work / "teacher", work / "student"
    spec = TeacherSpec(**TEACHER, width=args.width, inner=4 * args.width, vocab=args.vocab,
                       context=args.context, steps=args.teacher_steps, seed=args.seed)  # fmt: skip
    recipe = {
        "teacher": asdict(spec),
        "train": str(Path(args.a_train).resolve()),
        "memory_rows": args.memory_rows,
        "distill_steps": args.distill_steps,
        "seed": args.seed,
    }
    recipe_file = work / "knowledge_recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return student_dir
    recipe_file.unlink(missing_ok=True)
    shutil.rmtree(teacher_dir, ignore_errors=True)
    shutil.rmtree(student_dir, ignore_errors=True)
    log(f"training the teacher ({spec.steps} steps) into {teacher_dir} ...")
    train_teacher(read_texts(args.a_train), teacher_dir, spec, progress=False)
    log(f"distilling the base student ({args.memory_rows:,} extra rows per layer, "
        f"{args.distill_steps} steps) into {student_dir} ...")  # fmt: skip
    config = DistillConfig(steps=args.distill_steps, batch_size=args.batch_size, eval_blocks=0,
                           checkpoint_every=0, seed=args.seed)  # fmt: skip
    job = DistillJob(teacher=str(teacher_dir), data=[args.a_train], out=str(student_dir),
                     k=args.width // 2, memory_rows=args.memory_rows, context=args.context,
                     config=config, progress=False, device="cpu")  # fmt: skip
    run_distill(job)
    recipe_file.write_text(json.dumps(recipe, indent=2))
    return student_dir


def copy_student(student_dir: Path, name: str, work: Path) -> Path:
    """A fresh copy of the student directory, its SQLite database inside it included, so an arm
    that writes (rows, packs) writes there and not into the base."""
    from memstore_gpt2.student import read_manifest, resolve_db_url

    url = resolve_db_url(student_dir, read_manifest(student_dir))
    db = Path(url.removeprefix("sqlite:///"))
    if not db.resolve().is_relative_to(student_dir.resolve()):
        raise BenchmarkError(f"the student's database {url} is not inside {student_dir}")
    copy = work / "arms" / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(student_dir, copy, ignore=shutil.ignore_patterns("tensorboard", "*.lock"))
    return copy


def directory_digest(directory: Path) -> str:
    """sha256 of every file of a student directory (names and bytes), SQLite's transient
    ``-wal``/``-shm`` files and lock files aside: equal exactly when nothing of it changed."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.endswith(("-wal", "-shm", ".lock")) or "tensorboard" in path.parts:
            continue
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def load(student_dir: Path, packs: tuple[str, ...] | None = None):
    """The student in eval mode; ``packs`` (None: the loader's default) attached."""
    from memstore_gpt2.student import load_student

    if packs is None:
        return load_student(student_dir)
    return load_student(student_dir, packs=packs)


# ----------------------------------------------------------------------------- measuring
def ppl(model, blocks: np.ndarray, batch: int) -> float:
    from memstore_gpt2.lm_training import perplexity

    return perplexity(model, blocks, batch_size=batch)


@torch.no_grad()
def logits_of(model, blocks: np.ndarray, batch: int) -> list[torch.Tensor]:
    from memstore_gpt2.lm_training import lm_logits

    model.eval()
    return [
        lm_logits(model, torch.from_numpy(np.ascontiguousarray(blocks[i : i + batch])))
        for i in range(0, len(blocks), batch)
    ]


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Arm:
    """One row of the table."""

    arm: str
    b_test_ppl: float
    a_test_ppl: float
    trainable_parameters: int
    rows: int
    step_time_s: float | None
    gain_share: float | None = None
    a_ratio: float | None = None
    extra: dict = field(default_factory=dict)


def finetune(model, optimizers: list, blocks: np.ndarray, args, peak_lrs: list[float]) -> float:
    """``args.steps`` steps of next-token cross-entropy on the shared batches; the mean wall
    seconds per step (forward, backward and optimizer step)."""
    from memstore_gpt2.lm_training import (
        batch_for_step,
        lm_logits,
        next_token_ce,
        warmup_cosine,
    )

    torch.manual_seed(args.seed)  # dropout draws the same in every arm
    model.train()
    warmup = min(args.warmup, args.steps)
    seconds = 0.0
    for step in range(args.steps):
        ids = batch_for_step(blocks, step, args.batch_size, args.seed)
        scale = warmup_cosine(step, args.steps, warmup)
        started = time.perf_counter()
        for optimizer, peak in zip(optimizers, peak_lrs, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = peak * scale
            optimizer.zero_grad(set_to_none=True)
        loss = next_token_ce(lm_logits(model, ids), ids)
        if not torch.isfinite(loss):
            raise BenchmarkError(f"the loss is not finite at step {step}")
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        seconds += time.perf_counter() - started
    model.eval()
    return seconds / max(1, args.steps)


def full_finetune_arm(student_dir: Path, domains: Domains, args) -> Arm:
    from memstore_torch.model_memory import split_parameters
    from memstore_torch.optim import RowwiseAdagrad

    copy = copy_student(student_dir, "full_ft", Path(args.work))
    student = load(copy)
    try:
        model = student.model
        for p in model.parameters():
            p.requires_grad_(True)
        dense, memory, sparse = split_parameters(model)
        optimizers = [torch.optim.AdamW([{"params": dense, "weight_decay": 0.01},
                                         {"params": memory, "weight_decay": 0.0}],
                                        lr=args.full_lr)]  # fmt: skip
        lrs = [args.full_lr]
        if sparse:
            optimizers.append(RowwiseAdagrad(sparse, lr=args.rows_lr))
            lrs.append(args.rows_lr)
        count = trainable_count(model)
        step = finetune(model, optimizers, domains.b_train, args, lrs)
        return Arm("full fine-tune", ppl(model, domains.b_test, args.eval_batch),
                   ppl(model, domains.a_test, args.eval_batch), count, 0, step)  # fmt: skip
    finally:
        student.close()  # its rows were never flushed: the copy's database is unchanged too


def linear_targets(model) -> list[str]:
    """Names of the linear layers (nn.Linear, GPT-2's Conv1D) inside the transformer blocks."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name.startswith("transformer.h.")
    )


def lora_arm(student_dir: Path, domains: Domains, args) -> Arm:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise BenchmarkError(
            "the LoRA arm needs peft: pip install 'memstore[bench]' (or pip install peft)"
        ) from None
    copy = copy_student(student_dir, "lora", Path(args.work))
    student = load(copy)
    try:
        torch.manual_seed(args.seed)  # the adapters' initialisation
        targets = linear_targets(student.model)
        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                            target_modules=targets, fan_in_fan_out=True)  # fmt: skip
        with warnings.catch_warnings():  # peft fixes fan_in_fan_out per module type and says so
            warnings.simplefilter("ignore", UserWarning)
            model = get_peft_model(student.model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
        step = finetune(model, [optimizer], domains.b_train, args, [args.lora_lr])
        arm = Arm(f"LoRA r={args.lora_r}", ppl(model, domains.b_test, args.eval_batch),
                  ppl(model, domains.a_test, args.eval_batch), trainable_count(model), 0, step)  # fmt: skip
        arm.extra["lora_modules"] = len(targets)
        return arm
    finally:
        student.close()


def embeddings_arm(student_dir: Path, domains: Domains, args) -> Arm:
    copy = copy_student(student_dir, "embeddings", Path(args.work))
    student = load(copy)
    try:
        model = student.model
        for p in model.parameters():
            p.requires_grad_(False)
        table = model.get_input_embeddings().weight
        table.requires_grad_(True)
        optimizer = torch.optim.AdamW([table], lr=args.embed_lr, weight_decay=0.0)
        step = finetune(model, [optimizer], domains.b_train, args, [args.embed_lr])
        return Arm("embeddings only", ppl(model, domains.b_test, args.eval_batch),
                   ppl(model, domains.a_test, args.eval_batch), table.numel(), 0, step)  # fmt: skip
    finally:
        student.close()


# ----------------------------------------------------------------------------- kNN-LM
@torch.no_grad()
def hidden_and_logp(model, blocks: np.ndarray, batch: int) -> tuple[torch.Tensor, ...]:
    """(final hidden states, the model's log-probability of the next token, the next token) of
    every predicted position of ``blocks``: ``(N, d)``, ``(N,)``, ``(N,)``."""
    model.eval()
    hidden, logp, nxt = [], [], []
    for i in range(0, len(blocks), batch):
        ids = torch.from_numpy(np.ascontiguousarray(blocks[i : i + batch]))
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        h = out.hidden_states[-1][:, :-1]  # after ln_f: what the output projection reads
        target = ids[:, 1:]
        lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, target[..., None])
        hidden.append(h.reshape(-1, h.shape[-1]).float())
        logp.append(lp.reshape(-1))
        nxt.append(target.reshape(-1))
    return torch.cat(hidden), torch.cat(logp), torch.cat(nxt)


@torch.no_grad()
def knn_search(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared-L2 ``k`` nearest keys of each query: (distances, indices), ``(N, k)``.

    faiss's flat index when it is installed (the ``bench`` extra: about 4x faster on this
    benchmark's 173k keys than the matmul and ``topk`` below, which is the fallback); both are
    exact, so they differ only in the order of equally distant keys and in rounding."""
    k = min(k, len(keys))
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(keys.shape[1])
        index.add(np.ascontiguousarray(keys.numpy(), dtype=np.float32))
        dist, idx = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(dist).clamp_min(0), torch.from_numpy(idx).long()
    key_sq = (keys * keys).sum(-1)
    dists, idx = [], []
    for i in range(0, len(queries), chunk):
        q = queries[i : i + chunk]
        d = (q * q).sum(-1, keepdim=True) - 2 * q @ keys.T + key_sq
        top = torch.topk(d, k, dim=-1, largest=False)
        dists.append(top.values.clamp_min(0))
        idx.append(top.indices)
    return torch.cat(dists), torch.cat(idx)


def knn_logp(
    lm_logp: torch.Tensor, dists: torch.Tensor, match: torch.Tensor, lam: float, temp: float
) -> torch.Tensor:
    """log(lam * p_knn + (1 - lam) * p_lm) of the true next token; p_knn is the softmax(-d/T)
    weight of the neighbours whose next token is the true one."""
    weights = torch.log_softmax(-dists / temp, -1)
    knn = torch.logsumexp(weights.masked_fill(~match, -math.inf), -1)
    return torch.logaddexp(math.log(lam) + knn, math.log1p(-lam) + lm_logp)


def knn_arm(model, domains: Domains, args) -> Arm:
    """kNN-LM over B-train with the base student; lambda and T tuned on a held-out slice."""
    from memstore_gpt2.text_data import holdout_split

    started = time.perf_counter()
    keys, _, values = hidden_and_logp(model, domains.b_train, args.eval_batch)
    fit, held = holdout_split(domains.b_train)
    n_fit = len(fit) * (domains.b_train.shape[1] - 1)
    tune_q, tune_lp, tune_y = hidden_and_logp(model, held, args.eval_batch)
    d, i = knn_search(tune_q, keys[:n_fit], args.knn_k)
    match = values[:n_fit][i] == tune_y[:, None]
    scale = float(d[:, 0].median().clamp_min(1e-6))
    best = (math.inf, 0.0, 1.0)
    for lam in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        for factor in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
            nll = -float(knn_logp(tune_lp, d, match, lam, scale * factor).mean())
            best = min(best, (nll, lam, scale * factor))
    _, lam, temp = best

    def test_ppl(blocks: np.ndarray) -> float:
        q, lp, y = hidden_and_logp(model, blocks, args.eval_batch)
        dist, idx = knn_search(q, keys, args.knn_k)
        return math.exp(-float(knn_logp(lp, dist, values[idx] == y[:, None], lam, temp).mean()))

    b, a = test_ppl(domains.b_test), test_ppl(domains.a_test)
    arm = Arm(f"kNN-LM k={args.knn_k}", b, a, 0, len(keys), None)
    arm.extra.update(knn_lambda=lam, knn_temperature=temp, seconds=time.perf_counter() - started)
    return arm


# ----------------------------------------------------------------------------- learn (packs)
def learn(student_dir: Path, data: Path, pack: str, args, background: Path | None = None) -> dict:
    """``memstore learn STUDENT --data DATA --pack PACK [--background TEXT]`` through the Python
    API: the one place this benchmark calls the pack method."""
    from memstore_gpt2.packs.learn import LearnOptions, learn_pack

    chosen = {"lr": args.learn_lr} if args.learn_lr is not None else {}
    options = LearnOptions(steps=args.steps, rows=args.pack_rows, layers=None,
                           batch_size=args.batch_size, seed=args.seed, **chosen)  # fmt: skip
    return learn_pack(str(student_dir), data=[str(data)], pack=pack, options=options,
                      background=None if background is None else str(background))  # fmt: skip


def learn_arms(student_dir: Path, domains: Domains, base_logits: list[torch.Tensor], args):
    """The learn arm, detach and composition, all on one copy of the student: the B pack, then
    the A pack, learnt into its database. Returns (arm, the figures of detach and compose)."""
    copy = copy_student(student_dir, "learn", Path(args.work))
    log(f"learning pack {PACK_B!r} on B-train ({args.steps} steps) ...")
    # the text to keep is the student's own domain: A-train, as a user gives --background
    summary_b = learn(copy, domains.b_train_dir, PACK_B, args, background=domains.a_train_path)
    student = load(copy, (PACK_B,))
    try:
        arm = Arm(f"learn (pack {PACK_B!r})", ppl(student.model, domains.b_test, args.eval_batch),
                  ppl(student.model, domains.a_test, args.eval_batch),
                  int(summary_b["trainable_parameters"]), int(summary_b["rows"]),
                  float(summary_b["step_seconds"]))  # fmt: skip
    finally:
        student.close()
    log(f"learning pack {PACK_A!r} on A-train ({args.steps} steps) ...")
    learn(copy, domains.a_train_path, PACK_A, args)
    figures = {}
    student = load(copy, ())
    try:
        detached = logits_of(student.model, detach_blocks(domains), args.eval_batch)
        figures["detach_identical"] = len(detached) == len(base_logits) and all(
            torch.equal(x, y) for x, y in zip(detached, base_logits, strict=True)
        )
    finally:
        student.close()
    alone = {}
    for pack, blocks in ((PACK_A, domains.a_test), (PACK_B, domains.b_test)):
        student = load(copy, (pack,))
        try:
            alone[pack] = ppl(student.model, blocks, args.eval_batch)
        finally:
            student.close()
    student = load(copy, (PACK_B, PACK_A))
    try:
        both_a = ppl(student.model, domains.a_test, args.eval_batch)
        both_b = ppl(student.model, domains.b_test, args.eval_batch)
    finally:
        student.close()
    figures.update(
        compose_a_ratio=both_a / alone[PACK_A],
        compose_b_ratio=both_b / alone[PACK_B],
        compose={"a_pack_a_test_ppl": alone[PACK_A], "b_pack_b_test_ppl": alone[PACK_B],
                 "both_a_test_ppl": both_a, "both_b_test_ppl": both_b},
    )  # fmt: skip
    arm.extra["summary"] = summary_b
    return arm, figures


def detach_blocks(domains: Domains) -> np.ndarray:
    return np.concatenate([domains.a_test[:DETACH_BLOCKS], domains.b_test[:DETACH_BLOCKS]])


# ----------------------------------------------------------------------------- reporting
def machine(threads: int) -> dict:
    import sqlite_vec

    try:
        import pysqlite3.dbapi2 as sqlite_mod
    except ImportError:  # pragma: no cover
        import sqlite3 as sqlite_mod
    return {
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sqlite": sqlite_mod.sqlite_version,
        "sqlite_vec": getattr(sqlite_vec, "__version__", "?"),
        "env": ", ".join(f"{name}={os.environ.get(name, '')}" for name in CPU_ENV),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def format_table(arms: list[Arm], full_step: float | None) -> str:
    header = (f"| {'arm':<22} | {'B-test ppl':>10} | {'gain share':>10} | {'A-test ppl':>10} | "
              f"{'A x base':>8} | {'trainable':>11} | {'rows':>9} | {'s/step':>7} | "
              f"{'x full FT':>9} |")  # fmt: skip
    lines = [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for a in arms:
        share = "-" if a.gain_share is None else f"{a.gain_share:.3f}"
        step = "-" if a.step_time_s is None else f"{a.step_time_s:.4f}"
        rel = "-" if a.step_time_s is None or not full_step else f"{a.step_time_s / full_step:.2f}x"
        lines.append(
            f"| {a.arm:<22} | {a.b_test_ppl:10.2f} | {share:>10} | {a.a_test_ppl:10.2f} | "
            f"{a.a_ratio:8.3f} | {a.trainable_parameters:11,} | {a.rows:9,} | {step:>7} | "
            f"{rel:>9} |"
        )
    return "\n".join(lines)


def gain_share(base: float, ppl_value: float, full: float) -> float | None:
    span = math.log(base) - math.log(full)
    return (math.log(base) - math.log(ppl_value)) / span if span else None


def run(args) -> dict:
    """The benchmark (``main`` after parsing): builds, measures, prints; the results."""
    if args.data_dir:
        args.a_train = args.a_train or str(Path(args.data_dir) / "valid.txt")
        args.a_test = args.a_test or str(Path(args.data_dir) / "test.txt")
    for name in ("a_train", "a_test"):
        path = Path(getattr(args, name) or "")
        if not path.is_file():
            raise BenchmarkError(f"--{name.replace('_', '-')} {path}: no such file")
        setattr(args, name, str(path.resolve()))
    args.work = str(Path(args.work).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()

    student_dir = build(args)
    before = directory_digest(student_dir)
    base = load(student_dir)
    try:
        context = args.context
        domains = load_domains(args, base.tokenizer, context)
        log(f"A: {domains.a_train.size:,} train / {domains.a_test.size:,} test tokens; "
            f"B: {domains.b_documents[0]} / {domains.b_documents[1]} documents, "
            f"{domains.b_train.size:,} / {domains.b_test.size:,} tokens, "
            f"8-gram overlap {domains.ngram_overlap:.3f}")  # fmt: skip
        base_arm = Arm("base student", ppl(base.model, domains.b_test, args.eval_batch),
                       ppl(base.model, domains.a_test, args.eval_batch), 0, 0, None)  # fmt: skip
        base_logits = logits_of(base.model, detach_blocks(domains), args.eval_batch)
        log("kNN-LM over B-train ...")
        knn = knn_arm(base.model, domains, args)
    finally:
        base.close()
    arms = [base_arm]
    for name, arm_fn in (("full fine-tune", full_finetune_arm), ("LoRA", lora_arm),
                         ("embeddings only", embeddings_arm)):  # fmt: skip
        log(f"{name} on B-train ({args.steps} steps) ...")
        arms.append(arm_fn(student_dir, domains, args))
    arms.append(knn)
    learn_arm, figures = learn_arms(student_dir, domains, base_logits, args)
    arms.append(learn_arm)

    base_unchanged = directory_digest(student_dir) == before
    by = {a.arm.split()[0]: a for a in arms}  # base, full, LoRA, embeddings, kNN-LM, learn
    full = by["full"]
    for a in arms:
        a.a_ratio = a.a_test_ppl / base_arm.a_test_ppl
        if a is not base_arm:
            a.gain_share = gain_share(base_arm.b_test_ppl, a.b_test_ppl, full.b_test_ppl)
    info = machine(args.threads)
    wall = time.perf_counter() - started
    print(f"# memstore knowledge packs: base = {args.layers_label}, {args.memory_rows:,} extra "
          f"rows/layer; {args.steps} steps x {args.batch_size} blocks of {context} per arm; "
          f"A = WikiText-2 ({domains.a_test.size:,} test tokens), B = Python help topics "
          f"({domains.b_documents[0]} train / {domains.b_documents[1]} test documents, "
          f"{domains.b_test.size:,} test tokens, 8-gram overlap {domains.ngram_overlap:.3f})")  # fmt: skip
    print(f"# machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']} "
          f"({args.threads} threads), SQLite {info['sqlite']}, Python {info['python']}, "
          f"{info['env']}; load average at the end {info['load_average'][0]}; "
          f"wall time {wall:.0f} s")  # fmt: skip
    print(format_table(arms, full.step_time_s))
    print(f"kNN-LM: lambda {knn.extra['knn_lambda']}, temperature "
          f"{knn.extra['knn_temperature']:.4g} (chosen on the last 10% of B-train); "
          f"detach identical: {figures['detach_identical']}; composition of packs "
          f"{PACK_A!r} + {PACK_B!r}: A-test x{figures['compose_a_ratio']:.3f} of {PACK_A!r} "
          f"alone, B-test x{figures['compose_b_ratio']:.3f} of {PACK_B!r} alone; base student "
          f"unchanged: {base_unchanged}")  # fmt: skip
    return {
        "learn_gain_share": by["learn"].gain_share,
        "lora_gain_share": by["LoRA"].gain_share,
        "knn_gain_share": by["kNN-LM"].gain_share,
        "embeddings_gain_share": by["embeddings"].gain_share,
        "learn_a_ratio_attached": by["learn"].a_ratio,
        "full_ft_a_ratio": full.a_ratio,
        "detach_identical": figures["detach_identical"],
        "compose_a_ratio": figures["compose_a_ratio"],
        "compose_b_ratio": figures["compose_b_ratio"],
        "step_time_ratio": by["learn"].step_time_s / full.step_time_s,
        "compose": figures["compose"],
        "base_unchanged": base_unchanged,
        "base_b_test_ppl": base_arm.b_test_ppl,
        "base_a_test_ppl": base_arm.a_test_ppl,
        "ngram_overlap": domains.ngram_overlap,
        "b_documents": list(domains.b_documents),
        "tokens": {
            "a_train": int(domains.a_train.size),
            "a_test": int(domains.a_test.size),
            "b_train": int(domains.b_train.size),
            "b_test": int(domains.b_test.size),
        },  # fmt: skip
        "steps": args.steps,
        "batch_size": args.batch_size,
        "arms": [asdict(a) for a in arms],
        "wall_s": wall,
        "machine": info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/wikitext-2",
                        help="WikiText-2 directory (valid.txt: A-train, test.txt: A-test)")  # fmt: skip
    parser.add_argument("--a-train", help="A-train text (default: DATA_DIR/valid.txt)")
    parser.add_argument("--a-test", help="A-test text (default: DATA_DIR/test.txt)")
    parser.add_argument("--work", default="runs/knowledge", help="cache and copies dir")
    parser.add_argument("--width", type=int, default=128, help="teacher width (n_inner: 4x)")
    parser.add_argument("--vocab", type=int, default=2048, help="teacher BPE vocabulary")
    parser.add_argument("--context", type=int, default=64, help="tokens per block")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--memory-rows", type=int, default=16384,
                        help="the base's extra product-key rows per layer")  # fmt: skip
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps of every arm")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10,
                        help="warm-up steps of the fine-tuning arms (learn's own default: 10)")  # fmt: skip
    parser.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tune (AdamW)")
    parser.add_argument("--rows-lr", type=float, default=0.1,
                        help="full fine-tune: product-key rows (row-wise Adagrad)")  # fmt: skip
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--embed-lr", type=float, default=3e-3)
    parser.add_argument("--knn-k", type=int, default=32)
    parser.add_argument("--pack-rows", type=int, default=4096, help="learn: rows per pack layer")
    parser.add_argument("--learn-lr", type=float, default=None,
                        help="learn: learning rate (default: learn's own)")  # fmt: skip
    parser.add_argument("--b-documents", type=int, default=0,
                        help="use the first N help topics (0: all; tiny runs)")  # fmt: skip
    parser.add_argument("--b-test-share", type=float, default=0.2,
                        help="share of the help topics held out as B-test")  # fmt: skip
    parser.add_argument("--a-test-blocks", type=int, default=1024,
                        help="first N A-test blocks (0: all; kNN-LM searches every token)")  # fmt: skip
    parser.add_argument("--b-test-blocks", type=int, default=0, help="first N B-test blocks")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    args.layers_label = f"{TEACHER['layers']} blocks, width {args.width}, BPE {args.vocab}"
    threads = torch.get_num_threads()
    try:
        results = run(args)
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted (Ctrl-C)"
        elif isinstance(exc, BenchmarkError):
            message = str(exc)
        else:  # not foreseen: the traceback helps whoever fixes it
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(exc).__name__}: {first}".removesuffix(": ")
        log(f"knowledge benchmark failed: {message}")
        if args.json:
            print(json.dumps({"error": message}), flush=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
