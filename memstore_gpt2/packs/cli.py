"""``memstore packs``: list, show, diff, export, import and drop a student's knowledge packs.

Thin commands over :mod:`memstore_gpt2.packs.manage` (the Python API of the same names). Like
every model command they import torch only when they run; errors are one line (the group's
handler); with ``--json`` the last line of output is one JSON value.
"""

from __future__ import annotations

import click

from memstore.cli_group import MemstoreGroup

student_argument = click.argument("student", type=click.Path(file_okay=False))
db_option = click.option(
    "--db", default=None, help="Use this memory database instead of the saved one."
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Last line of output: one JSON value."
)


def _start():
    from memstore_gpt2.commands import require_torch

    require_torch()


def _emit_json(payload) -> None:
    from memstore.cli_store import emit_json

    emit_json(payload, sort_keys=True)


def _state(pack: dict) -> str:
    if pack["finished"]:
        return f"finished ({pack['step']}/{pack['steps']})"
    return f"unfinished ({pack['step']}/{pack['steps']})"


def _tokens(entries: list[dict], limit: int | None = None) -> str:
    return ", ".join(repr(e["token"]) for e in entries[:limit]) or "-"


def _gate(gate: dict) -> str:
    return (
        f"gate bias {gate['bias']:+.3f} (open {gate['open_at_zero']:.3f} at zero), "
        f"|read| {gate['weight_norm']:.3f}"
    )


@click.group("packs", cls=MemstoreGroup)
def packs_group() -> None:
    """Knowledge packs of a student: list, show, diff, export, import, drop (docs/packs.md)."""


