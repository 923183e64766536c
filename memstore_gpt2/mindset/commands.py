"""Mindset's commands: ``memstore trace``, ``explain``, ``rows``, ``edit`` and ``mindset``.

Like every model command they import torch only when they run (the ``memstore`` group imports
this module at every start). With ``--json`` the last line of output is one JSON object.
"""

from __future__ import annotations

import click

from memstore.errors import InvalidInputError, bad_parameter

MINDSET_HINT = "pip install 'memstore[mindset]'"


def _start():
    """torch, transformers and friends, or one clear line (shared with the model commands)."""
    from memstore_gpt2.commands import require_torch

    require_torch()


def _emit_json(summary: dict) -> None:
    from memstore_gpt2.commands import _emit_json as emit

    emit(summary)


def _tok(text: str) -> str:
    return repr(text)


student_argument = click.argument("student", type=click.Path(file_okay=False))
db_option = click.option(
    "--db", default=None, help="Use this memory database instead of the saved one."
)
pack_option = click.option(
    "--pack",
    "packs",
    multiple=True,
    metavar="NAME",
    help="Attach this knowledge pack (repeatable); its rows show as layers pack.NAME.layerI.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Last line of output: one JSON object."
)


# -- trace -----------------------------------------------------------------------------------------
@click.command("trace")
@student_argument
@click.option("--prompt", required=True, help="Text to trace.")
@click.option(
    "--layers",
    default="all",
    show_default=True,
    help="Memory layers: all, or names/blocks like layer0,layer1.extra or 0,1 (a block: all its layers).",
)
@click.option(
    "--top",
    default=8,
    show_default=True,
    type=int,
    help="Rows shown per token and layer, largest contribution first (0: every row read).",
)
@db_option
@pack_option
@json_option
def trace_command(student, prompt, layers, top, db, packs, as_json) -> None:
    """Which memory rows fired for each token of --prompt, with their weights.

    \b
    Exactly what the forward pass selected (recorded by the layers, not searched again). Each
    row: id, weight, and the size of its contribution |weight| * ||out path(value)||. A grown
    student's block shows its featural rows (layer0) and its extra rows (layer0.extra).
      memstore trace student/ --prompt "The for statement"
      memstore trace student/ --prompt "The for statement" --layers layer0 --top 0 --json
    """
    _start()
    from memstore_gpt2.mindset.session import Mindset
    from memstore_gpt2.mindset.trace import trace_prompt

    with Mindset.open(student, db, packs) as mindset:
        trace = trace_prompt(mindset, prompt, layers, top)
        sizes = {n: (mindset.layer(n).layer.index.n, t.selected) for n, t in trace.layers.items()}
    if as_json:
        _emit_json(trace.to_json())
        return
    reads = ", ".join(f"{n}: {k} of {rows} rows" for n, (rows, k) in sizes.items())
    shown = "every row read" if not top else f"the {top} largest contributions"
    click.echo(f"{len(trace.tokens)} tokens; each reads {reads}; showing {shown} (id weight size)")
    width = max(len(_tok(t)) for t in trace.tokens)
    for i, token in enumerate(trace.tokens):
        for j, (name, layer) in enumerate(trace.layers.items()):
            head = f"{i:>3} {_tok(token):<{width}}" if j == 0 else " " * (4 + width)
            cells = "  ".join(
                f"{rid} {w:+.2f} {c:.2f}"
                for rid, w, c in zip(
                    layer.ids[i], layer.weights[i], layer.contributions[i], strict=True
                )
            )
            click.echo(f"{head}  {name}: {cells}")
    for name, layer in trace.layers.items():
        if layer.every_token and len(trace.tokens) > 1:
            ids = ", ".join(map(str, layer.every_token[:20]))
            more = f" and {len(layer.every_token) - 20} more" if len(layer.every_token) > 20 else ""
            click.echo(f"{name}: {len(layer.every_token)} row(s) read at every token: {ids}{more}")


