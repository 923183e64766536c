"""Where a knowledge pack lives: one row of ``memstore_gpt2_packs`` plus its collections.

A pack is knowledge a student gains after distillation, kept apart from it (docs/design.md,
Knowledge packs). Everything of it is in the student's database, under the pack's name:

* its memory rows: one product-key collection per block it reads in, ``pack.<name>.layer<i>``
  (the same rows machinery as the student's extra rows: paged, LRFU-counted, editable);
* one row of the table ``memstore_gpt2_packs``: the manifest (JSON: shapes, the student it was
  learnt for, how it was learnt), the small dense *addressing parts* (query projections, sub-keys,
  gates, the vocabulary delta) as one safetensors blob, and -- while ``memstore learn`` has not
  finished -- the training state (optimizer, RNG, step) as a second blob.

A checkpoint of ``learn`` writes the rows and that table row in ONE transaction, so the database
alone is a consistent checkpoint: no file next to it has to agree with it, and nothing of the
student's directory is written. Blobs are safetensors (plain tensors: a damaged or hostile pack
cannot run code) and the table is created on first use, like the checkpoint stamps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import torch

from memstore.errors import first_line
from memstore_gpt2.errors import PackError

#: The one table of packs (created on first write; a database without packs has none).
PACKS = sa.Table(
    "memstore_gpt2_packs",
    sa.MetaData(),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("parts", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=True),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

#: Version of a pack's manifest and parts: 2 since packs mix their prediction with the
#: student's instead of writing into its stream (a format-1 pack cannot be read as one).
PACK_FORMAT = 2
#: Pack names become parts of collection names (64 characters at most), so they are short
#: identifiers; a name is also what users type after ``--pack``.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
COLLECTION_PREFIX = "pack."


def check_pack_name(name: str) -> str:
    """``name`` if it can name a pack, else :class:`PackError` saying what a name may hold."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PackError(
            f"invalid pack name {name!r}: use 1-40 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def layer_collection(pack: str, layer: int) -> str:
    """The collection of a pack's rows in block ``layer``."""
    return f"{COLLECTION_PREFIX}{check_pack_name(pack)}.layer{int(layer)}"


def owned_by(collection: str, pack: str) -> bool:
    """True for a collection of ``pack``'s rows."""
    return collection.startswith(f"{COLLECTION_PREFIX}{pack}.")


def is_pack_collection(name: str) -> bool:
    """True for a collection a pack owns (the student's own commands leave those alone)."""
    return name.startswith(COLLECTION_PREFIX)


@dataclass
class PackRecord:
    """A pack as stored: manifest, dense addressing parts, and the unfinished training state."""

    name: str
    manifest: dict[str, Any]
    parts: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None = None
    #: JSON-able training state beside ``state`` (step, ...): kept in the manifest's "training".
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.manifest.get("finished"))

    @property
    def collections(self) -> list[str]:
        return [layer_collection(self.name, int(i)) for i in self.manifest.get("layers", [])]