# -- list ------------------------------------------------------------------------------------------
@packs_group.command("list")
@student_argument
@db_option
@json_option
def list_command(student, db, as_json) -> None:
    """The student's packs: state, blocks, rows, vocabulary rows, tokens learnt, creation time.

    \b
      memstore packs list student/
      memstore packs list student/ --json
    """
    _start()
    from memstore_gpt2.packs.manage import list_packs

    packs = list_packs(student, db)
    if as_json:
        _emit_json(packs)
        return
    if not packs:
        click.echo("no packs (learn one with 'memstore learn STUDENT --data TEXT --pack NAME')")
        return
    header = ("name", "state", "blocks", "rows", "vocabulary", "tokens", "created")
    lines = [header]
    for pack in packs:
        if "damaged" in pack:
            lines.append((pack["name"], "damaged", "-", "-", "-", "-", "-"))
            continue
        lines.append(
            (
                pack["name"],
                _state(pack),
                ",".join(map(str, pack["layers"])),
                str(pack["rows"]),
                str(pack["vocabulary_rows"]),
                str(pack["data_tokens"]),
                str(pack["created_at"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for pack in packs:
        if "damaged" in pack:
            click.echo(f"{pack['name']}: {pack['damaged']}")


# -- show ------------------------------------------------------------------------------------------
@packs_group.command("show")
@student_argument
@click.argument("name")
@click.option("--top", default=5, show_default=True, type=int, help="Most-read rows per block.")
@click.option(
    "--tokens", default=8, show_default=True, type=int, help="Promoted tokens shown per row."
)
@db_option
@json_option
def show_command(student, name, top, tokens, db, as_json) -> None:
    """Pack NAME: its manifest, rows in use and read per block, what its most-read rows promote,
    its mixing gate, and the vocabulary-delta tokens with the largest rows.

    \b
      memstore packs show student/ python
      memstore packs show student/ python --top 10 --json
    """
    _start()
    from memstore_gpt2.packs.manage import show_pack

    report = show_pack(student, name, db, top=top, tokens=tokens)
    if as_json:
        _emit_json(report)
        return
    manifest = report["manifest"]
    student_fp = str((manifest.get("student") or {}).get("fingerprint", "?"))[:12]
    click.echo(f"pack {report['name']}: {_state(report)}, created {report['created_at']}")
    click.echo(
        f"  learnt for student {student_fp} on {report['data_tokens']} tokens "
        f"({', '.join((manifest.get('data') or {}).get('paths', [])) or '?'})"
    )
    options = manifest.get("options") or {}
    shown = ("rows", "k", "heads", "key_dim", "lr", "rows_lr", "vocab_rows", "seed")
    click.echo("  options: " + ", ".join(f"{k}={options[k]}" for k in shown if k in options))
    click.echo(f"  mixing {_gate(report['gate'])}")
    for layer in report["layers"]:
        click.echo(
            f"block {layer['layer']} ({layer['collection']}): {layer['rows']} rows, "
            f"{layer['rows_in_use']} in use, {layer['rows_read']} read"
        )
        for row in layer["top_rows"]:
            click.echo(
                f"  row {row['id']:>6}  hits {row['hits']:>6}  promotes {_tokens(row['promotes'])}"
            )
    vocabulary = report["vocabulary"]
    if vocabulary is None:
        click.echo("vocabulary delta: none")
        return
    click.echo(f"vocabulary delta: {vocabulary['rows']} tokens")
    for entry in vocabulary["top_tokens"]:
        click.echo(
            f"  {entry['token']!r:<16} |in| {entry['delta_in_norm']:.4f}  "
            f"|out| {entry['delta_out_norm']:.4f}"
        )


# -- diff ------------------------------------------------------------------------------------------
@packs_group.command("diff")
@student_argument
@click.argument("a")
@click.argument("b")
@click.option(
    "--top", default=10, show_default=True, type=int, help="Most-read rows per block compared."
)
@click.option(
    "--tokens", default=8, show_default=True, type=int, help="Promoted tokens read per row."
)
@db_option
@json_option
def diff_command(student, a, b, top, tokens, db, as_json) -> None:
    """How packs A and B differ: rows each uses per block, vocabulary tokens both or only one
    changes, and what each promotes most (its most-read rows and its vocabulary delta).

    \b
      memstore packs diff student/ python legal
      memstore packs diff student/ python legal --json
    """
    _start()
    from memstore_gpt2.packs.manage import diff_packs

    report = diff_packs(student, a, b, db, top=top, tokens=tokens)
    if as_json:
        _emit_json(report)
        return
    click.echo(f"A = {a}, B = {b}; {report['note']}")
    for layer in report["layers"]:
        cells = []
        for key, label in (("a", "A"), ("b", "B")):
            side = layer[key]
            cells.append(
                f"{label}: -"
                if side is None
                else f"{label}: {side['rows_in_use']} of {side['rows']} rows in use, "
                f"{side['rows_read']} read"
            )
        click.echo(f"block {layer['layer']}: " + "; ".join(cells))
    vocabulary = report["vocabulary"]
    for key, label in (("both", "both change"), ("only_a", "only A"), ("only_b", "only B")):
        part = vocabulary[key]
        click.echo(f"vocabulary, {label}: {part['count']} tokens: {_tokens(part['tokens'])}")
    promotes = report["promotes"]
    for key, label in (("a", "A"), ("b", "B")):
        click.echo(
            f"{label} promotes through its rows: {_tokens(promotes[key]['rows'])}; "
            f"through its vocabulary: {_tokens(promotes[key]['vocabulary'])}"
        )
    click.echo(
        f"promoted tokens: {len(promotes['both'])} by both, {len(promotes['only_a'])} only by A, "
        f"{len(promotes['only_b'])} only by B"
    )


# -- export / import / drop ------------------------------------------------------------------------
@packs_group.command("export")
@student_argument
@click.argument("name")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="New SQLite file to write."
)
@db_option
@json_option
def export_command(student, name, out, db, as_json) -> None:
    """Write pack NAME to one SQLite file (its rows and its record) another user can import.

    \b
    Refuses an unfinished pack and an existing --out file.
      memstore packs export student/ python --out python.pack.db
    """
    _start()
    from memstore_gpt2.packs.manage import export_pack

    result = export_pack(student, name, out, db)
    if as_json:
        _emit_json(result)
        return
    click.echo(
        f"pack {name} exported to {result['file']}: {result['rows']} rows in "
        f"{len(result['layers'])} block(s), {result['vocabulary_rows']} vocabulary rows, "
        f"{result['bytes']:,} bytes"
    )


@packs_group.command("import")
@student_argument
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--as", "as_name", default=None, metavar="NEW_NAME", help="Import under this name.")
@db_option
@json_option
def import_command(student, file, as_name, db, as_json) -> None:
    """Import a pack file (from 'memstore packs export') into the student's database.

    \b
    Refused, with nothing written, when the file is not a whole pack file, the pack was learnt
    for another student (other dims, blocks or dense weights), or a pack of that name exists.
    One transaction. Refused while a training run holds the database.
      memstore packs import student/ python.pack.db
      memstore packs import student/ python.pack.db --as python2
    """
    _start()
    from memstore_gpt2.packs.manage import import_pack

    result = import_pack(student, file, as_name, db)
    if as_json:
        _emit_json(result)
        return
    renamed = f" (exported as {result['from']})" if result["from"] != result["pack"] else ""
    click.echo(
        f"pack {result['pack']}{renamed} imported: {result['rows']} rows in "
        f"{len(result['layers'])} block(s), {result['vocabulary_rows']} vocabulary rows; "
        f"attach it with --pack {result['pack']}"
    )


@packs_group.command("drop")
@student_argument
@click.argument("name")
@db_option
@json_option
def drop_command(student, name, db, as_json) -> None:
    """Delete pack NAME: its collections and its record, in one transaction.

    \b
    The student's own rows are not touched. Refused while a training run holds the database.
      memstore packs drop student/ python
    """
    _start()
    from memstore_gpt2.packs.manage import drop_pack

    result = drop_pack(student, name, db)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"pack {name} dropped ({len(result['dropped_collections'])} collection(s))")
