"""SQL text for one collection's storage on PostgreSQL + pgvector.

Everything that names a table takes the collection's integer id, never its (user-given) name, so
no user text is ever spliced into SQL. Numbers that are spliced (dimensions, ids of the table, knob
values) are Python ints/floats formatted here, never strings from outside.
"""

from __future__ import annotations

from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from memstore import lrfu
from memstore.backends.pg_codec import ROW_FIELDS
from memstore.naming import key_index, rows_table
from memstore.types import CollectionSpec

#: pgvector operator whose result is our public distance (smaller = nearer) for each metric:
#: ``<->`` Euclidean distance, ``<=>`` 1 - cosine similarity, ``<#>`` -(q . k). Mirror of
#: memstore.distances.distances (tested in tests/store/test_semantics.py).
DISTANCE_OPERATORS = {"l2": "<->", "cosine": "<=>", "ip": "<#>"}
#: Operator classes that let HNSW / IVFFlat serve ``ORDER BY key <op> q``.
OPERATOR_CLASSES = {"l2": "vector_l2_ops", "cosine": "vector_cosine_ops", "ip": "vector_ip_ops"}

#: Index kinds the PostgreSQL backend builds -> the pgvector access method that serves them.
#: sqlite-vec's quantised ``rescore-*`` kinds are served by HNSW, so code written against SQLite
#: runs unchanged: pgvector 0.6 has no quantised index, and HNSW already returns exact distances
#: (nothing to rescore); ``oversample`` keeps its meaning, candidates examined per result.
PHYSICAL_INDEX = {
    "exact": None,
    "none": None,  # no index: the exact scan, as "exact" on PostgreSQL
    "hnsw": "hnsw",
    "ivfflat": "ivfflat",
    "rescore-bit": "hnsw",
    "rescore-int8": "hnsw",
}
PG_INDEX_KINDS = tuple(PHYSICAL_INDEX)
#: pgvector caps hnsw.ef_search at 1000; beyond that a query falls back to an exact scan.
HNSW_MAX_EF_SEARCH = 1000
#: pgvector indexes vectors of up to 2000 dimensions.
INDEX_MAX_DIM = 2000
#: pgvector's ``vector`` type holds at most 16000 dimensions.
VECTOR_MAX_DIM = 16000

ROW_COLUMNS = ", ".join(ROW_FIELDS)


def physical_index(spec: CollectionSpec) -> str | None:
    """``"hnsw"``, ``"ivfflat"`` or None (exact scan) for the collection's index kind."""
    return PHYSICAL_INDEX[spec.index]


def index_name(spec: CollectionSpec) -> str:
    return key_index(spec, physical_index(spec))


def distance_operator(spec: CollectionSpec) -> str:
    return DISTANCE_OPERATORS[spec.metric]


def create_table(spec: CollectionSpec) -> str:
    # FILLFACTOR below 100 leaves room on each page for HOT updates of the LRFU fields (a touch
    # rewrites the row; on a full page that would also mean new index entries).
    return (
        f"CREATE TABLE {rows_table(spec)} ("
        "id bigint PRIMARY KEY, "
        f"key vector({int(spec.key_dim)}) NOT NULL, "
        f"value vector({int(spec.value_dim)}) NOT NULL, "
        "crf double precision NOT NULL, "
        "last_tick bigint NOT NULL, "
        "hits bigint NOT NULL, "
        "created_tick bigint NOT NULL"
        ") WITH (fillfactor = 90)"
    )


def create_index(spec: CollectionSpec, *, lists: int = 1) -> str | None:
    """DDL of the approximate index (None for exact collections)."""
    opclass = OPERATOR_CLASSES[spec.metric]
    if physical_index(spec) == "hnsw":
        return (
            f"CREATE INDEX {index_name(spec)} ON {rows_table(spec)} "
            f"USING hnsw (key {opclass}) WITH (m = 16, ef_construction = 64)"
        )
    if physical_index(spec) == "ivfflat":
        return (
            f"CREATE INDEX {index_name(spec)} ON {rows_table(spec)} "
            f"USING ivfflat (key {opclass}) WITH (lists = {int(lists)})"
        )
    return None