def _tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def _tensors_from_bytes(blob: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(bytes(blob))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad blob
        raise PackError(f"{where} is damaged ({first_line(exc)})") from None


def _ensure_table(conn) -> None:
    PACKS.create(conn, checkfirst=True)


def has_table(store) -> bool:
    with store.read() as conn:
        return sa.inspect(conn).has_table(PACKS.name)


def write_pack(store, record: PackRecord) -> None:
    """Insert or replace the pack's table row (joins the caller's transaction when one is open,
    so a checkpoint's row flush and this write commit together)."""
    manifest = dict(record.manifest, format=PACK_FORMAT, name=record.name)
    values = {
        "manifest": json.dumps(manifest, sort_keys=True),
        "parts": _tensors_to_bytes(record.parts),
        "state": None if record.state is None else _tensors_to_bytes(record.state),
        "updated_at": sa.func.now(),
    }
    with store.transaction() as conn:
        _ensure_table(conn)
        done = conn.execute(PACKS.update().where(PACKS.c.name == record.name).values(**values))
        if done.rowcount == 0:
            conn.execute(PACKS.insert().values(name=record.name, **values))


def read_manifests(store) -> list[dict[str, Any]]:
    """Every pack's manifest, by name (empty when the database has no packs)."""
    if not has_table(store):
        return []
    with store.read() as conn:
        rows = conn.execute(sa.select(PACKS.c.name, PACKS.c.manifest).order_by(PACKS.c.name))
        return [_parse_manifest(r.name, r.manifest) for r in rows]


def finished_pack_versions(store) -> dict[str, str]:
    """``{name: version}`` of every finished pack: a digest of its manifest and parts, which
    changes when the pack is written again (learnt again after a drop, imported), so a running
    server can tell a new version from the one it holds. One small query: no blob is read."""
    import hashlib

    query = sa.select(PACKS.c.name, PACKS.c.manifest, sa.func.length(PACKS.c.parts))
    with store.read() as conn:  # one connection: a server asks before each admission
        if not sa.inspect(conn).has_table(PACKS.name):
            return {}
        rows = conn.execute(query.order_by(PACKS.c.name)).all()
    versions = {}
    for name, text, size in rows:
        try:
            finished = bool(json.loads(text).get("finished"))
        except (TypeError, ValueError, AttributeError):
            continue  # damaged: attaching it would be refused; not a version to serve
        if finished:
            versions[name] = hashlib.sha256(f"{size}:{text}".encode()).hexdigest()[:16]
    return versions


def pack_names(store) -> list[str]:
    return [m["name"] for m in read_manifests(store)]


def has_pack(store, name: str) -> bool:
    if not has_table(store):
        return False
    with store.read() as conn:
        return conn.execute(sa.select(PACKS.c.name).where(PACKS.c.name == name)).first() is not None


def read_pack(store, name: str) -> PackRecord:
    """The pack ``name``; :class:`PackError` (one line) when it is not there or is damaged."""
    check_pack_name(name)
    row = None
    if has_table(store):
        with store.read() as conn:
            row = conn.execute(sa.select(PACKS).where(PACKS.c.name == name)).first()
    if row is None:
        known = pack_names(store)
        listed = ", ".join(known) if known else "none"
        raise PackError(
            f"no pack named {name!r} in {store.url.render_as_string(hide_password=True)} (packs there: {listed})"
        )
    manifest = _parse_manifest(name, row.manifest)
    where = f"pack {name!r}"
    parts = _tensors_from_bytes(row.parts, f"{where}'s addressing parts")
    state = None if row.state is None else _tensors_from_bytes(row.state, f"{where}'s state")
    return PackRecord(name, manifest, parts, state, dict(manifest.get("training") or {}))


def _parse_manifest(name: str, text: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise PackError(f"pack {name!r}'s manifest is damaged ({first_line(exc)})") from None
    if not isinstance(manifest, dict):
        raise PackError(f"pack {name!r}'s manifest is damaged: not a JSON object")
    if manifest.get("format") != PACK_FORMAT:
        raise PackError(
            f"pack {name!r} has format {manifest.get('format')!r}; this memstore reads "
            f"{PACK_FORMAT}: drop it ('memstore packs drop {name}') and learn it again"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise PackError(f"pack {name!r}'s manifest is damaged: 'layers' is not a list of blocks")
    return manifest


def drop_pack(store, name: str) -> list[str]:
    """Delete the pack's table row and its collections in one transaction; the collections
    dropped. The student's own rows are never touched (only ``pack.<name>.*`` collections)."""
    if not has_pack(store, check_pack_name(name)):  # not read_manifests: a damaged pack drops too
        read_pack(store, name)  # raises the one-line "no pack named" error
    prefix = f"{COLLECTION_PREFIX}{name}."
    dropped = []
    with store.transaction() as conn:
        for collection in store.list_collections():
            if collection.name.startswith(prefix):
                store.drop_collection(collection.name)
                dropped.append(collection.name)
        conn.execute(PACKS.delete().where(PACKS.c.name == name))
    return dropped
