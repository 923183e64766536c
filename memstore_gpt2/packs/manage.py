"""Managing knowledge packs: list, show, diff, export, import and drop (``memstore packs``).

A pack is knowledge kept as rows in the student's database (:mod:`memstore_gpt2.packs.storage`),
so managing packs is managing rows and one table row:

* **list / show / diff** only read. ``show`` and ``diff`` say what a pack knows the way Mindset
  says it of the student's own rows: a row's value read through the unembedding is the tokens it
  promotes (:mod:`memstore_gpt2.mindset.vocab`); the vocabulary delta's rows are, by
  construction, changes to the tokens they stand for, so its largest rows are the tokens the pack
  re-weights most.
* **export** writes ONE SQLite file holding the pack: its ``pack.<name>.layer<i>`` collections
  (every row with its id, value, LRFU state and hits, so the rows a text read stay visible) and its
  ``memstore_gpt2_packs`` row. Knowledge is shared as a file.
* **import** checks everything before it writes -- that the file is a pack file and not damaged
  (it builds the pack from the file, which validates manifest, blobs and rows), that the pack fits
  this student (dims, blocks, the very dense weights it was learnt for), that no pack of that name
  is there -- and then writes collections and table row in ONE transaction, so a failure leaves
  nothing half-imported.
* **drop** deletes a pack's collections and row in one transaction.

Import and drop take the database's write lock as ``memstore edit`` does
(:mod:`memstore_gpt2.db_lock`): a training run holding the database would otherwise write its
rows over the change at its next checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch

from memstore.errors import MemstoreError, bad_parameter, first_line
from memstore_gpt2.errors import PackError, StudentFormatError
from memstore_gpt2.packs.storage import (
    COLLECTION_PREFIX,
    PACKS,
    PackRecord,
    _parse_manifest,
    check_pack_name,
    has_pack,
    has_table,
    layer_collection,
    read_pack,
    write_pack,
)
from memstore_gpt2.packs.storage import (
    drop_pack as _drop_pack,
)

#: Most tokens listed per vocabulary set in ``diff`` (the counts are always complete).
LISTED_TOKENS = 20
DIFF_NOTE = (
    "the packs' rows are separate memories (collections pack.<A>.layer<i> and pack.<B>.layer<i>): "
    "row ids of one pack say nothing about the same ids in the other"
)


# -- opening ---------------------------------------------------------------------------------------
@contextmanager
def _student_store(student_dir, db: str | None, *, write: bool = False):
    """The student's database (checked to exist and to hold the student): read-only unless
    ``write``, so list/show/diff/export never write a byte of it."""
    from memstore import Store
    from memstore_gpt2.mindset.session import check_student

    db_url = check_student(student_dir, db)
    read_only = not write and db_url.startswith("sqlite:///")
    with Store(db_url, create=False, read_only=read_only) as store:
        yield store, db_url


@contextmanager
def _write_lock(db_url: str, student_dir):
    """The database's write lock, held as ``memstore edit`` holds it."""
    from memstore_gpt2.db_lock import hold_database

    writer = hold_database(db_url, student_dir, "edit")
    try:
        yield
    finally:
        writer.release()


# -- list ------------------------------------------------------------------------------------------
def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """One line of ``packs list``: what a pack is, from its manifest alone."""
    memories = manifest.get("memories") or {}
    rows = 0
    for config in memories.values():
        try:
            rows += int(config["n_keys"]) ** 2
        except (KeyError, TypeError, ValueError):
            raise PackError(
                f"pack {manifest.get('name')!r}'s manifest is damaged: a memory has no n_keys"
            ) from None
    data = manifest.get("data") or {}
    return {
        "name": manifest["name"],
        "finished": bool(manifest.get("finished")),
        "step": int((manifest.get("training") or {}).get("step", 0)),
        "steps": manifest.get("steps"),
        "layers": list(manifest["layers"]),
        "rows": rows,
        "vocabulary_rows": int(manifest.get("vocabulary_rows") or 0),
        "data_tokens": data.get("tokens"),
        "created_at": manifest.get("created_at"),
    }


def list_packs(student_dir: str | os.PathLike, db: str | None = None) -> list[dict[str, Any]]:
    """Every pack in the student's database, by name. A pack whose manifest is damaged is listed
    with ``"damaged"`` (the one-line reason) instead of failing the whole list: it is what a user
    then drops."""
    with _student_store(student_dir, db) as (store, _):
        if not has_table(store):
            return []
        with store.read() as conn:
            rows = list(
                conn.execute(sa.select(PACKS.c.name, PACKS.c.manifest).order_by(PACKS.c.name))
            )
    out = []
    for row in rows:
        try:
            out.append(_summary(_parse_manifest(row.name, row.manifest)))
        except PackError as exc:
            out.append({"name": row.name, "damaged": str(exc)})
    return out