# -- explain ---------------------------------------------------------------------------------------
@click.command("explain")
@student_argument
@click.argument("layer")
@click.argument("row_ids", nargs=-1, required=True)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Text file: show the contexts that fire each row most.",
)
@click.option(
    "--top", default=10, show_default=True, type=int, help="Promoted / suppressed tokens shown."
)
@click.option(
    "--contexts",
    default=5,
    show_default=True,
    type=int,
    help="Contexts shown per row (with --data).",
)
@click.option(
    "--max-tokens",
    default=20_000,
    show_default=True,
    type=int,
    help="Tokens of --data read at most.",
)
@db_option
@pack_option
@json_option
def explain_command(
    student, layer, row_ids, data, top, contexts, max_tokens, db, packs, as_json
) -> None:
    """What rows ROW_IDS of LAYER promote and suppress, their LRFU score, hits and age.

    \b
    A row's value goes through the layer's out path, the final layer norm (scale only) and the
    unembedding; the largest logits are what it promotes (docs/mindset.md says exactly how).
      memstore explain student/ layer0 102 162
      memstore explain student/ layer0 102 --data notes.txt --json
    """
    _start()
    from memstore_gpt2.mindset.explain import explain_rows
    from memstore_gpt2.mindset.session import Mindset, parse_ids

    ids = parse_ids(list(row_ids), parameter="row_ids")
    if contexts < 1:
        raise bad_parameter("contexts", f"must be >= 1, got {contexts}")
    with Mindset.open(student, db, packs) as mindset:
        result = explain_rows(
            mindset, layer, ids, data=data, top=top, contexts=contexts, max_tokens=max_tokens
        )
    if as_json:
        _emit_json(result)
        return
    for row in result["rows"]:
        score = "n/a" if row["score"] is None else f"{row['score']:.2f}"
        address = f" (product key {row['address']})" if "address" in row else ""
        click.echo(
            f"{result['layer']} row {row['id']}{address}: LRFU score {score}, {row['hits']} hits, "
            f"age {row['age']} ticks, last hit {row['idle']} ticks ago, |value| {row['value_norm']:.3f}"
        )
        click.echo("  promotes:   " + _tokens(row["promotes"]))
        click.echo("  suppresses: " + _tokens(row["suppresses"]))
        if "contexts" in row:
            click.echo(
                f"  read at {100 * row['density']:.1f}% of the {result['data_tokens']} tokens of "
                f"{data}; largest weights at:"
            )
            for ctx in row["contexts"]:
                text = f"...{ctx['text']}[{ctx['token']}]".replace("\n", "\\n")
                click.echo(f"    {ctx['weight']:+.3f}  {text}")


def _tokens(items: list[dict]) -> str:
    return "  ".join(f"{_tok(t['token'])} {t['logit']:.1f}" for t in items)


# -- rows ------------------------------------------------------------------------------------------
@click.command("rows")
@student_argument
@click.argument("layer")
@click.option(
    "--promotes",
    default=None,
    help="Only rows with this token among their 10 most promoted (mind the leading space: ' for').",
)
@click.option(
    "--sort",
    type=click.Choice(["hits", "score", "age"]),
    default=None,
    help="[default: hits; with --promotes: that token's logit]",
)
@click.option("--ascending", is_flag=True, help="Smallest first.")
@click.option("--limit", default=20, show_default=True, type=int, help="Rows shown (0: all).")
@click.option(
    "--top", default=5, show_default=True, type=int, help="Promoted / suppressed tokens per row."
)
@db_option
@pack_option
@json_option
def rows_command(student, layer, promotes, sort, ascending, limit, top, db, packs, as_json) -> None:
    """Browse the rows of LAYER: LRFU score, hits, age and what each promotes.

    \b
      memstore rows student/ layer0 --sort hits --limit 10
      memstore rows student/ layer1 --promotes " for" --json
    """
    _start()
    from memstore_gpt2.mindset.rows import list_rows
    from memstore_gpt2.mindset.session import Mindset

    with Mindset.open(student, db, packs) as mindset:
        result = list_rows(
            mindset, layer, promotes=promotes, sort=sort, limit=limit, ascending=ascending, top=top
        )
    if as_json:
        _emit_json(result)
        return
    what = f"promoting {_tok(result['promotes'])} " if "promotes" in result else ""
    click.echo(
        f"{result['layer']}: {result['matched']} of {result['total']} rows {what}"
        f"(clock {result['clock']}); showing {len(result['rows'])}"
    )
    ranked = "promotes" in result  # the token's rank among each row's promoted tokens
    click.echo(
        f"{'id':>7} {'hits':>9} {'score':>8} {'age':>6}{' rank' if ranked else ''}  promotes"
    )
    for row in result["rows"]:
        score = "n/a" if row["score"] is None else f"{row['score']:.2f}"
        rank = f" {row['token_rank']:>4}" if ranked else ""
        click.echo(
            f"{row['id']:>7} {row['hits']:>9} {score:>8} {row['age']:>6}{rank}  "
            + " ".join(_tok(t["token"]) for t in row["promotes"])
        )