def ivfflat_lists(row_count: int) -> int:
    """pgvector's advice: rows / 1000 up to 1M rows, sqrt(rows) beyond; at least 1."""
    if row_count <= 1_000_000:
        return max(1, row_count // 1000)
    return max(1, int(row_count**0.5))


def knn_query(spec: CollectionSpec, *, exact_tiebreak: bool, single: bool = False) -> str:
    """All queries of a batch in one statement: one LATERAL top-k per query.

    ``single``: the plain ``ORDER BY ... LIMIT`` form for a batch of one query, which (unlike a
    LATERAL subquery) PostgreSQL can run as a parallel sequential scan for exact search.

    Parameters: ``%(q)b`` the queries as one flat float4[] (m * dk), ``%(m)s``, ``%(k)s``. Each
    query is sliced out and cast to ``vector``; the LATERAL subquery's ``ORDER BY key <op> q LIMIT
    k`` is the shape pgvector's index scans serve. The id tie-break keeps exact results
    deterministic; it is left out for index scans, which can only order by the distance.
    """
    dk = int(spec.key_dim)
    op = distance_operator(spec)
    tiebreak = ", id" if exact_tiebreak else ""
    if single:
        query = f"(%(q)b::real[])::vector({dk})"
        return (
            f"SELECT 1 AS ord, id, key {op} {query} AS dist, key, value FROM {rows_table(spec)} "
            f"ORDER BY key {op} {query}{tiebreak} LIMIT %(k)s"
        )
    return (
        # MATERIALIZED: computed once per query; inlined, the slice + cast would be re-evaluated
        # for every row the scan visits (measured 5x slower on exact scans).
        "WITH q AS MATERIALIZED ("
        f"  SELECT i AS ord, ((%(q)b::real[])[(i - 1) * {dk} + 1 : i * {dk}])::vector({dk}) AS vec"
        "   FROM generate_series(1, %(m)s) AS i"
        ") SELECT q.ord, r.id, r.dist, r.key, r.value FROM q CROSS JOIN LATERAL ("
        f"  SELECT id, key {op} q.vec AS dist, key, value FROM {rows_table(spec)}"
        f"  ORDER BY key {op} q.vec{tiebreak} LIMIT %(k)s"
        ") AS r"
    )


# "named" so that psycopg placeholders inside literal columns are not escaped to "%%(x)s".
_DIALECT = postgresql.dialect(paramstyle="named")


def _compile(expr: sa.ColumnElement) -> str:
    return str(expr.compile(dialect=_DIALECT, compile_kwargs={"literal_binds": True}))


@lru_cache(maxsize=256)
def _order_key(lrfu_lambda: float) -> str:
    now = sa.literal_column("%(now)s::bigint")
    return _compile(lrfu.order_key_sql(sa.column("crf"), sa.column("last_tick"), now, lrfu_lambda))


def order_key_sql(spec: CollectionSpec) -> str:
    """Mirror of memstore.lrfu.order_key: :func:`memstore.lrfu.order_key_sql` compiled for
    PostgreSQL, with the current tick as the parameter ``%(now)s`` (tested in
    tests/store/test_semantics.py). Compiled once per lambda."""
    return _order_key(float(spec.lrfu_lambda))


@lru_cache(maxsize=256)
def _touch_statement(table_name: str, lrfu_lambda: float) -> str:
    table = sa.table(table_name, sa.column("crf"), sa.column("last_tick"), sa.column("hits"))
    assignments = lrfu.touch_assignments(
        table.c.crf,
        table.c.last_tick,
        table.c.hits,
        sa.literal_column("u.c"),
        sa.literal_column("%(tick)s::bigint"),
        lrfu_lambda,
    )
    # Inside SET, the target's columns must be unqualified; the compiled expressions qualify them
    # with the table name, which PostgreSQL accepts in expressions (not on the left of "=").
    sets = ", ".join(f"{name} = {_compile(expr)}" for name, expr in assignments.items())
    return (
        f"UPDATE {table_name} SET {sets} "
        "FROM unnest(%(ids)b::bigint[], %(counts)b::bigint[]) AS u(id, c) "
        f"WHERE {table_name}.id = u.id"
    )


def touch_statement(spec: CollectionSpec) -> str:
    """Mirror of memstore.lrfu.touch (tested in tests/store/test_semantics.py): one UPDATE for all
    touched rows; parameters ``%(ids)b`` int8[], ``%(counts)b`` int8[] and ``%(tick)s``.

    The SET expressions are memstore.lrfu.touch_assignments compiled for PostgreSQL, with the
    per-row hit count taken from the joined ``u.c`` column. Compiled once per collection (a
    search's touch is on the hot path: compiling cost more than running it).
    """
    return _touch_statement(rows_table(spec), float(spec.lrfu_lambda))