# -- show ------------------------------------------------------------------------------------------
def _gate_summary(gate) -> dict[str, float]:
    """The pack's mixing gate in numbers: its bias, the pack's weight where the gate reads a zero
    hidden state, and the norm of its read (how strongly the hidden state moves it)."""
    bias = float(gate.read.bias.detach().reshape(-1)[0])
    return {
        "bias": round(bias, 4),
        "open_at_zero": round(float(torch.sigmoid(torch.tensor(bias))), 4),
        "weight_norm": round(float(gate.read.weight.detach().norm()), 4),
    }


def _layer_rows(store, collection: str):
    rows = store.collection(collection).export_rows()
    in_use = np.any(rows.values != 0, axis=1)
    return rows, in_use


def _top_read(rows, top: int) -> np.ndarray:
    """Positions of the ``top`` most-read rows (hits > 0), most hits first, ties by id."""
    read = np.flatnonzero(rows.hits > 0)
    order = read[np.argsort(-rows.hits[read], kind="stable")]
    return order[:top]


def _promoted(mindset, memory, values: np.ndarray, top: int) -> list[list[dict]]:
    """Per row value, the ``top`` tokens it promotes (Mindset's vocabulary projection)."""
    from memstore_gpt2.mindset.vocab import project_rows, token_list

    if not len(values):
        return []
    projection = project_rows(mindset.model, memory, torch.from_numpy(values), top=top)
    return [
        token_list(mindset, ids, logits)
        for ids, logits in zip(projection.promote_ids, projection.promote_logits, strict=True)
    ]


def _layer_report(mindset, pack, layer: int, top_rows: int, top_tokens: int) -> dict[str, Any]:
    memory = pack.blocks[str(layer)]
    rows, in_use = _layer_rows(mindset.store, memory.collection_name)
    chosen = _top_read(rows, top_rows)
    promoted = _promoted(mindset, memory, rows.values[chosen], top_tokens)
    return {
        "layer": layer,
        "collection": memory.collection_name,
        "rows": int(len(rows)),
        "rows_in_use": int(in_use.sum()),
        "rows_read": int((rows.hits > 0).sum()),
        "top_rows": [
            {"id": int(rows.ids[p]), "hits": int(rows.hits[p]), "promotes": tokens}
            for p, tokens in zip(chosen, promoted, strict=True)
        ],
    }


def _vocabulary_norms(pack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, |delta_in|, |delta_out|) of the pack's vocabulary delta (empty without one)."""
    vocabulary = pack.vocabulary
    if vocabulary is None:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty
    ids = vocabulary.token_ids.detach().cpu().numpy().astype(np.int64)
    norm_in = vocabulary.delta_in.detach().float().norm(dim=1).cpu().numpy()
    norm_out = vocabulary.delta_out.detach().float().norm(dim=1).cpu().numpy()
    return ids, norm_in, norm_out


def _vocabulary_tokens(mindset, pack, top: int) -> list[dict[str, Any]]:
    """The delta's ``top`` rows by norm (input and output rows together), largest first."""
    ids, norm_in, norm_out = _vocabulary_norms(pack)
    total = np.sqrt(norm_in**2 + norm_out**2)
    order = np.argsort(-total, kind="stable")[:top]
    return [
        {
            "token": mindset.token_text(int(ids[i])),
            "id": int(ids[i]),
            "delta_in_norm": round(float(norm_in[i]), 4),
            "delta_out_norm": round(float(norm_out[i]), 4),
        }
        for i in order
        if total[i] > 0
    ]


def _open_pack(mindset, name: str):
    """(record, built pack) of a stored pack, unfinished ones too (show says how far it got)."""
    from memstore_gpt2.packs.attach import build_pack

    record = read_pack(mindset.store, name)
    return record, build_pack(record, mindset.store)


