"""The names of the tables and indexes a backend creates for each collection, built here only.

Every per-collection object is named from the catalog's integer ``spec.id``, never from the
collection's (user-given) name, so no user text reaches SQL. The backends create these objects,
the migration hooks must skip them (they are not part of the Alembic schema), maintenance finds
them by pattern, and tests look into them: all of those take the names from this module, so the
naming can never drift between the code that creates a table and the code that looks for it.
"""

from __future__ import annotations

import re

from memstore.types import CollectionSpec

#: Row table (the source of truth): ``rows_<id>``.
ROWS_PREFIX = "rows"
#: SQLite only: the sqlite-vec ``vec0`` kNN index table ``vec_<id>`` (plus sqlite-vec's shadow
#: tables ``vec_<id>_chunks``, ``_rowids``, ``_vector_chunks00``, ``_rescore_*``, ...).
VEC_PREFIX = "vec"
#: SQLite only: the append-only LRFU hit log ``touches_<id>``.
TOUCHES_PREFIX = "touches"

#: Every table a backend creates at run time, including sqlite-vec's shadow tables.
RUNTIME_TABLE = re.compile(rf"^({ROWS_PREFIX}|{VEC_PREFIX}|{TOUCHES_PREFIX})_\d+(_.*)?$")
#: A row table and nothing else, as a POSIX regular expression (PostgreSQL's ``~`` operator).
ROWS_TABLE_POSIX = f"^{ROWS_PREFIX}_[0-9]+$"


def _named(prefix: str, spec: CollectionSpec) -> str:
    return f"{prefix}_{int(spec.id)}"


def rows_table(spec: CollectionSpec) -> str:
    """``rows_<id>``: ids, keys, values and LRFU state of one collection."""
    return _named(ROWS_PREFIX, spec)


def vec_table(spec: CollectionSpec) -> str:
    """``vec_<id>``: the sqlite-vec index of one collection's keys."""
    return _named(VEC_PREFIX, spec)


def touches_table(spec: CollectionSpec) -> str:
    """``touches_<id>``: pending LRFU hits of one collection (SQLite)."""
    return _named(TOUCHES_PREFIX, spec)


def key_index(spec: CollectionSpec, access_method: str | None) -> str:
    """``rows_<id>_key_<method>``: the approximate index on a row table's key (PostgreSQL)."""
    return f"{rows_table(spec)}_key_{access_method}"


def is_runtime_table(name: str | None) -> bool:
    """True for a table a backend creates at run time (see :data:`RUNTIME_TABLE`)."""
    return name is not None and RUNTIME_TABLE.match(name) is not None
