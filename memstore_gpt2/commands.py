"""Model commands of the ``memstore`` CLI: ``teacher train``, ``distill gpt2``, ``generate``,
``evaluate``, ``demo``.

This module is imported every time ``memstore`` starts, so it must not import torch or transformers
at module level: the store commands have to start fast and work without the ``torch`` extra. Each
command imports its machinery when it runs and reports a missing extra as one clear line.
"""

from __future__ import annotations

import os
import time

import click

from memstore.cli_group import MemstoreGroup
from memstore.cli_store import emit_json
from memstore.errors import MissingDependencyError

TORCH_HINT = "pip install 'memstore[torch]'"


FLASK_HINT = "pip install 'memstore[mindset]'"


def require_flask(command: str) -> None:
    """One clear line when Flask (the ``mindset`` extra: Mindset's UI and ``serve``) is missing."""
    try:
        import flask  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"memstore {command} needs flask: {FLASK_HINT}") from None


def require_torch() -> None:
    """Fail with one clear line when the ``torch`` extra is not installed.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` unless the environment says otherwise, before torch is first
    imported: torch then backs large CPU allocations with transparent huge pages, and the sparse
    gradient of a product-key memory (fresh memory every step) otherwise spends most of the
    backward pass in page faults (docs/layers.md, Large memory).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    missing = []
    for module in ("torch", "transformers", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(f"this command needs {', '.join(missing)}: {TORCH_HINT}")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_flush_denormal(True)  # denormals make CPU training steps several times slower


def _emit_json(summary: dict) -> None:
    """The last line of output: one JSON object, keys sorted (``memstore.cli_store.emit_json``)."""
    emit_json(summary, sort_keys=True)


def device_options(command):
    """``--device`` and ``--precision``, shared by the model commands."""
    command = click.option(
        "--precision",
        type=click.Choice(["fp32", "bf16"]),
        default="fp32",
        show_default=True,
        help="bf16: forwards under torch.autocast (CPU too); weights stay fp32.",
    )(command)
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="auto: CUDA when available, else CPU.",
    )(command)


def memory_budget_option(command):
    """``--memory-budget``, shared by the commands that run a student (parsed by
    :func:`parse_memory_budget`)."""
    return click.option(
        "--memory-budget",
        default=None,
        metavar="BYTES|PCT",
        help="Keep at most this much of the extra (product-key) rows in memory, e.g. 512MB or "
        "10%; the rest page from the database through an LRFU cache. Default: all resident.",
    )(command)


def pack_option(command):
    """``--pack NAME`` (repeatable), shared by the commands that run a student: the knowledge
    packs to attach (none: the student's own knowledge); see docs/packs.md."""
    return click.option(
        "--pack",
        "packs",
        multiple=True,
        metavar="NAME",
        help="Attach this knowledge pack from the student's database (repeatable: packs "
        "compose). Default: none, the student's own knowledge.",
    )(command)


def parse_memory_budget(text: str | None):
    """A :class:`~memstore_torch.budget.MemoryBudget` from ``--memory-budget`` (None: none)."""
    if text is None:
        return None
    from memstore_torch.budget import MemoryBudget

    return MemoryBudget.parse(text)


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _print_distill_result(summary: dict) -> None:
    teacher, student = summary.get("teacher_ppl"), summary.get("student_ppl")
    ratio = student / teacher if teacher and student else None
    click.echo(f"teacher perplexity:          {_fmt(teacher)}")
    click.echo(f"student perplexity (start):  {_fmt(summary.get('student_init_ppl'))}")
    click.echo(f"student perplexity:          {_fmt(student)}  ({_fmt(ratio, 3)}x the teacher)")
    click.echo(f"steps:                       {summary.get('steps')}")
    rows = summary.get("memory_rows") or {}
    extra = summary.get("memory_extra_rows") or {}
    click.echo(f"memory rows in the database: {sum(rows.values())} in {len(rows)} slot(s)")
    if sum(extra.values()):
        per_layer = max(extra.values())
        click.echo(
            f"  of which extra rows:        {sum(extra.values())} ({per_layer} per layer: "
            f"--memory-rows {summary.get('memory_rows_requested')} rounded up to a square)"
        )
    click.echo(f"student saved to {summary['out']}, memory in {summary['db']}")


# -- teacher ---------------------------------------------------------------------------------------
@click.group("teacher", cls=MemstoreGroup)
def teacher_group() -> None:
    """Train a small GPT-2-architecture teacher on local text (no download needed)."""


@teacher_group.command("train")
@click.option(
    "--data", "data", multiple=True, required=True, help="Text file or directory (repeatable)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Output model directory."
)
@click.option("--eval-data", multiple=True, help="Held-out text; default: last 10% of --data.")
@click.option("--steps", default=1000, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--width", default=256, show_default=True, type=int)
@click.option("--heads", default=4, show_default=True, type=int)
@click.option("--context", default=128, show_default=True, type=int)
@click.option("--inner", default=None, type=int, help="MLP hidden size [default: 4*width].")
@click.option("--vocab", default=4096, show_default=True, type=int, help="BPE vocabulary size.")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def teacher_train(data, out, eval_data, steps, layers, width, heads, context, inner, vocab,
                  batch_size, lr, seed, device, precision, as_json) -> None:  # fmt: skip
    """Train a byte-level BPE tokenizer and a GPT-2 teacher; save them as a HF directory.

    \b
    Example:
      memstore teacher train --data corpus.txt --out teacher/ --steps 1000
    """
    require_torch()
    from memstore_gpt2.teacher import TeacherSpec, train_teacher
    from memstore_gpt2.text_data import read_texts

    spec = TeacherSpec(layers=layers, width=width, heads=heads, context=context, inner=inner,
                       vocab=vocab, steps=steps, batch_size=batch_size, lr=lr,
                       warmup=min(100, max(1, steps // 10)), seed=seed,
                       precision=precision)  # fmt: skip
    spec.validate()
    from memstore_gpt2.lm_training import resolve_device

    resolved = resolve_device(device)
    texts = read_texts(list(data))
    eval_texts = read_texts(list(eval_data)) if eval_data else None
    summary = train_teacher(texts, out, spec, eval_texts=eval_texts, progress=True,
                            device=resolved)  # fmt: skip
    if as_json:
        _emit_json(summary)
    else:
        click.echo(
            f"teacher saved to {out}: {summary['parameters']:,} parameters, "
            f"held-out perplexity {summary['teacher_ppl']:.2f} after {steps} steps "
            f"({summary['seconds']:.0f} s)"
        )


# -- distill ---------------------------------------------------------------------------------------
@click.group("distill", cls=MemstoreGroup)
def distill_group() -> None:
    """Distil a teacher into a student whose feed-forward memory lives in a database."""


@distill_group.command("gpt2")
@click.option(
    "--teacher", required=True, help="Model directory, or hub name in the local HF cache."
)
@click.option(
    "--data", multiple=True, required=True, help="Training text file or directory (repeatable)."
)
@click.option("--eval-data", multiple=True, help="Held-out text; default: last 10% of --data.")
@click.option("--db", default=None, help="Memory database URL [default: sqlite file in --out].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student directory.")
@click.option("--steps", default=300, show_default=True, type=int)
@click.option(
    "--kind", type=click.Choice(["featural", "associative"]), default="featural", show_default=True
)
@click.option("--k", "k", default=128, show_default=True, type=int, help="Rows read per query.")
@click.option("--init", type=click.Choice(["mlp", "random"]), default=None,
              help="Initialise memory from the teacher's MLPs [default: mlp for featural].")  # fmt: skip
@click.option(
    "--layers", default="all", show_default=True, help="Blocks to replace: all, 0,2 or 1-3."
)
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option(
    "--context", default=None, type=int, help="Block length [default: min(teacher, 128)]."
)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--lr", default=3e-4, show_default=True, type=float)
@click.option("--memory-lr", default=None, type=float, help="Rate for memory rows [default: --lr].")
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Weight of the KD term.")
@click.option("--temperature", default=2.0, show_default=True, type=float)
@click.option("--warmup", default=20, show_default=True, type=int)
@click.option(
    "--eval-every", default=0, show_default=True, type=int, help="0: only at start and end."
)
@click.option(
    "--eval-blocks",
    default=64,
    show_default=True,
    type=int,
    help="Held-out blocks per eval (0: all).",
)
@click.option("--checkpoint-every", default=100, show_default=True, type=int)
@click.option("--heads", default=4, show_default=True, type=int, help="Associative memory heads.")
@click.option("--capacity", default=None, type=int, help="Associative memory rows per layer.")
@click.option("--memory-rows", default=0, show_default=True, type=int,
              help="Extra rows per memory layer: a product-key memory beside each layer, values "
                   "zero at the start; rounded up to a square (n_keys**2).")  # fmt: skip
@click.option("--memory-rows-lr", default=0.1, show_default=True, type=float,
              help="Row-wise Adagrad rate of the extra rows.")  # fmt: skip
@click.option("--memory-rows-heads", default=1, show_default=True, type=int,
              help="Product-key heads of the extra rows.")  # fmt: skip
@click.option("--memory-rows-k", default=32, show_default=True, type=int,
              help="Extra rows read per token and head.")  # fmt: skip
@click.option("--memory-rows-reuse-every", default=0, show_default=True, type=int,
              help="Every N steps, the coldest trained extra rows (LRFU) become blank again "
                   "(0: never).")  # fmt: skip
@click.option("--memory-rows-reuse-fraction", default=0.01, show_default=True, type=float,
              help="Share of each layer's extra rows considered at each reuse.")  # fmt: skip
@click.option("--memory-rows-recombine", default=0.0, show_default=True, type=float,
              help="At each reuse, first merge extra rows read together in that step whose "
                   "values lie this near (relative distance; 0: never).")  # fmt: skip
@click.option("--memory-rows-novel", default=0.0, show_default=True, type=float,
              help="At each reuse, this share of the step's token-heads with the weakest best "
                   "match each claim the coldest extra row they read (0: never).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int)
@device_options
@memory_budget_option
@click.option("--json", "as_json", is_flag=True, help="Last line of output: one JSON summary.")
def distill_gpt2(teacher, data, eval_data, db, out, steps, kind, k, init, layers, resume, context,
                 batch_size, lr, memory_lr, alpha, temperature, warmup, eval_every, eval_blocks,
                 checkpoint_every, heads, capacity, memory_rows, memory_rows_lr, memory_rows_heads,
                 memory_rows_k, memory_rows_reuse_every, memory_rows_reuse_fraction,
                 memory_rows_recombine, memory_rows_novel, seed, device,
                 precision, memory_budget, as_json) -> None:  # fmt: skip
    """Distil GPT-2 TEACHER into a memory student saved in --out.

    \b
    Example:
      memstore distill gpt2 --teacher teacher/ --data train.txt --eval-data test.txt \\
          --out student/ --steps 300 --kind featural --k 128 --init mlp
    """
    require_torch()
    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.errors import RunInterrupted
    from memstore_gpt2.trainer import DistillConfig

    config = DistillConfig(
        steps=steps, batch_size=batch_size, lr=lr, memory_lr=memory_lr, alpha=alpha,
        temperature=temperature, warmup=warmup, eval_every=eval_every,
        eval_blocks=eval_blocks or None, checkpoint_every=checkpoint_every, seed=seed,
        memory_rows_lr=memory_rows_lr, precision=precision,
        memory_rows_reuse_every=memory_rows_reuse_every,
        memory_rows_reuse_fraction=memory_rows_reuse_fraction,
        memory_rows_recombine=memory_rows_recombine, memory_rows_novel=memory_rows_novel,
    )  # fmt: skip
    job = DistillJob(
        teacher=teacher, data=list(data), eval_data=list(eval_data) or None, db=db, out=out,
        kind=kind, k=k, init=init or ("mlp" if kind == "featural" else "random"), layers=layers,
        resume=resume, context=context, heads=heads, capacity=capacity, config=config,
        memory_rows=memory_rows, memory_rows_heads=memory_rows_heads, memory_rows_k=memory_rows_k,
        device=device, memory_budget=memory_budget, progress=True,
        explicit=_explicit_options(click.get_current_context()),
    )  # fmt: skip
    try:
        summary = run_distill(job)
    except RunInterrupted as exc:
        message = f"{exc}; continue it with the same command and --resume"
        raise _Interrupted(message, exc.exit_code) from None
    if as_json:
        _emit_json(summary)
    else:
        _print_distill_result(summary)


def _explicit_options(ctx: click.Context) -> frozenset[str]:
    """Options typed on the command line (a resumed run keeps its own values for the others)."""
    return frozenset(
        name
        for name in ctx.params
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    )


class _Interrupted(click.ClickException):
    """A run stopped by a signal: one line, and the exit code of death by that signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- generate --------------------------------------------------------------------------------------
@click.command("generate")
@click.argument("student_dir", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=60, show_default=True, type=int)
@click.option("--temperature", default=0.8, show_default=True, type=float, help="0: greedy.")
@click.option("--top-k", default=40, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--db", default=None, help="Use this memory database instead of the saved one.")
@pack_option
@memory_budget_option
@device_options
@click.option("--json", "as_json", is_flag=True, help="Last line of output: one JSON summary.")
def generate_command(student_dir, prompt, max_new_tokens, temperature, top_k, seed, db, packs,
                     memory_budget, device, precision, as_json) -> None:  # fmt: skip
    """Sample text from a student (or any GPT-2 directory) with its database memory.

    \b
    Example:
      memstore generate student/ --prompt "The for statement"
      memstore generate student/ --prompt "The for statement" --memory-budget 10% --json
      memstore generate student/ --prompt "The for statement" --pack python-docs
    """
    require_torch()
    from memstore_gpt2.generate import sample_continuation

    with _open_for_run(student_dir, db, memory_budget, device, packs) as run:
        started = time.perf_counter()
        text, new_tokens = sample_continuation(
            run.model, run.tokenizer, prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k or None, seed=seed, precision=precision,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if not as_json:
            click.echo(text)
            return
        _emit_json({
            "text": text,
            "tokens": new_tokens,
            "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
            **run.summary(),
        })  # fmt: skip


# -- evaluate --------------------------------------------------------------------------------------
@click.command("evaluate")
@click.argument("student_dir", type=click.Path(file_okay=False))
@click.option(
    "--data", multiple=True, required=True, help="Test text file or directory (repeatable)."
)
@click.option(
    "--blocks", default=None, type=int, help="Score only the first N blocks [default: all]."
)
@click.option("--context", default=None, type=int, help="Block length [default: min(model, 128)].")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Blocks per forward.")
@click.option("--db", default=None, help="Use this memory database instead of the saved one.")
@pack_option
@memory_budget_option
@device_options
@click.option("--json", "as_json", is_flag=True, help="Last line of output: one JSON summary.")
def evaluate_command(student_dir, data, blocks, context, batch_size, db, packs, memory_budget,
                     device, precision, as_json) -> None:  # fmt: skip
    """Test perplexity of a student (or any GPT-2 directory) on text files.

    Tokenised, cut into blocks and scored as 'memstore distill gpt2' scores its --eval-data.

    \b
    Example:
      memstore evaluate student/ --data test.txt
      memstore evaluate student/ --data test.txt --memory-budget 10% --json
      memstore evaluate student/ --data test.txt --pack python-docs
    """
    require_torch()
    from memstore_gpt2.evaluate import evaluate_perplexity, evaluation_blocks

    with _open_for_run(student_dir, db, memory_budget, device, packs) as run:
        token_blocks = evaluation_blocks(run.tokenizer, data, run.model.config.n_positions,
                                         context=context, max_blocks=blocks)  # fmt: skip
        result = evaluate_perplexity(run.model, token_blocks, batch_size=batch_size,
                                     precision=precision)  # fmt: skip
        summary = {
            "perplexity": result.perplexity,
            "tokens": result.tokens,
            "blocks": result.blocks,
            "context": result.context,
            "batch_size": batch_size,
            "seconds": result.seconds,
            "tokens_per_s": result.tokens_per_s,
            **run.summary(),
        }
    if as_json:
        _emit_json(summary)
        return
    click.echo(
        f"perplexity {summary['perplexity']:.4f} on {summary['tokens']:,} tokens "
        f"({summary['blocks']} blocks of {summary['context']}) in {summary['seconds']:.2f} s "
        f"({summary['tokens_per_s']:,.0f} tokens/s); memory rows resident "
        f"{summary['resident_rows']:,}, read from the database {summary['rows_read']:,} "
        f"(cache hit rate {summary['cache_hit_rate']:.3f})"
    )


class _ModelRun:
    """A model opened for ``generate`` / ``evaluate`` and moved to its device, with what their
    ``--json`` summaries report about it (its memory's paging counters read when asked)."""

    def __init__(self, opened, device, budget, load_seconds: float) -> None:
        self.opened, self.device, self.budget = opened, device, budget
        self.load_seconds = load_seconds
        self.model, self.tokenizer = opened.model, opened.tokenizer

    def summary(self) -> dict:
        from memstore_torch.model_memory import paging_stats

        stats = paging_stats(self.model)
        return {
            "resident_rows": stats["resident_rows"],
            "rows_read": stats["rows_read"],
            "read_queries": stats["read_queries"],
            "cache_hit_rate": stats["cache_hit_rate"],
            "paged_layers": stats["paged_layers"],
            "memory_budget": None if self.budget is None else str(self.budget),
            "packs": [] if self.opened.student is None else self.opened.student.pack_names,
            "device": str(self.device),
            "load_seconds": self.load_seconds,
        }

    def __enter__(self) -> _ModelRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self.opened.close()


def _open_for_run(student_dir, db, memory_budget, device, packs=()) -> _ModelRun:
    """Open ``student_dir`` under ``--memory-budget`` and move it to ``--device`` (timed: the
    ``load_seconds`` of the summaries, kept out of their throughput)."""
    from memstore_gpt2.lm_training import resolve_device
    from memstore_gpt2.model_dir import open_model_dir

    resolved = resolve_device(device)
    budget = parse_memory_budget(memory_budget)
    started = time.perf_counter()
    opened = open_model_dir(student_dir, db=db, memory_budget=budget, packs=packs)
    try:
        opened.model.to(resolved)
    except BaseException:
        opened.close()
        raise
    return _ModelRun(opened, resolved, budget, time.perf_counter() - started)


# -- demo ------------------------------------------------------------------------------------------
@click.command("demo")
@click.option(
    "--data", multiple=True, help="Your own text file/directory [default: Python's docs]."
)
@click.option("--out", default="memstore-demo", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--teacher-steps", default=None, type=int, help="[default: sized to finish in minutes]"
)
@click.option(
    "--steps", default=None, type=int, help="Distillation steps [default: sized likewise]."
)
@click.option("--json", "as_json", is_flag=True, help="Last line of output: one JSON summary.")
def demo_command(data, out, teacher_steps, steps, as_json) -> None:
    """Offline end-to-end demo: train a teacher, distil it into a SQLite memory student.

    \b
    Uses the English help texts shipped with Python unless --data is given.
      memstore demo
      memstore demo --data my_notes/ --out my-demo
    """
    require_torch()
    from memstore_gpt2.demo import run_demo

    # progress and the narration on stderr under --json: stdout holds the JSON line alone
    log = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    summary = run_demo(list(data) or None, out, teacher_steps=teacher_steps,
                       distill_steps=steps, log=log, progress=True)  # fmt: skip
    if as_json:
        _emit_json(summary)


def add_train_commands(group: click.Group) -> None:
    """Register the model commands on the ``memstore`` group (called by ``cli.py``)."""
    group.add_command(teacher_group)
    group.add_command(distill_group)
    group.add_command(generate_command)
    group.add_command(evaluate_command)
    group.add_command(demo_command)