def show_pack(
    student_dir: str | os.PathLike,
    name: str,
    db: str | None = None,
    *,
    top: int = 5,
    tokens: int = 8,
) -> dict[str, Any]:
    """Everything about one pack: its manifest, per block the rows in use (non-zero values), the
    rows read (hits > 0), the ``top`` most-read rows and the ``tokens`` tokens each promotes, the
    mixing gate, and the vocabulary-delta tokens with the largest rows."""
    from memstore_gpt2.mindset.session import Mindset

    _check_counts(top=top, tokens=tokens)
    check_pack_name(name)
    with Mindset.open(student_dir, db) as mindset:
        record, pack = _open_pack(mindset, name)
        layers = [_layer_report(mindset, pack, i, top, tokens) for i in pack.layers]
        vocabulary = None
        if pack.vocabulary is not None:
            vocabulary = {
                "rows": int(len(pack.vocabulary.token_ids)),
                "top_tokens": _vocabulary_tokens(mindset, pack, max(top, tokens)),
            }
    return {
        **_summary(record.manifest),
        "manifest": record.manifest,
        "gate": _gate_summary(pack.gate),
        "layers": layers,
        "vocabulary": vocabulary,
    }


# -- diff ------------------------------------------------------------------------------------------
def _changed_tokens(pack) -> dict[int, float]:
    """{token id: norm of its delta rows} for every token the pack's vocabulary delta changes."""
    ids, norm_in, norm_out = _vocabulary_norms(pack)
    total = np.sqrt(norm_in**2 + norm_out**2)
    return {int(t): float(n) for t, n in zip(ids, total, strict=True) if n > 0}


def _token_entries(mindset, weights: dict[int, float], limit: int) -> list[dict[str, Any]]:
    order = sorted(weights, key=lambda t: (-weights[t], t))[:limit]
    return [
        {"token": mindset.token_text(t), "id": t, "weight": round(weights[t], 4)} for t in order
    ]


def _row_promotions(mindset, pack, top_rows: int, tokens: int) -> dict[int, float]:
    """{token: share of the pack's reads} over its most-read rows: each of a block's ``top_rows``
    most-read rows adds its share of that block's hits to each of the ``tokens`` tokens it
    promotes most. A token many well-read rows promote comes first."""
    weights: dict[int, float] = {}
    for layer in pack.layers:
        memory = pack.blocks[str(layer)]
        rows, _ = _layer_rows(mindset.store, memory.collection_name)
        chosen = _top_read(rows, top_rows)
        total = float(rows.hits.sum()) or 1.0
        for p, promoted in zip(
            chosen, _promoted(mindset, memory, rows.values[chosen], tokens), strict=True
        ):
            for entry in promoted:
                weights[entry["id"]] = weights.get(entry["id"], 0.0) + rows.hits[p] / total
    return weights


def _pack_side(mindset, pack) -> dict[int, dict[str, Any]]:
    side = {}
    for layer in pack.layers:
        memory = pack.blocks[str(layer)]
        rows, in_use = _layer_rows(mindset.store, memory.collection_name)
        side[layer] = {
            "collection": memory.collection_name,
            "rows": int(len(rows)),
            "rows_in_use": int(in_use.sum()),
            "rows_read": int((rows.hits > 0).sum()),
        }
    return side


def diff_packs(
    student_dir: str | os.PathLike,
    a: str,
    b: str,
    db: str | None = None,
    *,
    top: int = 10,
    tokens: int = 8,
) -> dict[str, Any]:
    """How two packs of one student differ in knowledge: per block the rows each uses and reads
    (separate memories: ids are not comparable), the vocabulary tokens both / only one change,
    and what each promotes most -- through its ``top`` most-read rows per block (``tokens``
    promoted tokens each) and through its vocabulary delta's largest rows."""
    from memstore_gpt2.mindset.session import Mindset

    _check_counts(top=top, tokens=tokens)
    check_pack_name(a), check_pack_name(b)
    if a == b:
        raise bad_parameter("b", f"is the same pack as a ({a!r}): give two different packs")
    with Mindset.open(student_dir, db) as mindset:
        (_, pack_a), (_, pack_b) = _open_pack(mindset, a), _open_pack(mindset, b)
        side_a, side_b = _pack_side(mindset, pack_a), _pack_side(mindset, pack_b)
        layers = [
            {"layer": i, "a": side_a.get(i), "b": side_b.get(i)}
            for i in sorted(set(side_a) | set(side_b))
        ]
        vocab_a, vocab_b = _changed_tokens(pack_a), _changed_tokens(pack_b)
        both = {t: vocab_a[t] + vocab_b[t] for t in vocab_a.keys() & vocab_b.keys()}
        only_a = {t: w for t, w in vocab_a.items() if t not in vocab_b}
        only_b = {t: w for t, w in vocab_b.items() if t not in vocab_a}
        vocabulary = {
            name: {"count": len(weights), "tokens": _token_entries(mindset, weights, LISTED_TOKENS)}
            for name, weights in (("both", both), ("only_a", only_a), ("only_b", only_b))
        }
        promotes = {}
        for key, pack, changed in (("a", pack_a, vocab_a), ("b", pack_b, vocab_b)):
            promotes[key] = {
                "rows": _token_entries(mindset, _row_promotions(mindset, pack, top, tokens), top),
                "vocabulary": _token_entries(mindset, changed, top),
            }
    sets = {key: {e["id"] for part in promotes[key].values() for e in part} for key in ("a", "b")}
    for key, ids in (
        ("both", sets["a"] & sets["b"]),
        ("only_a", sets["a"] - sets["b"]),
        ("only_b", sets["b"] - sets["a"]),
    ):
        promotes[key] = sorted(ids)
    return {
        "a": a,
        "b": b,
        "note": DIFF_NOTE,
        "layers": layers,
        "vocabulary": vocabulary,
        "promotes": promotes,
    }


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_parameter(name, f"must be a positive whole number, got {value!r}")


