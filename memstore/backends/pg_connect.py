"""Opening a PostgreSQL database for memstore: URL driver mapping, pgvector, parameter adapters.

Users paste the URL ``psql`` takes (``postgresql://user:pw@host/db`` or the socket form
``postgresql://user:@/db?host=/run/postgresql``). SQLAlchemy would read a bare ``postgresql://`` as
psycopg2, which the ``postgres`` extra does not install; memstore's backend speaks psycopg 3 (binary
COPY, binary parameters), so bare URLs are mapped to ``postgresql+psycopg://``.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from memstore.backends.pg_codec import FLOAT4_OID, INT8_OID, encode_array
from memstore.errors import DatabaseError, DriverError, first_line
from memstore.transactions import is_write_transaction

_PLAIN_DRIVERNAMES = ("postgresql", "postgres")
_PSYCOPG_DRIVERNAME = "postgresql+psycopg"
#: A constant key for the advisory lock that serialises CREATE EXTENSION across processes.
_EXTENSION_LOCK_KEY = 0x6D656D76  # "memv"
#: The advisory lock every memstore write transaction holds (advisory locks are per database).
WRITE_LOCK_KEY = 0x6D656D77  # "memw"


def normalize_url(url: sa.URL | str) -> sa.URL:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://``; other drivers refused."""
    url = sa.make_url(url) if isinstance(url, str) else url
    if url.drivername in _PLAIN_DRIVERNAMES:
        return url.set(drivername=_PSYCOPG_DRIVERNAME)
    if url.drivername == _PSYCOPG_DRIVERNAME:
        return url
    raise DriverError(
        f"memstore's PostgreSQL backend needs the psycopg 3 driver, not {url.drivername!r}: "
        "use a postgresql:// (or postgresql+psycopg://) URL"
    )


class Int8Array:
    """A numpy integer array to send as a binary ``bigint[]`` parameter (use ``%b``)."""

    __slots__ = ("payload",)

    def __init__(self, values: np.ndarray) -> None:
        self.payload = encode_array(np.asarray(values, np.int64), INT8_OID)


class Float4Array:
    """A numpy float array to send, flattened, as a binary ``real[]`` parameter (use ``%b``)."""

    __slots__ = ("payload",)

    def __init__(self, values: np.ndarray) -> None:
        self.payload = encode_array(np.asarray(values, np.float32), FLOAT4_OID)


def _register_adapters(dbapi_connection) -> None:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class Int8ArrayDumper(Dumper):
        format = Format.BINARY
        oid = 1016  # bigint[]

        def dump(self, obj: Int8Array) -> bytes:
            return obj.payload

    class Float4ArrayDumper(Dumper):
        format = Format.BINARY
        oid = 1021  # real[]

        def dump(self, obj: Float4Array) -> bytes:
            return obj.payload

    dbapi_connection.adapters.register_dumper(Int8Array, Int8ArrayDumper)
    dbapi_connection.adapters.register_dumper(Float4Array, Float4ArrayDumper)


def _first_line(exc: BaseException) -> str:
    """The driver's own error (SQLAlchemy wraps it as ``orig``), first line."""
    return first_line(getattr(exc, "orig", None) or exc)


def _describe(conn_or_engine) -> str:
    """The URL as the user wrote it (plain ``postgresql://``), password hidden."""
    url = conn_or_engine.engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=True)


def install_pgvector(conn: Connection) -> None:
    """Create the ``vector`` extension in this transaction if missing, or explain why it cannot.

    Called when memstore first needs it (a memstore database being opened or a collection being
    created), never on a database that is not memstore's.
    """
    where = _describe(conn)
    present = conn.exec_driver_sql(
        "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
    ).scalar()
    if present is not None:
        return
    try:
        with conn.begin_nested():
            # Two processes opening a fresh database at once would both try to create it.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_EXTENSION_LOCK_KEY})")
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")
    except sa.exc.ProgrammingError as exc:
        code = getattr(getattr(exc, "orig", None), "sqlstate", None)
        if code == "42501":  # insufficient_privilege
            raise DatabaseError(
                f"the pgvector extension is not installed in {where} and this role may not "
                "install it; ask an administrator to run: CREATE EXTENSION vector;"
            ) from exc
        raise DatabaseError(
            f"PostgreSQL at {where} cannot provide the pgvector extension "
            f"(is pgvector installed on the server?): {_first_line(exc)}"
        ) from exc
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(
            f"PostgreSQL at {where} cannot provide the pgvector extension: {_first_line(exc)}"
        ) from exc


def check_connection(engine: Engine) -> None:
    """Fail early, with the server named, when the URL does not reach a PostgreSQL server."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {_describe(engine)}: {_first_line(exc)}"
        ) from exc


def create_pg_engine(url: sa.URL | str) -> Engine:
    """An engine on psycopg 3 with memstore's binary array adapters and the write lock."""
    url = normalize_url(url)
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise DriverError(
            "PostgreSQL URLs need the psycopg 3 driver: pip install 'memstore[postgres]'"
        ) from exc
    engine = sa.create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        _register_adapters(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # The store marks write transactions (memstore.transactions; SQLite: BEGIN IMMEDIATE).
        # Their read-compute-write steps (id allocation from next_id, clock, counters) assume no
        # other writer runs in between; under READ COMMITTED that needs a lock. One transaction-
        # scoped advisory lock per database gives SQLite's single-writer semantics: writers queue,
        # readers never wait (MVCC), and the lock is released by COMMIT / ROLLBACK.
        if is_write_transaction(conn):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")

    try:
        check_connection(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
