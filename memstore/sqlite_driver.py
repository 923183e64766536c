"""Choose a SQLite DB-API module that can load sqlite-vec, and prepare each new connection.

Many Python builds (pyenv, macOS system Python, the Python on our machines) ship ``sqlite3``
without ``enable_load_extension``. Like sqlite-utils and Datasette, we then fall back to
``pysqlite3`` (a bundled, modern SQLite). ``MEMSTORE_SQLITE_DRIVER=sqlite3|pysqlite3`` forces one.
"""

from __future__ import annotations

import importlib
import math
import os
from functools import cache
from types import ModuleType

from memstore.errors import DriverError

#: Module names tried in order; the stdlib first so a capable interpreter needs nothing extra.
CANDIDATES = {"sqlite3": "sqlite3", "pysqlite3": "pysqlite3.dbapi2"}

#: Page size of new database files. sqlite-vec stores vectors in chunk blobs (e.g. 1024 x 256 B);
#: 16 KiB pages need 4x fewer overflow pages than SQLite's default 4 KiB, which measured here ~1.3x
#: faster kNN scans and bulk inserts, while an LRFU touch still rewrites only 16 KiB per hit row.
#: It only applies when a file is created (existing files keep theirs).
PAGE_SIZE = 16384

#: Milliseconds a connection waits for another writer's lock before giving up.
BUSY_TIMEOUT_MS = 30_000


def load_sqlite_vec(dbapi_connection) -> None:
    """Load the sqlite-vec extension into one DB-API connection (extension loading is re-disabled)."""
    import sqlite_vec

    dbapi_connection.enable_load_extension(True)
    try:
        sqlite_vec.load(dbapi_connection)
    finally:
        dbapi_connection.enable_load_extension(False)


def _usable(module: ModuleType) -> str | None:
    """None if ``module`` can load sqlite-vec, else the reason it cannot."""
    if not hasattr(module.Connection, "enable_load_extension"):
        return "built without extension loading (no enable_load_extension)"
    try:
        conn = module.connect(":memory:")
        try:
            load_sqlite_vec(conn)
            conn.execute("SELECT vec_version()").fetchone()
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", reported below
        return f"cannot load sqlite-vec ({exc})"
    return None


@cache
def sqlite_module() -> ModuleType:
    """The first DB-API module (stdlib ``sqlite3``, then ``pysqlite3``) that can load sqlite-vec."""
    forced = os.environ.get("MEMSTORE_SQLITE_DRIVER")
    if forced and forced not in CANDIDATES:
        raise DriverError(
            f"MEMSTORE_SQLITE_DRIVER={forced!r} is not one of {', '.join(CANDIDATES)}"
        )
    names = [forced] if forced else list(CANDIDATES)
    reasons = []
    for name in names:
        try:
            module = importlib.import_module(CANDIDATES[name])
        except ImportError as exc:
            reasons.append(f"{name}: not installed ({exc})")
            continue
        reason = _usable(module)
        if reason is None:
            return module
        reasons.append(f"{name}: {reason}")
    raise DriverError(
        "no SQLite driver can load the sqlite-vec extension ("
        + "; ".join(reasons)
        + "). Install one that can: pip install pysqlite3 (or pysqlite3-binary) sqlite-vec"
    )


def _log2(x):
    return math.log2(x) if x is not None and x > 0 else None


def _ln(x):
    return math.log(x) if x is not None and x > 0 else None


def _power(x, y):
    return None if x is None or y is None else math.pow(x, y)


def register_math_fallbacks(dbapi_connection) -> None:
    """Provide ``ln``/``log2``/``power`` where SQLite was built without its math functions."""
    try:
        dbapi_connection.execute("SELECT ln(2.0), log2(2.0), power(2.0, 3.0)").fetchone()
    except Exception:  # noqa: BLE001 - "no such function"
        dbapi_connection.create_function("ln", 1, _ln, deterministic=True)
        dbapi_connection.create_function("log2", 1, _log2, deterministic=True)
        dbapi_connection.create_function("power", 2, _power, deterministic=True)


def prepare_connection(dbapi_connection, *, file_backed: bool) -> None:
    """Per-connection setup: manual transactions, sqlite-vec, busy timeout, math functions.

    ``isolation_level = None`` stops the driver from opening transactions behind our back; the
    engine's ``begin`` hook issues ``BEGIN`` / ``BEGIN IMMEDIATE`` itself (SQLAlchemy's documented
    recipe for SQLite).
    """
    dbapi_connection.isolation_level = None
    load_sqlite_vec(dbapi_connection)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA page_size = {int(PAGE_SIZE)}")  # no-op unless the file is new
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        if file_backed:
            # WAL itself is persistent in the file and is switched on once the file is known to be
            # a memstore database (SqliteBackend.after_open), so foreign files are never modified.
            cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
    register_math_fallbacks(dbapi_connection)