# -- edit ------------------------------------------------------------------------------------------
@click.command("edit")
@student_argument
@click.argument("layer")
@click.option(
    "--delete",
    "delete",
    default=None,
    metavar="IDS",
    help="Delete these rows (e.g. 102,162 or 5-9).",
)
@click.option("--zero", "zero", default=None, metavar="IDS", help="Set these rows' values to 0.")
@click.option(
    "--scale",
    "scale",
    nargs=2,
    type=(str, float),
    default=None,
    metavar="IDS FACTOR",
    help="Multiply these rows' values by FACTOR.",
)
@click.option(
    "--prompt", default=None, help="Generate from this text (greedy) before and after the edit."
)
@click.option("--max-new-tokens", default=30, show_default=True, type=int)
@click.option(
    "--dry-run", is_flag=True, help="Show the edit's effect on a loaded copy; write nothing."
)
@db_option
@pack_option
@json_option
def edit_command(
    student, layer, delete, zero, scale, prompt, max_new_tokens, dry_run, db, packs, as_json
) -> None:
    """Delete, zero or scale rows of LAYER, in one transaction.

    \b
    Refused while a training run holds the database (its next checkpoint would undo the edit).
    Takes effect the next time the student is loaded. Product-key rows (layer0.extra, and a
    pack's pack.NAME.layerI, named with --pack NAME) have fixed addresses: zero or scale them;
    they cannot be deleted.
      memstore edit student/ layer0 --delete 102 --prompt "The for statement" --dry-run
      memstore edit student/ layer0 --scale 102,162 0.5
      memstore edit student/ pack.python.layer1 --pack python --zero 7 --prompt "A list is"
    """
    given = [
        (name, value)
        for name, value in (("delete", delete), ("zero", zero), ("scale", scale))
        if value is not None
    ]
    if len(given) != 1:
        raise InvalidInputError(
            "give exactly one of --delete IDS, --zero IDS or --scale IDS FACTOR"
        )
    action, value = given[0]
    ids, factor = (value[0], value[1]) if action == "scale" else (value, None)
    if max_new_tokens < 1:
        raise bad_parameter("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    _start()
    from memstore_gpt2.mindset.edit import run_edit

    try:
        result = run_edit(
            student,
            layer,
            action,
            ids,
            factor,
            prompt=prompt,
            dry_run=dry_run,
            db=db,
            max_new_tokens=max_new_tokens,
            packs=packs,
        )
    except InvalidInputError as exc:
        if exc.parameter in ("ids", "factor"):  # the library's names for what this flag gave
            raise bad_parameter(action, str(exc).split(" ", 1)[1]) from None
        raise
    if as_json:
        _emit_json(result)
        return
    sizes = f"{result['layer']}: {result['rows_before']} -> {result['rows_after']} rows"
    if dry_run:
        click.echo(f"dry run: would {result['description']} ({sizes}); nothing written")
    else:
        click.echo(f"done: {result['description']} in one transaction ({sizes})")
    if prompt is not None:
        click.echo(f"before: {result['before']}")
        click.echo(f"after:  {result['after']}")
        if not result["text_changed"]:
            click.echo("(the greedy continuation did not change)")


# -- mindset ---------------------------------------------------------------------------------------
@click.command("mindset")
@student_argument
@click.option(
    "--port", default=8765, show_default=True, type=int, help="Port on 127.0.0.1 (0: any free one)."
)
@click.option(
    "--allow-edits",
    is_flag=True,
    help="Let the UI write edits to the database (read-only otherwise).",
)
@db_option
@pack_option
def mindset_command(student, port, allow_edits, db, packs) -> None:
    """A local web UI: trace a prompt, see the rows that fire, switch them off, edit them.

    \b
    Listens on 127.0.0.1 only; read-only unless --allow-edits. Stop it with Ctrl-C.
      memstore mindset student/
      memstore mindset student/ --port 8800 --allow-edits
    """
    if not 0 <= port <= 65535:
        raise bad_parameter("port", f"must be 0..65535, got {port}")
    _start()
    from memstore_gpt2.mindset.web import serve

    serve(student, port=port, allow_edits=allow_edits, db=db, packs=packs, log=click.echo)


def add_mindset_commands(group: click.Group) -> None:
    """Register Mindset's commands on the ``memstore`` group (called by ``cli.py``)."""
    for command in (trace_command, explain_command, rows_command, edit_command, mindset_command):
        group.add_command(command)
