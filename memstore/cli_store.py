"""Store commands of the ``memstore`` CLI: init, import, query, inspect, prune, upgrade.

Never imports torch, so these start fast and work without the ``torch`` extra. Every memstore error
becomes a one-line ``Error: ...`` with exit code 1 (:class:`memstore.cli_group.MemstoreGroup`); ``--json`` prints one
JSON document on stdout and nothing else.

URL is an SQLAlchemy URL (``sqlite:///path/x.db``, ``postgresql+psycopg://...``); a bare file path
is taken as a SQLite file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import click
import numpy as np
from click.core import ParameterSource

from memstore.errors import DatabaseError, InvalidInputError
from memstore.types import INDEX_KINDS, METRICS, CollectionOptions
from memstore.url import normalise_url


def open_store(url: str, **kwargs):
    """The Store reads URLs and bare paths itself (:func:`memstore.url.normalise_url`)."""
    from memstore.store import Store

    return Store(url, **kwargs)


def load_matrix(path: str, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise InvalidInputError(
            f"{what} file {path} is not a readable .npy array ({exc})"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(f"{what} file {path} holds several arrays; give a single .npy")
    return arr


def emit_json(payload, *, sort_keys: bool = False) -> None:
    """One line of JSON, the last of a command's output; non-finite floats become null (JSON
    has no NaN or infinity), at any depth. Every command's ``--json`` prints through here."""
    click.echo(json.dumps(finite(payload), indent=None, allow_nan=False, sort_keys=sort_keys))