# -- export ----------------------------------------------------------------------------------------
def _copy_collection(source, target, name: str, new_name: str) -> int:
    """Create ``new_name`` in ``target`` with ``name``'s options and every row of it (ids, values,
    LRFU state and hits as they are) and its clock; joins ``target``'s open transaction."""
    collection = source.collection(name)
    rows = collection.export_rows()
    copy = target.create_collection(new_name, collection.spec.options)
    copy.apply_changes(upserts=rows, clock=collection.clock)
    return len(rows)


def _pack_row(store, name: str):
    with store.read() as conn:
        return conn.execute(sa.select(PACKS).where(PACKS.c.name == name)).first()


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            Path(f"{path}{suffix}").unlink()
        except FileNotFoundError:
            pass


def export_pack(
    student_dir: str | os.PathLike, name: str, out: str | os.PathLike, db: str | None = None
) -> dict[str, Any]:
    """Write pack ``name`` to ``out``, a new SQLite file holding only it (its collections with
    every row, and its table row). Refuses an unfinished pack and an existing ``out``; the file
    appears whole or not at all (written beside it, then renamed)."""
    from memstore import Store

    check_pack_name(name)
    out = Path(out)
    if out.exists():
        raise PackError(
            f"{out} already exists: export never overwrites a file; choose another --out"
        )
    if not out.parent.is_dir():
        raise PackError(f"cannot write {out}: no directory {out.parent}")
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    with _student_store(student_dir, db) as (store, _):
        record = read_pack(store, name)
        if not record.finished:
            raise PackError(
                f"pack {name!r} has not finished learning (step {record.extra.get('step', 0)} of "
                f"{record.manifest.get('steps')}): finish it before exporting it"
            )
        row = _pack_row(store, name)
        rows = 0
        try:
            with Store(f"sqlite:///{partial.resolve()}") as target:
                with target.transaction() as conn:
                    for collection in record.collections:
                        rows += _copy_collection(store, target, collection, collection)
                    PACKS.create(conn, checkfirst=True)
                    conn.execute(
                        PACKS.insert().values(
                            name=name, manifest=row.manifest, parts=row.parts, state=None,
                            updated_at=sa.func.now(),
                        )
                    )  # fmt: skip
            if out.exists():  # made by someone else meanwhile: still never overwritten
                raise PackError(f"{out} already exists: export never overwrites a file")
            os.replace(partial, out)
        finally:
            _remove_sqlite(partial)
    return {
        "pack": name,
        "file": str(out),
        "layers": list(record.manifest["layers"]),
        "rows": rows,
        "vocabulary_rows": int(record.manifest.get("vocabulary_rows") or 0),
        "bytes": out.stat().st_size,
    }


