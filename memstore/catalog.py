"""Reads and writes of the catalog table (collection definitions, clocks, id allocator, counters).

Dialect-neutral SQLAlchemy Core, shared by every backend.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from memstore.errors import CollectionExistsError, CollectionNotFoundError
from memstore.schema import COUNTERS, collections
from memstore.types import CollectionOptions, CollectionSpec

_c = collections.c


#: Catalog column of each collection option where the names differ ("index" is reserved in SQL).
_COLUMN = {"index": "index_kind"}
_OPTIONS = tuple(f.name for f in fields(CollectionOptions))


def _spec(row) -> CollectionSpec:
    m = row._mapping
    options = {option: m[_COLUMN.get(option, option)] for option in _OPTIONS}
    return CollectionSpec(id=int(m["id"]), name=m["name"], **options)


def add(conn: Connection, name: str, options: CollectionOptions) -> CollectionSpec:
    """Record a new collection (``options`` are already validated: a CollectionOptions is)."""
    if conn.execute(sa.select(_c.id).where(_c.name == name)).first() is not None:
        raise CollectionExistsError(f"collection {name!r} already exists")
    values = {_COLUMN.get(option, option): getattr(options, option) for option in _OPTIONS}
    conn.execute(collections.insert().values(name=name, **values))
    return get(conn, name)


def get(conn: Connection, name: str) -> CollectionSpec:
    row = conn.execute(sa.select(collections).where(_c.name == name)).first()
    if row is None:
        raise CollectionNotFoundError(f"no collection named {name!r}")
    return _spec(row)


def find(conn: Connection, name: str) -> CollectionSpec | None:
    row = conn.execute(sa.select(collections).where(_c.name == name)).first()
    return None if row is None else _spec(row)


def all_specs(conn: Connection) -> list[CollectionSpec]:
    return [_spec(r) for r in conn.execute(sa.select(collections).order_by(_c.name))]


def remove(conn: Connection, spec: CollectionSpec) -> None:
    conn.execute(collections.delete().where(_c.id == spec.id))


# Built once: constructing Core statements per call cost more than running them.
_STATE = sa.select(_c.clock, _c.next_id, *[_c[name] for name in COUNTERS]).where(
    _c.id == sa.bindparam("cid")
)


def state(conn: Connection, collection_id: int) -> dict:
    """Clock, id allocator and counters of one collection."""
    row = conn.execute(_STATE, {"cid": collection_id}).first()
    if row is None:
        raise CollectionNotFoundError(f"collection id {collection_id} was dropped")
    return {key: int(value) for key, value in row._mapping.items()}


def set_state(
    conn: Connection,
    collection_id: int,
    *,
    clock: int | None = None,
    next_id: int | None = None,
    add_counters: dict[str, int] | None = None,
) -> None:
    params: dict = {"cid": collection_id}
    if clock is not None:
        params["clock"] = int(clock)
    if next_id is not None:
        params["next_id"] = int(next_id)
    added = tuple(sorted(name for name, amount in (add_counters or {}).items() if amount))
    for name in added:
        params[f"add_{name}"] = int(add_counters[name])
    if len(params) > 1:
        conn.execute(_update_statement("clock" in params, "next_id" in params, added), params)


@lru_cache(maxsize=64)
def _update_statement(clock: bool, next_id: bool, added: tuple[str, ...]):
    values: dict = {}
    if clock:
        values["clock"] = sa.bindparam("clock")
    if next_id:
        values["next_id"] = sa.bindparam("next_id")
    for name in added:
        values[name] = _c[name] + sa.bindparam(f"add_{name}", type_=sa.BigInteger)
    return collections.update().where(_c.id == sa.bindparam("cid")).values(**values)


def read_index_state(conn: Connection, collection_id: int) -> dict:
    text = conn.execute(sa.select(_c.index_state).where(_c.id == collection_id)).scalar_one()
    return json.loads(text) if text else {}


def write_index_state(conn: Connection, collection_id: int, value: dict) -> None:
    conn.execute(
        collections.update().where(_c.id == collection_id).values(index_state=json.dumps(value))
    )
