"""``memstore learn``: the command over :func:`memstore_gpt2.packs.learn.learn_pack`.

Imports torch only when it runs, like every model command.
"""

from __future__ import annotations

import click

from memstore.errors import bad_parameter
from memstore_gpt2.commands import (
    _emit_json,
    _Interrupted,
    memory_budget_option,
    parse_memory_budget,
    require_torch,
)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers 0,2`` as block indices (None: every block)."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise bad_parameter(
            "layers", f"must be 'all' or block numbers like 0,1; got {text!r}"
        ) from None


@click.command("learn")
@click.argument("student_dir", type=click.Path(file_okay=False))
@click.option(
    "--data", multiple=True, required=True, help="Text file or directory to learn (repeatable)."
)
@click.option("--pack", "pack", required=True, metavar="NAME", help="Name of the pack to write.")
@click.option("--db", default=None, help="Use this memory database instead of the saved one.")
@click.option("--steps", default=300, show_default=True, type=int)
@click.option("--rows", default=4096, show_default=True, type=int,
              help="Memory rows of the pack per block (rounded up to a square).")  # fmt: skip
@click.option("--layers", default=None, metavar="all|I,J",
              help="Blocks the pack reads in [default: all].")  # fmt: skip
@click.option("--lr", default=3e-3, show_default=True, type=float,
              help="AdamW rate of the pack's dense parts (queries, gates, vocabulary delta).")  # fmt: skip
@click.option("--rows-lr", default=0.1, show_default=True, type=float,
              help="Row-wise Adagrad rate of the pack's memory rows.")  # fmt: skip
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option(
    "--context", default=None, type=int, help="Tokens per block [default: min(model, 256)]."
)
@click.option("--vocab-rows", default=4096, show_default=True, type=int,
              help="Most tokens of the vocabulary delta (0: none), ranked TF-IDF.")  # fmt: skip
@click.option("--background", multiple=True,
              help="General text the pack must leave alone [default: text the student samples].")  # fmt: skip
@click.option("--checkpoint-every", default=50, show_default=True, type=int)
@memory_budget_option
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--resume", is_flag=True, help="Continue the unfinished pack NAME from its last checkpoint."
)
@click.option("--json", "as_json", is_flag=True, help="Last line of output: one JSON summary.")
def learn_command(student_dir, data, pack, db, steps, rows, layers, lr, rows_lr, batch_size,
                  context, vocab_rows, background, checkpoint_every, memory_budget, seed,
                  resume, as_json) -> None:  # fmt: skip
    """Learn text into knowledge pack NAME: only the pack trains, the student stays as it is.

    The pack (rows and the small parts that address them) is written into the student's
    database; attach it with --pack NAME on generate, evaluate, trace, rows, mindset, serve.

    \b
    Example:
      memstore learn student/ --data notes/ --pack notes --steps 300
      memstore evaluate student/ --data notes-test.txt --pack notes
    """
    require_torch()
    from memstore_gpt2.errors import RunInterrupted
    from memstore_gpt2.interrupts import progress_bar
    from memstore_gpt2.packs.learn import LearnOptions, learn_pack

    options = LearnOptions(
        steps=steps, rows=rows, layers=parse_layers(layers), lr=lr, rows_lr=rows_lr,
        batch_size=batch_size, block_len=context, vocab_rows=vocab_rows,
        checkpoint_every=checkpoint_every, seed=seed,
    )  # fmt: skip
    bar = progress_bar(total=steps, desc=f"learn {pack}", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh()

    try:
        summary = learn_pack(
            student_dir, list(data), pack, options, db=db,
            memory_budget=parse_memory_budget(memory_budget), resume=resume,
            background=list(background) or None, progress=progress, handle_signals=True,
        )  # fmt: skip
    except RunInterrupted as exc:
        message = f"{exc}; continue it with the same command and --resume"
        raise _Interrupted(message, exc.exit_code) from None
    finally:
        bar.close()
    if as_json:
        _emit_json(summary)
        return
    click.echo(
        f"pack {summary['pack']!r}: {summary['steps']} steps, {summary['rows']:,} rows in blocks "
        f"{summary['layers']}, {summary['vocabulary_rows']:,} vocabulary rows, "
        f"{summary['trainable_parameters']:,} trainable parameters; train loss "
        f"{summary['train_ce_first']:.3f} -> {summary['train_ce_last']:.3f}"
        if summary["train_ce_first"] is not None
        else f"pack {summary['pack']!r}: already at step {summary['steps']}"
    )


def add_pack_commands(group: click.Group) -> None:
    """Register ``memstore learn`` on the ``memstore`` group (called by the CLI's entry point)."""
    group.add_command(learn_command)
