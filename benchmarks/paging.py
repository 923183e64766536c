"""Memory larger than RAM: a grown student whose product-key rows page from the database.

    python benchmarks/paging.py --train ../shared/data/wikitext-2/valid.txt \
        --test ../shared/data/wikitext-2/test.txt [--memory-rows 1048576] [--json]

Builds once, cached under ``--work``: a small GPT-2-architecture teacher (2 blocks, width 128,
4 heads, n_inner 512, byte-level BPE 4096, context 128) trained on ``--train``, and a student
distilled from it for ``--distill-steps`` steps with ``--memory-rows`` extra product-key rows per
memory layer (``memstore distill gpt2 --memory-rows``; one head of 32 reads, values of width 128
in a SQLite file), so that the rows it read are no longer zero.

**A budget is a share of the database's size**: ``10%`` is ``--memory-budget <db bytes / 10>B``,
so the database is exactly 10x the 10 % budget (``db_bytes``, ``budget_bytes_10pct``,
``db_to_budget_10pct``). A cached row costs its value, its key and 58 bytes of bookkeeping
(``PagedRows.bytes_per_slot``), a stored row a little less, so that budget caches a little under
10 % of the rows (``cache_rows`` per run).

Then, for each ``--budgets`` (default 100 %, 25 %, 10 %, 1 %; 100 % means no budget: every row
resident), **one fresh process per measurement** loads the student with ``load_student(...,
memory_budget=...)`` and runs (``--rounds`` warm runs per budget, in alternating order; the table
shows each budget's round with the best tokens/s, JSON ``runs`` every round):

* generation: ``--gen-tokens`` tokens after a prompt (the first ``--prompt-tokens`` of the test
  text), seeded sampling (temperature 0.8, top-k 40, ``--seed``); tokens/s; the tokens must equal
  the 100 % run's (``tokens_identical``);
* test perplexity on the first ``--test-blocks`` blocks of ``--test`` (``--eval-batch`` blocks a
  forward: the 1 % cache must hold every row one forward reads); must equal the 100 % run's
  exactly (``ppl_identical``: float equality, not a tolerance);
* ``paging_stats``: rows read from the database, read queries, cache lookups and hit rate, over the
  generation and the perplexity together (``cache_hit_rate``; each phase also on its own);
* memory: ``VmRSS`` before the student loads (interpreter, torch, transformers, memstore -- every
  module loading imports -- and the test tokens) and ``VmHWM`` (peak RSS) at the end, read from
  ``/proc/self/status``. The peak is
  stated as before + the dense model (every tensor of the model except the product-key tables) +
  the rows' tensors (the cache and its bookkeeping, or the whole table at 100 %) + the rest,
  ``overhead_mb``, which is measured, not assumed (load-time copies, batched reads, activations,
  the allocator);
* prefetch: the 10 % budget also runs with read-ahead switched on (``ProductKeyMemory.prefetch
  = True``, off by default; label ``10% ra``), so ``tokens_per_s_10pct_prefetch`` and
  ``train_step_ratio_10pct_prefetch`` say what reading the rows ahead (in a worker thread,
  while the block's featural memory computes) buys;
* the OS file cache: **warm** reads the database file (and its ``-wal``) through before the student
  loads, so every page is in the OS cache; **cold** first evicts the file's pages with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (after ``fdatasync``). The model's own row cache starts
  empty in both, so the two differ only in the OS cache; ``disk_read_mb`` (``/proc/self/io``
  ``read_bytes``) shows what actually came from the disk, ``load_disk_read_mb`` the part read
  while the student loaded. Every budget runs warm; ``--cold`` lists the budgets also run cold
  (default ``10%``; ``all`` for every budget, ``''`` for none).

Training: a fresh copy of the student directory is resumed for ``--train-steps`` more
distillation steps (``memstore distill gpt2 --resume``, no checkpoint in between), fully resident
or with ``--memory-budget 10%``, each in a fresh process, ``--train-rounds`` times per budget in
alternating order; step time is the run's ``step_time_s`` (rows read and written back inside the
steps included; the best of the rounds counts). ``train_step_ratio_10pct`` is a throughput
ratio: **(fully resident step time) / (10 % step time)**, so 1.0 means no slowdown and the issue's
target "training at 10 % >= 0.5x fully resident" reads ``>= 0.5``. The trained rows are compared
too (``train_rows_identical``: every run, resident or paged, trained exactly the same rows).

Every path (``--work``, ``--train``, ``--test``) is made absolute first and the measurement
processes run with this process's working directory and environment, so they read the same files
and import the same code (an installed memstore, editable or not, or a checkout on
``PYTHONPATH``); a run that fails says why in one line on stderr, and with ``--json`` its last
line is ``{"error": "..."}`` (exit status 1).

Prints the tables and the machine; ``--json`` prints one JSON object as the last line with
``tokens_per_s_full``, ``tokens_per_s_10pct``, ``ppl_full``, ``ppl_10pct``,
``train_step_ratio_10pct``, ``cache_hit_rate_10pct``, ``peak_rss_mb_10pct`` (all warm), the
``*_prefetch`` pair, plus
``runs`` (every measurement), ``train``, the identity flags, ``db_bytes`` and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: CPU settings as the other benchmarks (benchmarks/layer.py says why), unless already set.
CPU_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in CPU_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])

#: The teacher (width and vocabulary are flags): small enough that the whole benchmark fits a
#: 2-core machine in minutes; n_inner is 4x the width.
TEACHER = {"layers": 2, "heads": 4, "context": 128, "batch_size": 16, "lr": 2e-3, "warmup": 20,
           "dropout": 0.1, "seed": 0}  # fmt: skip
MB = 2**20


# ----------------------------------------------------------------------------- process helpers
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def proc_status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def disk_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (``/proc/self/io``; 0 if unknown)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def db_files(db_path: Path) -> list[Path]:
    return [p for p in (db_path, Path(f"{db_path}-wal")) if p.is_file()]


def evict_from_os_cache(db_path: Path) -> None:
    """Cold start: drop the database's pages from the OS file cache (clean pages only, hence the
    ``fdatasync`` first)."""
    for path in db_files(db_path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_os_cache(db_path: Path) -> None:
    """Warm start: read the database through once (into a reused buffer, so RSS does not grow)."""
    buffer = bytearray(16 * MB)
    for path in db_files(db_path):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


class BenchmarkError(RuntimeError):
    """A run cannot go on; the message is the one line the benchmark ends with."""


def package_dir() -> str:
    """Where the ``memstore_gpt2`` this process imports lives (site-packages or a checkout)."""
    import memstore_gpt2

    return str(Path(memstore_gpt2.__file__).resolve().parent)


def run_worker(spec: dict, in_process: bool = False) -> dict:
    """Run ``spec`` in a fresh interpreter (its own peak RSS and row cache); its last stdout line
    is the result. ``in_process`` (smoke runs: no interpreter start-up) runs it here instead, so
    its memory figures then describe this whole process.

    The worker inherits this process's working directory and environment unchanged: a script's
    ``sys.path`` does not depend on the working directory, so it imports the same code (checked:
    ``spec["package"]``), and the paths it is given are absolute. It used to run with the
    working directory and ``PYTHONPATH`` set to the directory above ``benchmarks/``: every run
    started elsewhere (as a non-editable install is) failed at its first worker, which looked
    for the default ``--work runs/paging`` there, and from a checkout a non-editable install's
    workers imported the checkout's code instead of the installed one."""
    if in_process:
        from memstore_torch import ProductKeyMemory

        default = ProductKeyMemory.prefetch
        try:
            return WORKERS[spec["task"]](spec)
        finally:  # set_prefetch changed the class default for this process
            ProductKeyMemory.prefetch = default
    spec = {**spec, "package": package_dir()}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    what = f"the {spec['task']} worker at {spec['budget']}"
    if done.returncode != 0:
        sys.stderr.write(done.stderr)  # its traceback, above the one line that ends the run
        last = (done.stderr.strip().splitlines() or ["(it printed nothing on stderr)"])[-1]
        raise BenchmarkError(f"{what} failed (exit status {done.returncode}): {last}")
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        shown = lines[-1][:200] if lines else "nothing"
        raise BenchmarkError(f"{what} printed no JSON result (its last line: {shown!r})") from None