def finite(value):
    """``value`` with every non-finite float, at any depth of dicts and lists, as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


URL_ARG = click.argument("url", metavar="URL")


@click.command("init")
@URL_ARG
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def init_command(url: str, as_json: bool) -> None:
    """Create a memstore database (or check an existing one is usable).

    \b
    Examples:
      memstore init sqlite:///memory.db
      memstore init ./memory.db
    """
    with open_store(url) as store:
        revision = store.schema_revision()
        names = [c.name for c in store.list_collections()]
    if as_json:
        emit_json(
            {"url": normalise_url(url), "schema_revision": revision, "collections": len(names)}
        )
    else:
        click.echo(f"{normalise_url(url)}: memstore schema {revision}, {len(names)} collection(s)")


_NEW = CollectionOptions.defaults()  # a new collection's options: defaults in one place


@click.command("import")
@URL_ARG
@click.argument("collection")
@click.option(
    "--keys", "keys_path", required=True, type=click.Path(), help="Keys, float (n, dk) .npy."
)
@click.option(
    "--values", "values_path", type=click.Path(), help="Values (n, dv) .npy; default: keys."
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default=_NEW["metric"],
    show_default=True,
    help="Distance of a new collection.",
)
@click.option(
    "--index",
    type=click.Choice(INDEX_KINDS),
    default=_NEW["index"],
    show_default=True,
    help="Vector index of a new collection.",
)
@click.option(
    "--oversample",
    type=int,
    default=_NEW["oversample"],
    show_default=True,
    help="Rescore oversampling of a new collection.",
)
@click.option(
    "--lrfu-lambda",
    type=float,
    default=_NEW["lrfu_lambda"],
    show_default=True,
    help="LRFU lambda in [0, 1] of a new collection.",
)
@click.option(
    "--capacity",
    type=int,
    default=_NEW["capacity"],
    help="Capacity (prune's default) of a new collection; default: unbounded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def import_command(
    url,
    collection,
    keys_path,
    values_path,
    metric,
    index,
    oversample,
    lrfu_lambda,
    capacity,
    as_json,
) -> None:
    """Insert rows from .npy files, creating the collection if it is missing.

    Ids are assigned consecutively in the order of the rows; the whole file is one transaction.
    The collection options apply to a new collection; any of them given for an existing one must
    match it.

    \b
    Examples:
      memstore import memory.db facts --keys keys.npy --values values.npy --metric ip
      memstore import sqlite:///memory.db facts --keys keys.npy --index rescore-bit --json
    """
    ctx = click.get_current_context()
    keys = load_matrix(keys_path, "keys")
    values = None if values_path is None else load_matrix(values_path, "values")
    given = {
        "metric": metric,
        "index": index,
        "oversample": oversample,
        "lrfu_lambda": lrfu_lambda,
        "capacity": capacity,
    }
    # A new collection takes every option (typed or default); an existing one is checked against
    # the options the user typed only.
    typed = {
        name: value
        for name, value in given.items()
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    with writing(url, "import"), open_store(url) as store:
        options = typed if store.has_collection(collection) else given
        # Create-if-missing and insert are one transaction: a concurrent import of the same new
        # collection cannot make this one fail, and a crash or a rejected file leaves nothing.
        coll, ids, created = store.import_rows(collection, keys, values, **options)
        rows = len(coll)
    if as_json:
        emit_json(
            {
                "collection": collection,
                "created": created,
                "inserted": int(len(ids)),
                "first_id": int(ids[0]),
                "last_id": int(ids[-1]),
                "rows": rows,
            }
        )
    else:
        verb = "created and imported" if created else "imported"
        click.echo(
            f"{verb} {len(ids)} rows into {collection!r} (ids {ids[0]}..{ids[-1]}); {rows} rows now"
        )


@click.command("query")
@URL_ARG
@click.argument("collection")
@click.option(
    "--queries", "queries_path", required=True, type=click.Path(), help="Queries (m, dk) .npy."
)
@click.option(
    "-k",
    "k",
    required=True,
    type=int,
    help="Neighbours per query (at most 2**20); beyond the rows: id -1, distance inf.",
)
@click.option(
    "--touch/--no-touch", default=True, show_default=True, help="Count the hits for LRFU."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [[..]], "distances": [[..]]}.')
def query_command(url, collection, queries_path, k, touch, as_json) -> None:
    """k nearest rows of each query (smaller distance = nearer; ip distance is -q.k).

    With fewer than k rows, the missing neighbours are id -1 with distance inf (null in --json),
    as in the Python API.

    \b
    Examples:
      memstore query memory.db facts --queries q.npy -k 5
      memstore query memory.db facts --queries q.npy -k 5 --json --no-touch
    """
    from memstore.validation import check_k

    queries = load_matrix(queries_path, "queries")
    check_k(k)
    with open_store(url, create=False) as store:
        result = store.collection(collection).search(queries, k, touch=touch)
    if as_json:
        distances = [[finite(d) for d in row] for row in result.distances.astype(float).tolist()]
        emit_json({"ids": result.ids.tolist(), "distances": distances})
        return
    for q, (ids, dists) in enumerate(zip(result.ids, result.distances, strict=True)):
        pairs = "  ".join(f"{i}:{d:.4g}" for i, d in zip(ids.tolist(), dists.tolist(), strict=True))
        click.echo(f"query {q}: {pairs}")


@click.command("inspect")
@URL_ARG
@click.argument("collection", required=False)
@click.option("--rows", "n", default=5, show_default=True, help="Rows to show (next to evict).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def inspect_command(url, collection, n, as_json) -> None:
    """Collections, dims, metric, index, rows, LRFU scores, counters, size on disk, a few rows.

    Read-only (safe while another process trains into the database).

    \b
    Examples:
      memstore inspect memory.db
      memstore inspect memory.db facts --json
    """
    with open_store(url, read_only=True) as store:
        size = store.size_bytes()
        revision = store.schema_revision()
        if collection is None:
            stats = [c.stats() for c in store.list_collections()]
            payload = {
                "url": normalise_url(url),
                "schema_revision": revision,
                "size_bytes": size,
                "collections": stats,
            }
        else:
            coll = store.collection(collection)
            payload = {**coll.stats(), "size_bytes": size, "sample": coll.peek(max(0, n))}
    if as_json:
        emit_json(payload)
        return
    click.echo(f"{normalise_url(url)}  schema {revision}  size {_human_bytes(size)}")
    for stats in [payload] if collection is not None else payload["collections"]:
        _print_stats(stats)
    if collection is not None and payload["sample"]:
        click.echo("  next to evict (lowest LRFU score first):")
        click.echo("    id        score      crf  hits  last_tick  created_tick")
        for row in payload["sample"]:
            click.echo(
                f"    {row['id']:<8} {row['score']:>7.3f} {row['crf']:>8.3f} {row['hits']:>5} "
                f"{row['last_tick']:>10} {row['created_tick']:>13}"
            )


def _print_stats(s: dict) -> None:
    score = s["score"]
    span = (
        "n/a"
        if score["min"] is None
        else f"min {score['min']:.3f} / mean {score['mean']:.3f} / max {score['max']:.3f}"
    )
    index = s["index"] + (f" (oversample {s['oversample']})" if s["index"] != "exact" else "")
    click.echo(
        f"- {s['name']}: {s['rows']} rows, key_dim {s['key_dim']}, value_dim {s['value_dim']}, "
        f"metric {s['metric']}, index {index}\n"
        f"    lrfu lambda {s['lrfu_lambda']}, capacity {s['capacity']}, clock {s['clock']}, "
        f"score {span}\n"
        f"    inserts {s['inserts']} (novel {s['novel_inserts']}), recombinations "
        f"{s['recombinations']}, evictions {s['evictions']}, searches {s['searches']}"
    )


@contextmanager
def writing(url: str, command: str, *, dry_run: bool = False) -> Iterator[None]:
    """Hold the database's writer lock (:mod:`memstore.writer_lock`) while ``command`` writes, so
    it cannot run under a distillation run (whose next checkpoint would write its resident rows
    back over the change) or another writer: one line naming the holder instead. A dry run
    writes nothing and takes no lock."""
    from memstore.writer_lock import hold_database_file

    writer = None if dry_run else hold_database_file(normalise_url(url), command)
    try:
        yield
    finally:
        if writer is not None:
            writer.release()


def addressed_rows(coll) -> bool:
    """True for a product-key table (memstore_torch's ``ProductKeyMemory``): row ``r`` is id
    ``r + 1`` with key ``[r // n, r % n]`` for ever, so its ids are addresses and the table must
    hold all ``n * n`` of them. Such a collection is made with ``key_dim=2``, ``index="none"`` and
    ``capacity=n * n``, and its lowest row's key is its address; both are checked (the rows only
    cheaply: two of them)."""
    capacity = coll.capacity
    if coll.key_dim != 2 or coll.index != "none" or not capacity:
        return False
    n = math.isqrt(int(capacity))
    if n * n != capacity:
        return False
    from memstore.errors import RowNotFoundError

    for row_id in (1, int(capacity)):
        try:
            key = coll.get(np.asarray([row_id], np.int64)).keys[0]
        except RowNotFoundError:
            continue  # already missing: the options alone say what the table is
        r = row_id - 1
        if key.tolist() != [float(r // n), float(r % n)]:
            return False
    return True


def refuse_addressed_rows(coll) -> None:
    """Prune (and any eviction by id) would leave holes a product-key table cannot have."""
    if addressed_rows(coll):
        n = math.isqrt(int(coll.capacity))
        raise InvalidInputError(
            f"{coll.name} is a product-key table: its row ids are addresses (id r + 1 is the "
            f"key [r // {n}, r % {n}]), so it must keep all {coll.capacity} rows and cannot be "
            "pruned; its model reuses cold rows itself"
        )


@click.command("prune")
@URL_ARG
@click.argument("collection")
@click.option("--capacity", type=int, help="Keep at most N rows (evict the lowest LRFU scores).")
@click.option("--min-score", type=float, help="Evict rows whose LRFU order key is below S.")
@click.option("--dry-run", is_flag=True, help="Only report what would be evicted.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def prune_command(url, collection, capacity, min_score, dry_run, as_json) -> None:
    """LRFU eviction, then give the free space back: the database file shrinks.

    The score is log2(crf) - lambda*(clock - last_tick). After evicting (even when nothing was
    evicted: space freed by deletes or left by an interrupted prune is given back too), the
    vector index is rebuilt from the remaining rows (sqlite-vec keeps emptied chunks otherwise)
    and the file is VACUUMed. --dry-run changes nothing.

    \b
    Examples:
      memstore prune memory.db facts --capacity 10000
      memstore prune memory.db facts --min-score -20 --dry-run --json
    """
    if (capacity is None) == (min_score is None):
        raise InvalidInputError("give exactly one of --capacity N or --min-score S")
    if capacity is not None and capacity < 0:
        raise InvalidInputError(f"--capacity must be >= 0, got {capacity}")
    with writing(url, "prune", dry_run=dry_run), open_store(url, create=False) as store:
        coll = store.collection(collection)
        refuse_addressed_rows(coll)
        rows_before, size_before = len(coll), store.size_bytes()
        evicted = coll.evict(capacity, min_score=min_score, dry_run=dry_run)
        if not dry_run:
            coll.compact()
        rows_after, size_after = len(coll), store.size_bytes()
    payload = {
        "collection": collection,
        "dry_run": dry_run,
        "evicted": int(len(evicted)),
        "rows_before": rows_before,
        "rows_after": rows_after,
        "size_before": size_before,
        "size_after": size_after,
    }
    if as_json:
        emit_json(payload)
        return
    what = "would evict" if dry_run else "evicted"
    click.echo(
        f"{collection}: {what} {len(evicted)} of {rows_before} rows; {rows_after} rows now; "
        f"size {_human_bytes(size_before)} -> {_human_bytes(size_after)}"
    )


@click.command("upgrade")
@URL_ARG
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def upgrade_command(url, as_json) -> None:
    """Migrate the database schema to this memstore's latest revision.

    \b
    Example:
      memstore upgrade sqlite:///memory.db
    """
    from memstore import migrate

    with open_store(url, create=False, check_schema=False) as store:
        with store.read() as conn:
            status = migrate.schema_status(conn)
            before = migrate.current_revision(conn) if status != "empty" else None
    if status == "foreign":
        raise DatabaseError(
            f"{normalise_url(url)} is not a memstore database; refusing to modify it"
        )
    with writing(url, "upgrade"), open_store(url, upgrade=True) as store:
        after = store.schema_revision()
    if as_json:
        emit_json({"url": normalise_url(url), "from": before, "to": after})
    elif before == after:
        click.echo(f"{normalise_url(url)}: already at schema {after}")
    else:
        click.echo(f"{normalise_url(url)}: upgraded schema {before} -> {after}")


def add_store_commands(group: click.Group) -> None:
    """Register the store commands on the top-level ``memstore`` group (see :mod:`memstore_gpt2.cli`)."""
    for command in (
        init_command,
        import_command,
        query_command,
        inspect_command,
        prune_command,
        upgrade_command,
    ):
        group.add_command(command)