# -- import ----------------------------------------------------------------------------------------
class _Shape:
    """What :func:`~memstore_gpt2.packs.attach.check_fits` reads of a model: its config. Read
    from the student's ``config.json``, so importing does not load the student's rows."""

    def __init__(self, student_dir) -> None:
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(str(student_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise StudentFormatError(
                f"{Path(student_dir) / 'config.json'} is missing or damaged ({first_line(exc)})"
            ) from None


@contextmanager
def _pack_file(path: Path):
    """The pack file opened read-only; one line when it is not a database memstore reads."""
    from memstore import Store

    if not path.is_file():
        raise PackError(f"no pack file at {path}")
    try:
        store = Store(f"sqlite:///{path.resolve()}", create=False, read_only=True)
    except MemstoreError as exc:
        raise PackError(f"{path} is not a pack file ({first_line(exc)})") from None
    with store:
        yield store


def _read_pack_file(
    path: Path, fits: Callable[[PackRecord], None]
) -> tuple[PackRecord, dict[int, Any]]:
    """The one pack a file holds, checked whole: its record, then ``fits(record)`` (does it fit
    the student: said before anything else of it is read), then every part and row of it, built
    as the loader builds them. Returns the record and, by block, its collection's options, rows
    and clock."""
    from memstore_gpt2.packs.attach import build_pack

    with _pack_file(path) as source, _damaged_file(path):
        if not has_table(source):
            raise PackError(f"{path} is not a pack file: it has no table {PACKS.name}")
        with source.read() as conn:
            names = [r.name for r in conn.execute(sa.select(PACKS.c.name))]
        if len(names) != 1:
            raise PackError(f"{path} is not a pack file: it holds {len(names)} packs, not one")
        record = read_pack(source, names[0])
    fits(record)
    with _pack_file(path) as source, _damaged_file(path):
        build_pack(record, source)  # every row and part as the loader will read them
        rows = {}
        for layer, collection in zip(record.manifest["layers"], record.collections, strict=True):
            handle = source.collection(collection)
            rows[layer] = (handle.spec.options, handle.export_rows(), handle.clock)
    return record, rows


@contextmanager
def _damaged_file(path: Path):
    """What goes wrong reading a pack file, as one line naming the file."""
    try:
        yield
    except PackError as exc:
        message = str(exc)
        raise PackError(message if str(path) in message else f"{path}: {message}") from None
    except (MemstoreError, RuntimeError, ValueError) as exc:  # a damaged file's many faces
        raise PackError(f"{path} is damaged ({first_line(exc)})") from None


def import_pack(
    student_dir: str | os.PathLike,
    path: str | os.PathLike,
    as_name: str | None = None,
    db: str | None = None,
) -> dict[str, Any]:
    """Import the pack file ``path`` into the student's database (as ``as_name``: its
    collections become ``pack.<as_name>.layer<i>``), after checking that the file is a whole pack
    file, that the pack fits this student, and that no pack of that name is there. One
    transaction: on any failure nothing of the pack is in the database."""
    from memstore import Store
    from memstore_gpt2.mindset.session import check_student
    from memstore_gpt2.packs.attach import check_fits, student_fingerprint

    path = Path(path)
    if as_name is not None:
        check_pack_name(as_name)
    db_url = check_student(student_dir, db)
    try:
        fingerprint = student_fingerprint(student_dir)
    except OSError as exc:
        raise StudentFormatError(f"cannot read the weights of {student_dir} ({exc})") from None
    shape = _Shape(student_dir)
    record, rows = _read_pack_file(path, lambda r: check_fits(r, shape, fingerprint))
    name = as_name or record.name
    manifest = dict(record.manifest, name=name)
    manifest["memories"] = {
        key: dict(config, collection=layer_collection(name, int(key)))
        for key, config in record.manifest["memories"].items()
    }
    if name != record.name:
        manifest["imported_as"] = {"name": name, "from": record.name}
    manifest["imported"] = {
        "file": path.name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with _write_lock(db_url, student_dir), Store(db_url, create=False) as store:
        if has_pack(store, name):
            raise PackError(
                f"a pack named {name!r} already exists in this student's database: import it "
                f"under another name (--as NEW_NAME) or drop that one first"
            )
        prefix = f"{COLLECTION_PREFIX}{name}."
        stray = [c.name for c in store.list_collections() if c.name.startswith(prefix)]
        if stray:
            raise PackError(
                f"collections {stray} already exist without a pack named {name!r}: import under "
                "another name (--as NEW_NAME)"
            )
        with store.transaction():
            for layer, (options, block, clock) in rows.items():
                copy = store.create_collection(layer_collection(name, layer), options)
                copy.apply_changes(upserts=block, clock=clock)
            write_pack(store, PackRecord(name, manifest, record.parts, None))
    return {
        "pack": name,
        "from": record.name,
        "file": str(path),
        "layers": list(record.manifest["layers"]),
        "rows": int(sum(len(block) for _, block, _ in rows.values())),
        "vocabulary_rows": int(record.manifest.get("vocabulary_rows") or 0),
        "db": db_url,
    }


# -- drop ------------------------------------------------------------------------------------------
def drop_pack(student_dir: str | os.PathLike, name: str, db: str | None = None) -> dict[str, Any]:
    """Drop pack ``name`` (its collections and its row, one transaction) under the write lock;
    the student's own rows are not touched."""
    from memstore import Store
    from memstore_gpt2.mindset.session import check_student

    check_pack_name(name)
    db_url = check_student(student_dir, db)
    with _write_lock(db_url, student_dir), Store(db_url, create=False) as store:
        dropped = _drop_pack(store, name)
    return {"pack": name, "dropped_collections": dropped, "db": db_url}