# ----------------------------------------------------------------------------- workers
def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_memory_bytes(model) -> tuple[int, int]:
    """(dense bytes, product-key rows bytes): every tensor of the model except the product-key
    tables, and the tables' tensors (cache, slot map and bookkeeping when paged)."""
    import torch

    from memstore_torch import ProductKeyMemory
    from memstore_torch.model_memory import memory_layers

    tables = [m for m in memory_layers(model).values() if isinstance(m, ProductKeyMemory)]
    row_ids = {id(m.memory_values) for m in tables} | {id(m.memory_keys) for m in tables}
    dense = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in row_ids]
    rows = []
    for m in tables:
        rows += [m.memory_values, m.memory_keys]
        rows += [v for v in vars(m.index).values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(dense), tensor_bytes(rows)


def import_what_loading_imports() -> None:
    """Import the modules ``load_student`` imports lazily, so that the RSS measured before the
    student loads already holds the code, and the overhead is what the student costs."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: F401

    import memstore_torch  # noqa: F401
    from memstore import Store  # noqa: F401


def eval_worker(spec: dict) -> dict:
    """Load the student under one budget, generate, evaluate; stats and RSS."""
    import torch

    from memstore_gpt2.generate import sample_tokens
    from memstore_gpt2.lm_training import perplexity
    from memstore_gpt2.student import load_student
    from memstore_torch.budget import MemoryBudget
    from memstore_torch.model_memory import paging_stats

    import_what_loading_imports()
    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    prompt, blocks = data["prompt"].tolist(), data["blocks"]
    db_path = Path(spec["db_path"])
    if spec["os_cache"] == "cold":
        evict_from_os_cache(db_path)
    else:
        warm_os_cache(db_path)
    read_before = disk_read_bytes()
    rss_before = proc_status_mb("VmRSS")
    budget = None if spec["memory_budget"] is None else MemoryBudget.parse(spec["memory_budget"])
    set_prefetch(spec)

    started = time.perf_counter()
    student = load_student(spec["student"], memory_budget=budget)
    load_s = time.perf_counter() - started
    load_read = disk_read_bytes() - read_before
    model = student.model
    dense_bytes, rows_bytes = model_memory_bytes(model)
    cache_rows = sum(m.index.capacity for m in model.modules() if getattr(m, "paged", False))

    started = time.perf_counter()
    tokens = sample_tokens(model, prompt, max_new_tokens=spec["gen_tokens"], temperature=0.8,
                           top_k=40, seed=spec["seed"])  # fmt: skip
    gen_s = time.perf_counter() - started
    gen_stats = paging_stats(model)

    started = time.perf_counter()
    with torch.no_grad():
        ppl = perplexity(model, blocks, batch_size=spec["eval_batch"])
    ppl_s = time.perf_counter() - started
    stats = paging_stats(model)
    student.close()
    ppl_lookups = stats["cache_lookups"] - gen_stats["cache_lookups"]
    ppl_read = stats["rows_read"] - gen_stats["rows_read"]
    peak = proc_status_mb("VmHWM")
    new_tokens = len(tokens) - len(prompt)
    return {
        "budget": spec["budget"],
        "memory_budget": spec["memory_budget"],
        "cache_rows": cache_rows,
        "os_cache": spec["os_cache"],
        "tokens": tokens[len(prompt) :],
        "tokens_per_s": new_tokens / gen_s,
        "ppl": ppl,
        "eval_tokens_per_s": blocks.size / ppl_s,
        "load_s": load_s,
        "cache_hit_rate": stats["cache_hit_rate"],
        "gen_cache_hit_rate": gen_stats["cache_hit_rate"],
        "ppl_cache_hit_rate": 1.0 - ppl_read / ppl_lookups if ppl_lookups else 1.0,
        "rows_read": stats["rows_read"],
        "read_queries": stats["read_queries"],
        "cache_lookups": stats["cache_lookups"],
        "resident_rows": stats["resident_rows"],
        "paged_layers": stats["paged_layers"],
        "disk_read_mb": (disk_read_bytes() - read_before) / MB,
        "load_disk_read_mb": load_read / MB,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "dense_mb": dense_bytes / MB,
        "rows_mb": rows_bytes / MB,
        "overhead_mb": peak - rss_before - (dense_bytes + rows_bytes) / MB,
    }


def train_worker(spec: dict) -> dict:
    """Resume the copied run for a few steps, resident or under a budget."""
    import torch

    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.trainer import DistillConfig

    import_what_loading_imports()
    torch.set_num_threads(spec["threads"])
    warm_os_cache(Path(spec["db_path"]))
    rss_before = proc_status_mb("VmRSS")
    config = DistillConfig(steps=spec["steps"], checkpoint_every=0, log_every=1000)
    options = {"steps", "checkpoint_every", "log_every"}
    set_prefetch(spec)
    budget = {}
    if spec["memory_budget"] is not None:
        budget = {"memory_budget": spec["memory_budget"]}
        options.add("memory_budget")
    job = DistillJob(teacher=spec["teacher"], data=[spec["train"]], out=spec["student"],
                     resume=True, config=config, progress=False, device="cpu",
                     explicit=frozenset(options), **budget)  # fmt: skip
    summary = run_distill(job)
    return {
        "budget": spec["budget"],
        "step_time_s": summary["step_time_s"],
        "steps": spec["steps"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "student_ppl": summary.get("student_ppl"),
    }


def set_prefetch(spec: dict) -> None:
    """Read-ahead (off by default) on for a label ending in " ra" (the worker is its own
    process)."""
    from memstore_torch import ProductKeyMemory

    ProductKeyMemory.prefetch = spec["budget"].endswith(" ra")


def budget_arg(label: str, db_bytes: int) -> str | None:
    """``--memory-budget`` for a label: ``"10%"`` (or ``"10% ra"``) -> 10 % of the database's
    bytes; ``"100%"`` -> None (no budget: every row resident)."""
    share = float(label.split("%")[0]) / 100
    return None if share >= 1 else f"{int(share * db_bytes)}B"


def rows_digest(student_dir: str) -> str:
    """sha256 of every product-key row (ids, values) in the student's database, collection by
    collection: equal exactly when the two runs trained the same rows."""
    import hashlib

    from memstore import Store
    from memstore_gpt2.student import read_manifest, resolve_db_url

    student = Path(student_dir)
    digest = hashlib.sha256()
    store = Store(resolve_db_url(student, read_manifest(student)), create=False)
    try:
        for collection in sorted(store.list_collections(), key=lambda c: c.name):
            if collection.name.endswith(".extra"):
                rows = collection.export_rows()  # ordered by id
                digest.update(collection.name.encode())
                digest.update(np.ascontiguousarray(rows.ids).tobytes())
                digest.update(np.ascontiguousarray(rows.values).tobytes())
    finally:
        store.close()
    return digest.hexdigest()


WORKERS = {"eval": eval_worker, "train": train_worker}


# ----------------------------------------------------------------------------- building
def teacher_spec(args):
    from memstore_gpt2.teacher import TeacherSpec

    return TeacherSpec(**TEACHER, width=args.width, inner=4 * args.width, vocab=args.vocab,
                       steps=args.teacher_steps)  # fmt: skip


def build(args) -> tuple[Path, Path]:
    """(teacher dir, student dir), trained once and reused while the recipe is the same."""
    from dataclasses import asdict

    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.teacher import train_teacher
    from memstore_gpt2.text_data import read_texts
    from memstore_gpt2.trainer import DistillConfig

    work = Path(args.work)
    teacher_dir, student_dir = work / "teacher", work / "student"
    spec = teacher_spec(args)
    recipe = {
        "teacher": asdict(spec),
        "train": str(Path(args.train).resolve()),
        "memory_rows": args.memory_rows,
        "distill_steps": args.distill_steps,
        "context": args.context,
        "batch_size": args.batch_size,
        "eval_blocks": 0,
        "seed": args.seed,
    }
    recipe_file = work / "paging_recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return teacher_dir, student_dir
    recipe_file.unlink(missing_ok=True)
    shutil.rmtree(teacher_dir, ignore_errors=True)
    shutil.rmtree(student_dir, ignore_errors=True)
    log(f"training the teacher ({spec.steps} steps) into {teacher_dir} ...")
    train_teacher(read_texts(args.train), teacher_dir, spec, progress=False)
    log(f"distilling the student ({args.memory_rows:,} extra rows per layer, "
        f"{args.distill_steps} steps) into {student_dir} ...")  # fmt: skip
    # eval_blocks=0: the run's own held-out evaluations are not what is measured here (each
    # resumed training run would otherwise end with one, paging rows of its own)
    config = DistillConfig(steps=args.distill_steps, batch_size=args.batch_size, eval_blocks=0,
                           checkpoint_every=0, seed=args.seed)  # fmt: skip
    job = DistillJob(teacher=str(teacher_dir), data=[args.train], out=str(student_dir),
                     k=args.width // 2, memory_rows=args.memory_rows, context=args.context,
                     config=config, progress=False, device="cpu")  # fmt: skip
    run_distill(job)
    recipe_file.write_text(json.dumps(recipe, indent=2))
    return teacher_dir, student_dir


def student_db(student_dir: Path) -> Path:
    from memstore_gpt2.student import read_manifest, resolve_db_url

    url = resolve_db_url(student_dir, read_manifest(student_dir))
    return Path(url.removeprefix("sqlite:///"))


def table_rows(student_dir: Path) -> int:
    """Product-key rows of the student, all layers."""
    from memstore_gpt2.student import read_manifest
    from memstore_torch import ProductKeyMemory

    rows = 0
    for entry in read_manifest(student_dir)["layers"].values():
        for part in entry.get("parts", [entry]):
            if part.get("class") == "ProductKeyMemory":
                rows += ProductKeyMemory.split_saved_config(part["config"])[0].n_rows
    return rows


def write_data(args, teacher_dir: Path) -> Path:
    """The prompt and test blocks every worker uses, so they read no text and no tokenizer."""
    from memstore_gpt2.teacher import load_teacher
    from memstore_gpt2.text_data import load_blocks

    _, tokenizer = load_teacher(teacher_dir)
    blocks = load_blocks(tokenizer, args.test, args.context)[: args.test_blocks]
    path = Path(args.work) / "paging_data.npz"
    np.savez(path, prompt=blocks[0, : args.prompt_tokens], blocks=blocks)
    return path


# ----------------------------------------------------------------------------- reporting
def machine(threads: int) -> dict:
    import sqlite_vec
    import torch

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


def format_runs(runs: list[dict], full: dict) -> str:
    header = (f"| {'budget':>7} | {'OS cache':>8} | {'gen tok/s':>9} | {'x 100%':>6} | "
              f"{'same tokens':>11} | {'test ppl':>9} | {'same ppl':>8} | {'hit rate':>8} | "
              f"{'rows read':>10} | {'queries':>7} | {'disk MB':>7} | {'RSS before':>10} | "
              f"{'peak RSS':>8} | {'dense':>5} | {'rows':>6} | {'overhead':>8} |")  # fmt: skip
    lines = [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for r in runs:
        lines.append(
            f"| {r['budget']:>7} | {r['os_cache']:>8} | {r['tokens_per_s']:9.1f} | "
            f"{r['tokens_per_s'] / full['tokens_per_s']:5.2f}x | {str(r['tokens_identical']):>11} | "
            f"{r['ppl']:9.3f} | {str(r['ppl_identical']):>8} | {r['cache_hit_rate']:8.4f} | "
            f"{r['rows_read']:10,} | {r['read_queries']:7,} | {r['disk_read_mb']:7.1f} | "
            f"{r['rss_before_mb']:8.0f}MB | {r['peak_rss_mb']:6.0f}MB | {r['dense_mb']:5.1f} | "
            f"{r['rows_mb']:6.1f} | {r['overhead_mb']:6.0f}MB |"
        )
    return "\n".join(lines)


def find(runs: list[dict], budget: str, os_cache: str = "warm", round_: int | None = None):
    """The first run of ``budget`` with ``os_cache`` (in ``round_`` if given), else None."""
    return next(
        (r for r in runs if r["budget"] == budget and r["os_cache"] == os_cache and
         round_ in (None, r["round"])), None,
    )  # fmt: skip


def best_run(runs: list[dict], budget: str, os_cache: str) -> dict:
    """The round with the highest generation tokens/s (results are identical in every round)."""
    same = [r for r in runs if r["budget"] == budget and r["os_cache"] == os_cache]
    return max(same, key=lambda r: r["tokens_per_s"])


def parse_budgets(text: str) -> list[str]:
    budgets = [b.strip() for b in text.split(",") if b.strip()]
    for b in budgets:
        if not b.endswith("%") or not 0 < float(b[:-1]) <= 100:
            raise SystemExit(f"--budgets: {b!r} is not a share such as 10%")
    return ["100%"] + [b for b in budgets if b != "100%"]


# ----------------------------------------------------------------------------- main
def measure_training(args, teacher_dir: Path, student_dir: Path, db_bytes: int) -> dict:
    """Resume fresh copies of the run for --train-steps, fully resident, at 10 % and at 10 %
    with read-ahead, in ``--train-rounds`` rounds of alternating order; each budget's best
    step time counts."""
    base = json.loads((student_dir / "distill_summary.json").read_text())["steps"]
    runs, digests = [], set()
    for round_ in range(args.train_rounds):
        for budget in ("100%", "10%", "10% ra")[:: 1 - 2 * (round_ % 2)]:
            copy = Path(args.work) / f"train_{budget.replace('%', 'pct').replace(' ', '_')}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(student_dir, copy, ignore=shutil.ignore_patterns("tensorboard"))
            log(f"training {args.train_steps} steps at {budget}, round {round_ + 1} ...")
            runs.append({"round": round_ + 1} | run_worker({
                "task": "train", "budget": budget, "student": str(copy),
                "memory_budget": budget_arg(budget, db_bytes),
                "teacher": str(teacher_dir), "train": str(Path(args.train).resolve()),
                "steps": base + args.train_steps, "db_path": str(student_db(copy)),
                "threads": args.threads,
            }, args.in_process))  # fmt: skip
            digests.add(rows_digest(str(copy)))
            if not args.keep_copies:
                shutil.rmtree(copy, ignore_errors=True)
    full = min(r["step_time_s"] for r in runs if r["budget"] == "100%")
    paged = min(r["step_time_s"] for r in runs if r["budget"] == "10%")
    ahead = min(r["step_time_s"] for r in runs if r["budget"] == "10% ra")
    return {
        "train_step_ratio_10pct": full / paged,
        "train_step_ratio_10pct_prefetch": full / ahead,
        "step_time_s_10pct_prefetch": ahead,
        "step_time_s_full": full,
        "step_time_s_10pct": paged,
        "train_rows_identical": len(digests) == 1,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="training text (teacher and student)")
    parser.add_argument("--test", help="test text (generation prompt and perplexity)")
    parser.add_argument("--work", default="runs/paging", help="cache and database dir")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128, help="teacher width (n_inner: 4x)")
    parser.add_argument("--vocab", type=int, default=4096, help="teacher BPE vocabulary")
    parser.add_argument("--context", type=int, default=128,
                        help="tokens per block (distillation and test perplexity)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="distillation batch")
    parser.add_argument("--memory-rows", type=int, default=1024**2,
                        help="extra product-key rows per memory layer (rounded up to a square)")  # fmt: skip
    parser.add_argument("--distill-steps", type=int, default=30)
    parser.add_argument("--budgets", default="100%,25%,10%,1%")
    parser.add_argument("--cold", default="10%", help="budgets also run cold ('all': every one)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="warm runs per budget (the best tokens/s is reported)")  # fmt: skip
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--test-blocks", type=int, default=256, help="test blocks (--context)")
    parser.add_argument("--eval-batch", type=int, default=2,
                        help="test blocks per forward: the smallest cache must hold one batch's "
                             "rows (2 x 128 tokens x 32 reads <= 1%% of 1M rows)")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=40,
                        help="distillation steps timed at each budget (0: no training part)")  # fmt: skip
    parser.add_argument("--train-rounds", type=int, default=2,
                        help="training runs per budget, alternating (the best step time counts)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-copies", action="store_true", help="keep the trained copies")
    parser.add_argument("--in-process", action="store_true",
                        help="smoke runs: measure in this process (memory figures then "
                             "describe the whole process, not one budget)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["package"] != package_dir():
            raise SystemExit(
                f"the worker imported memstore_gpt2 from {package_dir()}, the benchmark from "
                f"{spec['package']}: the two would measure different code"
            )
        print(json.dumps(WORKERS[spec["task"]](spec)))
        return 0
    if not args.train or not args.test:
        parser.error("--train and --test are required")
    try:
        results = run(args)
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            raise  # a plain exit status (argparse has said why)
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted (Ctrl-C)"
        elif isinstance(exc, (BenchmarkError, SystemExit)):
            message = str(exc)
        else:  # not foreseen: the traceback helps whoever fixes it
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(exc).__name__}: {first}".removesuffix(": ")
        log(f"paging benchmark failed: {message}")
        if args.json:
            print(json.dumps({"error": message}), flush=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if args.json:
        print(json.dumps(results))
    return 0


def run(args) -> dict:
    """The benchmark (``main`` after parsing): builds, measures, prints the tables; the results."""
    for name in ("train", "test"):
        path = Path(getattr(args, name)).resolve()
        if not path.is_file():
            raise BenchmarkError(f"--{name} {getattr(args, name)}: no such file")
        setattr(args, name, str(path))
    args.work = str(Path(args.work).resolve())  # what every worker reads, whatever its cwd
    started = time.perf_counter()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    budgets = parse_budgets(args.budgets)
    cold = budgets if args.cold.strip() == "all" else parse_budgets(args.cold)[1:]
    if "100%" in [b.strip() for b in args.cold.split(",")]:
        cold = ["100%", *cold]

    teacher_dir, student_dir = build(args)
    data = write_data(args, teacher_dir)
    db_path = student_db(student_dir)
    db_bytes = sum(p.stat().st_size for p in db_files(db_path))
    n_rows = table_rows(student_dir)
    budget_10 = int(budget_arg("10%", db_bytes)[:-1])
    log(f"database {db_path}: {db_bytes / MB:,.1f} MB, {n_rows:,} product-key rows; "
        f"10% budget {budget_10 / MB:,.1f} MB ({db_bytes / budget_10:.1f}x)")  # fmt: skip
    if "10%" in budgets:  # what read-ahead buys, at the budget the keys are about
        budgets.insert(budgets.index("10%") + 1, "10% ra")

    # warm rounds alternate their order, so slow spells of a shared machine hit every budget
    plan = [(b, "warm", i) for i in range(args.rounds) for b in budgets[:: 1 - 2 * (i % 2)]]
    plan += [(b, "cold", 0) for b in budgets if b in cold]
    runs = []
    for budget, os_cache, round_ in plan:
        log(f"evaluating at {budget}, OS cache {os_cache}, round {round_ + 1} ...")
        runs.append({"round": round_ + 1} | run_worker({
            "task": "eval", "budget": budget, "os_cache": os_cache, "student": str(student_dir),
            "memory_budget": budget_arg(budget, db_bytes),
            "db_path": str(db_path), "data": str(data), "gen_tokens": args.gen_tokens,
            "seed": args.seed, "threads": args.threads, "eval_batch": args.eval_batch,
        }, args.in_process))  # fmt: skip
    for r in runs:
        reference = find(runs, "100%", "warm", r["round"])
        r["tokens_identical"] = r["tokens"] == reference["tokens"]
        r["ppl_identical"] = r["ppl"] == reference["ppl"]
    best = [best_run(runs, b, c) for b in budgets for c in ("warm", "cold") if find(runs, b, c)]
    full = find(best, "100%")
    train = measure_training(args, teacher_dir, student_dir, db_bytes) if args.train_steps else None

    info = machine(args.threads)
    print(f"# memstore paging: {n_rows:,} product-key rows in {db_bytes / MB:,.1f} MB of "
          f"SQLite ({db_bytes / budget_10:.1f}x the 10% budget of {budget_10 / MB:,.1f} MB); "
          f"generation {args.gen_tokens} tokens, test ppl on {args.test_blocks} blocks of {args.context}")  # fmt: skip
    print(f"# machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']} "
          f"({args.threads} threads), SQLite {info['sqlite']}, sqlite-vec {info['sqlite_vec']}, "
          f"Python {info['python']}, {info['env']}; load average at the end "
          f"{info['load_average'][0]}; wall time {time.perf_counter() - started:.0f} s")  # fmt: skip
    print(format_runs(best, full))
    if train:
        print(f"training: {args.train_steps} steps, fully resident {train['step_time_s_full']:.3f}"
              f" s/step, 10% {train['step_time_s_10pct']:.3f} s/step: throughput ratio "
              f"{train['train_step_ratio_10pct']:.2f} (1.0 = no slowdown); with read-ahead "
              f"{train['step_time_s_10pct_prefetch']:.3f} s/step, ratio "
              f"{train['train_step_ratio_10pct_prefetch']:.2f}; same trained rows: "
              f"{train['train_rows_identical']}")  # fmt: skip
    ten = find(best, "10%") or {}
    results = {
        "tokens_per_s_full": full["tokens_per_s"],
        "tokens_per_s_10pct": ten.get("tokens_per_s"),
        "ppl_full": full["ppl"],
        "ppl_10pct": ten.get("ppl"),
        "train_step_ratio_10pct": train["train_step_ratio_10pct"] if train else None,
        "cache_hit_rate_10pct": ten.get("cache_hit_rate"),
        "peak_rss_mb_10pct": ten.get("peak_rss_mb"),
        "tokens_per_s_10pct_cold": (find(best, "10%", "cold") or {}).get("tokens_per_s"),
        "tokens_per_s_10pct_prefetch": (find(best, "10% ra") or {}).get("tokens_per_s"),
        "train_step_ratio_10pct_prefetch": (
            train["train_step_ratio_10pct_prefetch"] if train else None
        ),
        "tokens_identical": all(r["tokens_identical"] for r in runs),
        "ppl_identical": all(r["ppl_identical"] for r in runs),
        "train_rows_identical": train["train_rows_identical"] if train else None,
        "db_bytes": db_bytes,
        "budget_bytes_10pct": budget_10,
        "db_to_budget_10pct": db_bytes / budget_10,
        "memory_rows": n_rows,
        "best": [{k: v for k, v in r.items() if k != "tokens"} for r in best],
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
        "train": train,
        "machine": info,
    }
    return results


if __name__ == "__main__":
    sys.exit(main())
