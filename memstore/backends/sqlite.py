"""SQLite + sqlite-vec storage: a ``rows_<id>`` table and a ``vec0`` index, each key stored once.

Layout per collection (``<id>`` is the catalog's integer id; user names never reach SQL):

* ``rows_<id>(id INTEGER PRIMARY KEY, key BLOB, value BLOB, crf, last_tick, hits, created_tick)``
  holds the exact float32 value and the LRFU state, and the key where there is no index. Two
  copies are never stored (the empty blob ``x''`` marks where one is left out):

  - an *indexed* collection's key lives only in ``vec_<id>``, which holds exactly the float32 key
    (``ip`` appends one coordinate, the bit index pads with zeros: the key is its first key_dim
    floats). Storing it in both tables doubled the file (twice raw sqlite-vec's for small values)
    and cost 0.36-0.40x raw ``executemany`` at d=384. A kNN candidate's key is read from the
    index by id (a point lookup), a full export or index rebuild scans the index once;
  - a value bit for bit equal to its row's key (values default to the keys: ``insert(keys)``) is
    stored once, as the key. A key-only ``update`` of such a row first writes its old key out as
    its value.

  Rows written before this (key and value both in the row table) read as they are: every reader
  takes the row table's blob where it is not empty, and an update of a key moves it to the index.
* ``vec_<id>`` is a sqlite-vec ``vec0`` table, the kNN index; prune and ``ip`` norm growth
  rebuild it (from the keys it holds, read before it is dropped, inside one transaction).
  ``index="none"`` collections have no ``vec_<id>``: their searches scan the row table exactly
  in numpy (:meth:`SqliteBackend._scan_knn`). For memories searched elsewhere (a product-key
  layer searches in torch), whose bulk flushes would otherwise pay for an index nobody queries.
* ``touches_<id>`` logs LRFU hits, folded into ``rows_<id>`` lazily (see :mod:`sqlite_lrfu`).

Inner product: sqlite-vec has no ip metric, so ``ip`` collections index keys augmented to
``[k, sqrt(M^2 - |k|^2)]`` under L2 and queries as ``[q, 0]`` (Bachrach et al., 2014):
``|q'-k'|^2 = |q|^2 + M^2 - 2 q.k`` is monotone in ``-q.k``. M (kept in the catalog's
``index_state``) is raised to 1.25x the largest norm, and the index rebuilt, when a longer key
arrives. Every returned distance is recomputed exactly from the stored keys, and the exact index
certifies its candidate set against a float32 rounding bound (fetching more until it is certain),
so results equal brute force up to ties. The bit quantiser needs a multiple of 8
dimensions, so indexed vectors are zero-padded (zeros change no distance).

Bulk inserts bind the whole batch as one blob (a zero-copy ``memoryview`` of the numpy array) and
split it in SQL with ``substr`` over a recursive counter, so no per-row Python work is done
(benchmarks/store.py measures it against raw sqlite-vec ``executemany``; binding a tuple per row
reached 0.57-0.7x); statements are cut at BULK_ROWS rows or BULK_BYTES bytes. Rows with
differing LRFU state (a layer's flush) bind one tuple per row, and an upsert of existing rows is
one ``UPDATE`` per row for all columns (benchmarks/bulk_rows.py measures both against raw SQLite).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import suppress
from urllib.parse import quote

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool, StaticPool

from memstore import distances
from memstore.backends import sqlite_lrfu
from memstore.backends.base import VectorBackend
from memstore.errors import CorruptDataError, DatabaseError, InvalidInputError
from memstore.naming import rows_table as _rows
from memstore.naming import vec_table as _vec
from memstore.sqlite_driver import prepare_connection, sqlite_module
from memstore.transactions import is_write_transaction, mark_write_transaction
from memstore.types import SQLITE_INDEX_KINDS, CollectionSpec, RowBlock, SearchResult

#: Rows per bulk statement, and bytes of blobs (a bound batch stays far below SQLite's 1 GB
#: limit at any width: 65,536 rows of 8,192 floats would be 2 GiB).
BULK_ROWS = 65_536
BULK_BYTES = 1 << 28
#: Distances computed at once by an ``index="none"`` scan (float64 elements: 128 MiB).
SCAN_ELEMENTS = 1 << 24
#: Bytes of vectors per vec0 chunk (see _chunk_size): 1024 vectors at d=64, 168 at d=384.
CHUNK_BYTES = 1 << 18
#: sqlite-vec's largest vector column (its own limit, checked here before any SQL runs).
VEC0_MAX_DIM = 8192
#: sqlite-vec refuses kNN queries with k above this; larger k falls back to an exact scan.
MAX_KNN_K = 4096
#: Norm-bound headroom for ``ip``: fewer index rebuilds as keys grow, little precision lost.
IP_HEADROOM = 1.25
FLOAT32_MAX = float(np.finfo(np.float32).max)

_COUNTER = "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < ?{n} - 1) "


def _index_dim(spec: CollectionSpec) -> int:
    dim = spec.key_dim + (1 if spec.metric == "ip" else 0)
    if spec.index == "rescore-bit":
        dim = -(-dim // 8) * 8
    return dim


def _chunk_size(spec: CollectionSpec) -> int:
    """Vectors per vec0 chunk: about CHUNK_BYTES of them (a multiple of 8, 8 to 1024).

    sqlite-vec keeps a chunk's vectors in one blob spread over overflow pages, and reading one
    vector by id walks that page chain: at its default 1024 vectors of d=384 (1.5 MB), 16 lookups
    (one query's candidate keys, which live only in the index) took 23 ms; at 256 a chunk, 1 ms,
    with kNN scans and inserts as fast (measured on 20k rows). So chunks are sized by bytes.
    """
    fit = CHUNK_BYTES // (_index_dim(spec) * 4)
    return int(max(8, min(1024, fit // 8 * 8)))


def _decode(blobs: list[bytes], dim: int) -> np.ndarray:
    """float32 rows from their blobs: one copy (a ``bytearray`` is writable, so numpy can use it
    as it is). Blobs of another length than ``dim`` float32 (a damaged or tampered file) are
    :class:`CorruptDataError`, not numpy's reshape error."""
    if not blobs:
        return np.empty((0, dim), np.float32)
    try:
        joined = bytearray().join(blobs)
    except TypeError:  # a NULL blob
        joined = None
    if joined is None or len(joined) != 4 * dim * len(blobs):
        lengths = sorted({-1 if b is None else len(b) for b in blobs} - {4 * dim})
        shown = ", ".join("NULL" if n < 0 else f"{n} bytes" for n in lengths[:5])
        raise CorruptDataError(
            f"the database is damaged: stored vectors of {shown} where {dim} float32 "
            f"({4 * dim} bytes) belong"
        )
    return np.frombuffer(joined, dtype=np.float32).reshape(len(blobs), dim)


def exact_distances(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Distances (m, c) between each query (m, d) and its candidate keys (m, c, d), in float64:
    :func:`memstore.distances.distances` itself (the reference), so rescored results follow it."""
    return distances.distances(metric, np.asarray(queries)[:, None, :], keys)


#: SQLite result codes (the low byte of ``sqlite_errorcode``) that mean "could not write to disk".
SQLITE_IOERR, SQLITE_FULL = 10, 13
#: Free bytes below which an I/O error on the database's file system is reported as a full disk.
NEARLY_FULL_BYTES = 1 << 20


def read_only_uri(path: str) -> str:
    """A ``file:`` URI that opens ``path`` for reading without writing anything next to it.

    A WAL database normally needs its ``-wal`` and ``-shm`` files, which SQLite creates beside it;
    in a directory we may not write to that fails ("attempt to write a readonly database"). Where
    the directory is writable, or both files already exist (a writer is using the database),
    ``mode=ro`` reads correctly. Where neither, and there is no un-checkpointed ``-wal`` content,
    the file is all there is, so ``immutable=1`` reads it with no side files at all. The remaining
    case (a non-empty ``-wal`` without its ``-shm``) cannot be read correctly without writing: a
    clear error instead of a wrong answer.
    """
    absolute = os.path.abspath(path)
    uri = f"file:{quote(absolute)}?mode=ro"
    directory = os.path.dirname(absolute)
    if os.access(directory, os.W_OK):
        return uri
    wal, shm = os.path.exists(absolute + "-wal"), os.path.exists(absolute + "-shm")
    if wal and shm:
        return uri
    if wal and os.path.getsize(absolute + "-wal") > 0:
        raise DatabaseError(
            f"cannot read {absolute} read-only: its directory is not writable and it has a "
            f"non-empty -wal file but no -shm file; open it once with write access to "
            "checkpoint it (for example `memstore init` on it)"
        )
    return uri + "&immutable=1"


class SqliteBackend(VectorBackend):
    """sqlite-vec backed storage (see the module docstring for the layout)."""

    dialect = "sqlite"

    # ------------------------------------------------------------------ engine
    @classmethod
    def create_engine(cls, url: sa.URL, *, read_only: bool = False) -> Engine:
        """Threads: an in-memory database exists only inside its one connection, so every thread
        shares it (``StaticPool``; the Store serialises transactions on it). A file gets one
        connection per concurrently working thread (``QueuePool`` with unbounded overflow, so a
        busy thread never waits on the pool, only on SQLite's own locks); writers then queue on
        ``BEGIN IMMEDIATE`` and the busy timeout exactly as separate processes do."""
        module = sqlite_module()
        database = url.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        kwargs: dict = {"module": module}
        if in_memory:
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            kwargs.update(poolclass=QueuePool, pool_size=5, max_overflow=-1)
            if read_only:
                uri = read_only_uri(database)
                kwargs["creator"] = lambda: module.connect(uri, uri=True, check_same_thread=False)
        engine = sa.create_engine(url, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            prepare_connection(dbapi_connection, file_backed=not in_memory)

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if is_write_transaction(conn) else "BEGIN")

        return engine

    def disk_full(self, error: BaseException) -> bool:
        """SQLITE_FULL (a full disk or ``PRAGMA max_page_count``), or an I/O error while the file
        system holding the database has (almost) no space left (SQLite reports a failed ``-shm``
        or ``-wal`` extension as a plain "disk I/O error")."""
        code = getattr(error, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary == SQLITE_FULL or "database or disk is full" in str(error):
            return True
        if primary != SQLITE_IOERR and "disk I/O error" not in str(error):
            return False
        path = self.engine.url.database or ""
        if path in ("", ":memory:") or path.startswith("file:"):
            return False
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError:
            return False
        return free < NEARLY_FULL_BYTES

    def after_open(self) -> None:
        """WAL (persistent in the file) lets readers such as ``memstore inspect`` run while a
        trainer writes; set here, once the file is known to be a memstore database."""
        database = self.engine.url.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            return
        raw = self.engine.raw_connection()  # outside any transaction: WAL cannot be set inside one
        try:
            mode = raw.driver_connection.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raw.driver_connection.execute("PRAGMA journal_mode = WAL")
        finally:
            raw.close()

    # ------------------------------------------------------------- lifecycle
    def create_storage(self, conn: Connection, spec: CollectionSpec) -> None:
        if spec.index not in SQLITE_INDEX_KINDS:
            raise InvalidInputError(
                f"index {spec.index!r} is a PostgreSQL (pgvector) index: on SQLite use one of "
                f"{', '.join(SQLITE_INDEX_KINDS)}"
            )
        if _indexed(spec) and _index_dim(spec) > VEC0_MAX_DIM:
            ip = spec.metric == "ip"
            raise InvalidInputError(
                f"key_dim must be at most {VEC0_MAX_DIM - ip} for an indexed SQLite "
                f"{spec.metric} collection, got {spec.key_dim}: sqlite-vec indexes at most "
                f"{VEC0_MAX_DIM} dimensions{' (ip adds one)' if ip else ''}; "
                'index="none" has no such limit',
                parameter="key_dim",
            )
        conn.exec_driver_sql(
            f"CREATE TABLE {_rows(spec)} ("
            "id INTEGER PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL, "
            "crf REAL NOT NULL, last_tick INTEGER NOT NULL, hits INTEGER NOT NULL, "
            "created_tick INTEGER NOT NULL)"
        )
        conn.exec_driver_sql(sqlite_lrfu.create_sql(spec))
        self._create_index(conn, spec)

    def _create_index(self, conn: Connection, spec: CollectionSpec) -> None:
        if not _indexed(spec):
            return
        metric = "cosine" if spec.metric == "cosine" else "l2"
        column = f"key float[{_index_dim(spec)}] distance_metric={metric}"
        if spec.index != "exact":
            quantizer = "bit" if spec.index == "rescore-bit" else "int8"
            column += (
                f" indexed by rescore(quantizer={quantizer}, oversample={int(spec.oversample)})"
            )
        conn.exec_driver_sql(
            f"CREATE VIRTUAL TABLE {_vec(spec)} USING vec0(id integer primary key, {column}, "
            f"chunk_size={_chunk_size(spec)})"
        )

    def drop_storage(self, conn: Connection, spec: CollectionSpec) -> None:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_vec(spec)}")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {sqlite_lrfu.log_table(spec)}")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_rows(spec)}")

    def fold_touches(self, conn: Connection, spec: CollectionSpec) -> None:
        """Apply pending LRFU hits to ``rows_<id>`` and empty the log (see sqlite_lrfu)."""
        log = sqlite_lrfu.log_table(spec)
        if conn.exec_driver_sql(f"SELECT 1 FROM {log} LIMIT 1").first() is None:
            return
        conn.exec_driver_sql(
            sqlite_lrfu.fold_sql(spec, _rows(spec)), {"lam": float(spec.lrfu_lambda)}
        )
        conn.exec_driver_sql(f"DELETE FROM {log}")

    # ------------------------------------------------------ inner-product bound
    def _norm_bound(self, conn: Connection, spec: CollectionSpec) -> float:
        from memstore import catalog

        state = catalog.read_index_state(conn, spec.id)
        return float(state.get("ip_norm_bound", 0.0))

    def _ensure_norm_bound(self, conn: Connection, spec: CollectionSpec, keys: np.ndarray) -> float:
        """Raise M if ``keys`` are longer than it (rebuilding the index); return the M to use."""
        from memstore import catalog

        bound = self._norm_bound(conn, spec)
        if not _indexed(spec):  # no index, no augmented coordinate to bound
            return bound
        longest = float(np.sqrt((keys.astype(np.float64) ** 2).sum(1).max())) if len(keys) else 0.0
        if longest <= bound:
            return bound
        bound = max(longest * IP_HEADROOM, 1e-30)
        if bound > FLOAT32_MAX:  # the augmented coordinate sqrt(M^2 - |k|^2) must be a float32
            raise InvalidInputError(
                f"keys of norm {longest:.3g} are too long for an ip collection: its index needs "
                f"norms below {FLOAT32_MAX / IP_HEADROOM:.3g} (float32's range / {IP_HEADROOM})"
            )
        catalog.write_index_state(conn, spec.id, {"ip_norm_bound": bound})
        self._rebuild_index(conn, spec, bound)
        return bound

    def _index_vectors(self, spec: CollectionSpec, keys: np.ndarray, bound: float) -> np.ndarray:
        dim = _index_dim(spec)
        if dim == spec.key_dim:
            return keys
        out = np.zeros((len(keys), dim), np.float32)
        out[:, : spec.key_dim] = keys
        if spec.metric == "ip":
            sq = (keys.astype(np.float64) ** 2).sum(1)
            out[:, spec.key_dim] = np.sqrt(np.clip(bound * bound - sq, 0.0, None))
        return out

    def _query_vectors(self, spec: CollectionSpec, queries: np.ndarray) -> np.ndarray:
        dim = _index_dim(spec)
        if dim == spec.key_dim:
            return queries
        out = np.zeros((len(queries), dim), np.float32)
        out[:, : spec.key_dim] = queries
        return out

    def _rebuild_index(
        self, conn: Connection, spec: CollectionSpec, bound: float | None = None
    ) -> None:
        """Drop and recreate ``vec_<id>`` from ``rows_<id>`` inside the caller's transaction."""
        if not _indexed(spec):
            return
        if bound is None and spec.metric == "ip":
            bound = self._norm_bound(conn, spec)
        # The keys first: the index being dropped holds them (the row table holds none).
        result = _fetch_all(conn, f"SELECT id, key FROM {_rows(spec)} ORDER BY id", {})
        ids = np.fromiter((r[0] for r in result), np.int64, len(result))
        keys = self._keys_of(conn, spec, ids, [r[1] for r in result], every_row=True)
        del result
        conn.exec_driver_sql(f"DROP TABLE {_vec(spec)}")
        self._create_index(conn, spec)
        if not len(ids):
            return
        self._insert_index(conn, spec, ids, keys, bound or 0.0)

    # ------------------------------------------------------------------ rows
    def _insert_index(
        self,
        conn: Connection,
        spec: CollectionSpec,
        ids: np.ndarray,
        keys: np.ndarray,
        bound: float,
    ) -> None:
        if not _indexed(spec):
            return
        vectors = self._index_vectors(spec, keys, bound)
        width = vectors.shape[1] * 4
        for start, stop, consecutive in _runs(ids, width):
            if consecutive:
                conn.exec_driver_sql(
                    f"INSERT INTO {_vec(spec)}(id, key) "
                    + _COUNTER.format(n=4)
                    + "SELECT ?1 + i, substr(?2, i * ?3 + 1, ?3) FROM s",
                    (int(ids[start]), _blob(vectors[start:stop]), width, stop - start),
                )
            else:
                conn.exec_driver_sql(
                    f"INSERT INTO {_vec(spec)}(id, key) VALUES (?, ?)",
                    list(
                        zip(ids[start:stop].tolist(), _row_blobs(vectors[start:stop]), strict=True)
                    ),
                )

    def insert_rows(self, conn: Connection, spec: CollectionSpec, rows: RowBlock) -> None:
        """The rows (one ``INSERT ... SELECT`` over a bound blob per consecutive, uniform batch:
        no per-row Python work), then their index entries. An indexed collection's row table
        holds no key (the key lives in ``vec_<id>``), and a value equal to its key is not stored
        twice (see the module docstring): both are the empty blob ``x''``."""
        if len(rows) == 0:
            return
        bound = self._ensure_norm_bound(conn, spec, rows.keys) if spec.metric == "ip" else 0.0
        kw, vw = spec.key_dim * 4, spec.value_dim * 4
        keys_here = not _indexed(spec)
        same = _value_is_key(spec, rows.keys, rows.values)  # per row
        uniform = (
            np.all(rows.crf == rows.crf[0])
            and np.all(rows.last_tick == rows.last_tick[0])
            and np.all(rows.hits == rows.hits[0])
            and np.all(rows.created_tick == rows.created_tick[0])
        )
        columns = f"INSERT INTO {_rows(spec)}(id, key, value, crf, last_tick, hits, created_tick) "
        for start, stop, consecutive in _runs(rows.ids, kw * keys_here + vw):
            sl = slice(start, stop)
            all_same, none_same = bool(same[sl].all()), not same[sl].any()
            if consecutive and uniform and (all_same or none_same):
                key_sql = "substr(?2, i * ?3 + 1, ?3)" if keys_here else "x''"
                value_sql = "x''" if all_same else "substr(?4, i * ?5 + 1, ?5)"
                conn.exec_driver_sql(
                    columns
                    + _COUNTER.format(n=6)
                    + f"SELECT ?1 + i, {key_sql}, {value_sql}, ?7, ?8, ?9, ?10 FROM s",
                    (
                        int(rows.ids[start]),
                        _blob(rows.keys[sl]) if keys_here else b"",
                        kw,
                        b"" if all_same else _blob(rows.values[sl]),
                        vw,
                        stop - start,
                        float(rows.crf[0]),
                        int(rows.last_tick[0]),
                        int(rows.hits[0]),
                        int(rows.created_tick[0]),
                    ),
                )
            else:
                conn.exec_driver_sql(
                    columns + "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    list(
                        zip(
                            rows.ids[sl].tolist(),
                            _row_blobs(rows.keys[sl]) if keys_here else [b""] * (stop - start),
                            _row_blobs(rows.values[sl], same[sl]),
                            rows.crf[sl].tolist(),
                            rows.last_tick[sl].tolist(),
                            rows.hits[sl].tolist(),
                            rows.created_tick[sl].tolist(),
                            strict=True,
                        )
                    ),
                )
        self._insert_index(conn, spec, rows.ids, rows.keys, bound)

    def upsert_rows(self, conn: Connection, spec: CollectionSpec, rows: RowBlock) -> None:
        """Existing ids are updated in place (one ``UPDATE`` of every column per row, then the
        vec0 slot), new ids inserted: memstore_torch flushes mostly rewrite rows that exist."""
        if len(rows) == 0:
            return
        self.fold_touches(conn, spec)  # replaced rows take the given LRFU state, not pending hits
        exists = np.isin(rows.ids, self._existing(conn, spec, rows.ids))
        if exists.any():
            old = rows if exists.all() else rows.take(exists)
            if spec.metric == "ip":  # before any key changes: a rebuild reads the stored keys
                self._ensure_norm_bound(conn, spec, old.keys)
            conn.exec_driver_sql(
                f"UPDATE {_rows(spec)} SET key = ?, value = ?, crf = ?, last_tick = ?, hits = ?, "
                "created_tick = ? WHERE id = ?",
                list(
                    zip(
                        [b""] * len(old) if _indexed(spec) else _row_blobs(old.keys),
                        _row_blobs(old.values, _value_is_key(spec, old.keys, old.values)),
                        old.crf.tolist(),
                        old.last_tick.tolist(),
                        old.hits.tolist(),
                        old.created_tick.tolist(),
                        old.ids.tolist(),
                        strict=True,
                    )
                ),
            )
            self._update_index(conn, spec, old.ids, old.keys)
        if not exists.all():
            self.insert_rows(conn, spec, rows if not exists.any() else rows.take(~exists))

    def update_rows(
        self,
        conn: Connection,
        spec: CollectionSpec,
        ids: np.ndarray,
        keys: np.ndarray | None,
        values: np.ndarray | None,
    ) -> None:
        id_list = ids.tolist()
        if keys is not None:
            if spec.metric == "ip":  # before any key changes: a rebuild reads the stored keys
                self._ensure_norm_bound(conn, spec, keys)
            if values is None:  # a value stored as "the key" keeps the old key as its value
                conn.exec_driver_sql(
                    f"UPDATE {_rows(spec)} AS r SET value = {_key_sql(spec)} "
                    "WHERE r.id = ? AND length(r.value) = 0",
                    [(i,) for i in id_list],
                )
            # An indexed row's key lives in its index (x'' here, also for rows written before).
            key_blobs = [b""] * len(id_list) if _indexed(spec) else _row_blobs(keys)
            conn.exec_driver_sql(
                f"UPDATE {_rows(spec)} SET key = ? WHERE id = ?",
                list(zip(key_blobs, id_list, strict=True)),
            )
        if values is not None:
            same = (
                np.zeros(len(values), bool) if keys is None else _value_is_key(spec, keys, values)
            )
            conn.exec_driver_sql(
                f"UPDATE {_rows(spec)} SET value = ? WHERE id = ?",
                list(zip(_row_blobs(values, same), id_list, strict=True)),
            )
        if keys is not None:
            self._update_index(conn, spec, ids, keys)

    def _update_index(
        self, conn: Connection, spec: CollectionSpec, ids: np.ndarray, keys: np.ndarray
    ) -> None:
        """Bring the vec0 slots of ``ids`` to ``keys`` (the only copy of an indexed collection's
        keys). For ``ip`` the caller has already raised the norm bound for ``keys``."""
        if not _indexed(spec):
            return
        bound = self._norm_bound(conn, spec) if spec.metric == "ip" else 0.0
        vectors = self._index_vectors(spec, keys, bound)
        conn.exec_driver_sql(
            f"UPDATE {_vec(spec)} SET key = ? WHERE id = ?",
            list(zip(_row_blobs(vectors), ids.tolist(), strict=True)),
        )

    def delete_rows(self, conn: Connection, spec: CollectionSpec, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        self.fold_touches(conn, spec)  # no pending hit may outlive its row
        present = self._existing(conn, spec, ids)
        if len(present) == 0:
            return 0
        params = [(i,) for i in present.tolist()]
        conn.exec_driver_sql(f"DELETE FROM {_rows(spec)} WHERE id = ?", params)
        if _indexed(spec):
            conn.exec_driver_sql(f"DELETE FROM {_vec(spec)} WHERE id = ?", params)
        return int(len(present))

    def _existing(self, conn: Connection, spec: CollectionSpec, ids: np.ndarray) -> np.ndarray:
        result = _fetch_all(
            conn,
            f"SELECT id FROM {_rows(spec)} WHERE id IN (SELECT value FROM json_each(:ids)) "
            "ORDER BY id",
            {"ids": json.dumps(np.unique(ids).tolist())},
        )
        return np.fromiter((r[0] for r in result), np.int64, len(result))

    def _keys_of(
        self, conn: Connection, spec: CollectionSpec, ids: np.ndarray, blobs: list, *, every_row
    ) -> np.ndarray:
        """The keys of rows ``ids`` (ascending) from their row-table key blobs: each is the key,
        or ``x''`` where the key lives only in ``vec_<id>`` (indexed collections); those are read
        from the index, by a scan of it when ``every_row`` (cheaper than a lookup per row)."""
        if not ids.size or all(blobs):
            return _decode(blobs, spec.key_dim)
        elsewhere = np.fromiter(map(len, blobs), np.int64, len(blobs)) == 0
        wanted = ids[elsewhere]
        if every_row:
            found = _fetch_all(conn, f"SELECT id, key FROM {_vec(spec)}", {})
        else:  # a point lookup per id (5x faster than vec0's own "id IN (...)", measured)
            found = _fetch_all(
                conn,
                f"SELECT j.value, (SELECT v.key FROM {_vec(spec)} AS v WHERE v.id = j.value) "
                "FROM json_each(:ids) AS j",
                {"ids": json.dumps(wanted.tolist())},
            )
            found = [r for r in found if r[1] is not None]
        index_ids = np.fromiter((r[0] for r in found), np.int64, len(found))
        present = np.isin(wanted, index_ids)
        if not present.all():
            raise CorruptDataError(
                f"collection {spec.name!r} is damaged: rows without a key in its index "
                f"(first id {int(wanted[~present][0])})"
            )
        order = np.argsort(index_ids)
        at = order[np.searchsorted(index_ids, wanted, sorter=order)]
        kw = spec.key_dim * 4
        out = np.empty((len(ids), spec.key_dim), np.float32)
        if (~elsewhere).any():
            out[~elsewhere] = _decode([b for b in blobs if b], spec.key_dim)
        out[elsewhere] = _decode([found[j][1][:kw] for j in at.tolist()], spec.key_dim)
        return out

    def fetch_rows(
        self, conn: Connection, spec: CollectionSpec, ids: np.ndarray | None = None
    ) -> RowBlock:
        select = (
            sqlite_lrfu.pending_cte(spec)
            + "SELECT r.id, r.key, r.value, "
            + f"{sqlite_lrfu.EFFECTIVE_CRF}, {sqlite_lrfu.EFFECTIVE_LAST_TICK}, "
            + f"{sqlite_lrfu.EFFECTIVE_HITS}, r.created_tick "
            + f"FROM {sqlite_lrfu.effective_rows(spec, _rows(spec))} "
        )
        params: dict = {"lam": float(spec.lrfu_lambda)}
        if ids is None:
            select += "ORDER BY r.id"
        else:
            params["ids"] = json.dumps(np.unique(ids).tolist())
            select += "WHERE r.id IN (SELECT value FROM json_each(:ids)) ORDER BY r.id"
        result = _fetch_all(conn, select, params)
        n = len(result)
        row_ids = np.fromiter((r[0] for r in result), np.int64, n)
        keys = self._keys_of(conn, spec, row_ids, [r[1] for r in result], every_row=ids is None)
        return RowBlock(
            ids=row_ids,
            keys=keys,
            values=_values_of(spec, [r[2] for r in result], keys),
            crf=np.fromiter((r[3] for r in result), np.float64, n),
            last_tick=np.fromiter((r[4] for r in result), np.int64, n),
            hits=np.fromiter((r[5] for r in result), np.int64, n),
            created_tick=np.fromiter((r[6] for r in result), np.int64, n),
        )

    def count_rows(self, conn: Connection, spec: CollectionSpec) -> int:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {_rows(spec)}").scalar_one())

    def max_id(self, conn: Connection, spec: CollectionSpec) -> int | None:
        value = conn.exec_driver_sql(f"SELECT max(id) FROM {_rows(spec)}").scalar_one()
        return None if value is None else int(value)

    def index_ids(self, conn: Connection, spec: CollectionSpec) -> np.ndarray:
        """Ids the kNN search can return: the vec0 table's, or every row's for ``none`` (the
        scan reads the row table itself)."""
        table = _vec(spec) if _indexed(spec) else _rows(spec)
        result = conn.exec_driver_sql(f"SELECT id FROM {table}").fetchall()
        return np.sort(np.fromiter((r[0] for r in result), np.int64, len(result)))

    # ---------------------------------------------------------------- search
    def knn(
        self, conn: Connection, spec: CollectionSpec, queries: np.ndarray, k: int
    ) -> SearchResult:
        if not _indexed(spec):
            return self._scan_knn(conn, spec, queries, k)
        out = SearchResult.padded(len(queries), k, spec.key_dim, spec.value_dim)
        sql = (
            f"WITH knn AS (SELECT id, distance FROM {_vec(spec)} WHERE key MATCH ?1 AND k = ?2) "
            "SELECT knn.id, knn.distance, CASE WHEN length(r.key) = 0 THEN "
            f"(SELECT v.key FROM {_vec(spec)} AS v WHERE v.id = knn.id) ELSE r.key END, r.value "
            f"FROM knn JOIN {_rows(spec)} AS r ON r.id = knn.id ORDER BY knn.distance"
        )
        vectors = self._query_vectors(spec, queries)
        bound = self._norm_bound(conn, spec) if spec.metric == "ip" else 0.0
        everything: list | None = None  # all rows, loaded only if some query needs a scan
        cursor = conn.connection.driver_connection.cursor()
        try:
            for row, vector in enumerate(vectors):
                query = queries[row : row + 1]
                # ip: a few extra candidates, since rounding in the augmented L2 can reorder them
                fetch = k + max(4, k // 4) if spec.metric == "ip" else k
                while fetch <= MAX_KNN_K:
                    found = cursor.execute(sql, (vector.tobytes(), fetch)).fetchall()
                    if self._complete(spec, query, found, fetch, k, bound):
                        break
                    fetch *= 4
                if fetch > MAX_KNN_K:  # sqlite-vec's k limit (or ip not certifiable): exact scan
                    if everything is None:
                        everything = conn.exec_driver_sql(
                            "SELECT r.id, 0.0, CASE WHEN length(r.key) = 0 THEN v.key "
                            f"ELSE r.key END, r.value FROM {_rows(spec)} AS r "
                            f"LEFT JOIN {_vec(spec)} AS v ON v.id = r.id"
                        ).fetchall()
                    found = everything
                self._fill(out, row, spec, query, found, k)
        finally:
            cursor.close()
        return out

    def _scan_knn(
        self, conn: Connection, spec: CollectionSpec, queries: np.ndarray, k: int
    ) -> SearchResult:
        """Exact kNN of an ``index="none"`` collection: every key read once from the row table,
        distances by :func:`memstore.distances.pairwise_distances` (the reference itself) for a
        block of queries at a time, the k nearest by distance then lower id, and only their
        values read back."""
        out = SearchResult.padded(len(queries), k, spec.key_dim, spec.value_dim)
        result = _fetch_all(conn, f"SELECT id, key FROM {_rows(spec)} ORDER BY id", {})
        if not result:
            return out
        ids = np.fromiter((r[0] for r in result), np.int64, len(result))
        keys = _decode([r[1] for r in result], spec.key_dim)
        del result
        take = min(k, len(ids))
        block = max(1, SCAN_ELEMENTS // len(ids))
        for start in range(0, len(queries), block):
            dist = distances.pairwise_distances(
                spec.metric, queries[start : start + block], keys
            )  # (b, n), rows ordered by id
            for row, d in enumerate(dist, start):
                if take < len(ids):
                    kth = np.partition(d, take - 1)[take - 1]
                    near = np.flatnonzero(d < kth)
                    ties = np.flatnonzero(d == kth)[: take - len(near)]
                    chosen = np.concatenate([near, ties])
                else:
                    chosen = np.arange(len(ids))
                chosen = chosen[np.lexsort((ids[chosen], d[chosen]))]
                out.ids[row, :take] = ids[chosen]
                with np.errstate(over="ignore"):  # cannot overflow: inputs are bounded (MAX_NORM)
                    out.distances[row, :take] = d[chosen]
                out.keys[row, :take] = keys[chosen]
        hit = np.unique(out.ids[out.ids >= 0])
        if len(hit):
            found = _fetch_all(
                conn,
                "SELECT id, CASE WHEN length(value) = 0 THEN key ELSE value END "
                f"FROM {_rows(spec)} WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id",
                {"ids": json.dumps(hit.tolist())},
            )
            values = _decode([r[1] for r in found], spec.value_dim)
            where = out.ids >= 0
            out.values[where] = values[np.searchsorted(hit, out.ids[where])]
        return out

    def _complete(self, spec, query, found, fetch, k, bound) -> bool:
        """Whether the ``fetch`` candidates surely contain the exact top k.

        Always true for l2/cosine (up to float32 ties) and for approximate indexes (they are
        approximate by choice). For exact ``ip`` the augmented L2 distance d has a float32 error of
        at most ``delta`` in d^2; every row not fetched has ``d^2 >= d_last^2 - delta``, hence
        ``-(q.k) >= (d_last^2 - delta - |q|^2 - M^2) / 2``. If the k-th exact candidate beats that
        bound the answer is certified; otherwise the caller fetches 4x more.
        """
        if len(found) < fetch or spec.metric != "ip" or spec.index != "exact":
            return True
        keys = _found_keys(spec, found)
        exact = np.sort(exact_distances("ip", query, keys[None])[0])
        q2 = float((query.astype(np.float64) ** 2).sum())
        dim = _index_dim(spec)
        delta = 8.0 * dim * np.finfo(np.float32).eps * (np.sqrt(q2) + bound) ** 2
        last = float(found[-1][1]) ** 2
        floor = (last - delta - q2 - bound * bound) / 2.0
        return bool(exact[min(k, len(exact)) - 1] <= floor)

    @staticmethod
    def _fill(out: SearchResult, row: int, spec, query, found, k: int) -> None:
        if not found:
            return
        ids = np.fromiter((r[0] for r in found), np.int64, len(found))
        keys = _found_keys(spec, found)
        dist = exact_distances(spec.metric, query, keys[None])[0]
        order = np.argsort(dist, kind="stable")[:k]
        c = len(order)
        out.ids[row, :c] = ids[order]
        with np.errstate(over="ignore"):  # cannot overflow: inputs are bounded (MAX_NORM)
            out.distances[row, :c] = dist[order]
        out.keys[row, :c] = keys[order]
        out.values[row, :c] = _values_of(spec, [found[j][3] for j in order], keys[order])

    # ------------------------------------------------------------------ LRFU
    def touch(
        self,
        conn: Connection,
        spec: CollectionSpec,
        ids: np.ndarray,
        counts: np.ndarray,
        tick: int,
    ) -> None:
        """Append the hits to the LRFU log (one or two pages); fold when the log is long."""
        if len(ids) == 0:
            return
        log = sqlite_lrfu.log_table(spec)
        conn.exec_driver_sql(
            f"INSERT INTO {log}(id, tick, count) VALUES (?, ?, ?)",
            [(i, int(tick), c) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)],
        )
        pending = conn.exec_driver_sql(f"SELECT max(rowid) FROM {log}").scalar()
        if pending is not None and pending >= sqlite_lrfu.FOLD_AT:
            self.fold_touches(conn, spec)

    def lowest_scored(
        self,
        conn: Connection,
        spec: CollectionSpec,
        now: int,
        *,
        limit: int | None = None,
        below: float | None = None,
    ) -> np.ndarray:
        key = sqlite_lrfu.order_key()
        sql = (
            sqlite_lrfu.pending_cte(spec)
            + f"SELECT r.id FROM {sqlite_lrfu.effective_rows(spec, _rows(spec))} "
            + (f"WHERE {key} < :below " if below is not None else "")
            + f"ORDER BY {key} ASC, {sqlite_lrfu.EFFECTIVE_LAST_TICK} ASC, r.id ASC"
            + (" LIMIT :limit" if limit is not None else "")
        )
        params = {"lam": float(spec.lrfu_lambda), "now": int(now)}
        if below is not None:
            params["below"] = float(below)
        if limit is not None:
            params["limit"] = int(limit)
        result = conn.exec_driver_sql(sql, params).fetchall()
        return np.fromiter((r[0] for r in result), np.int64, len(result))

    def score_summary(self, conn: Connection, spec: CollectionSpec, now: int) -> dict:
        key = sqlite_lrfu.order_key()
        low, mean, high = conn.exec_driver_sql(
            sqlite_lrfu.pending_cte(spec)
            + f"SELECT min({key}), avg({key}), max({key}) "
            + f"FROM {sqlite_lrfu.effective_rows(spec, _rows(spec))}",
            {"lam": float(spec.lrfu_lambda), "now": int(now)},
        ).one()
        return {
            "min": None if low is None else float(low),
            "mean": None if mean is None else float(mean),
            "max": None if high is None else float(high),
        }

    # ----------------------------------------------------------- maintenance
    def compact(self, spec: CollectionSpec) -> None:
        """Rebuild the vec0 index from the rows (one transaction), then VACUUM and truncate the WAL.

        sqlite-vec keeps partly emptied chunks after deletes, so VACUUM alone frees little. The
        rebuild is atomic (DDL is transactional in SQLite); an interrupted VACUUM changes nothing.
        """
        with self.engine.connect() as conn:
            mark_write_transaction(conn)
            with conn.begin():
                self.fold_touches(conn, spec)
                self._rebuild_index(conn, spec)
        self.vacuum()

    def vacuum(self) -> None:
        raw = self.engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")
            with suppress(Exception):  # in-memory databases have no WAL
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()

    def size_bytes(self) -> int | None:
        path = self.engine.url.database
        if not path or path == ":memory:" or not os.path.exists(path):
            return None
        total = os.path.getsize(path)
        for suffix in ("-wal",):
            with suppress(OSError):
                total += os.path.getsize(path + suffix)
        return total


def _fetch_all(conn: Connection, sql: str, params: dict) -> list[tuple]:
    """Every row of a query as plain tuples, through the driver's own cursor: SQLAlchemy's Row
    objects cost about as much again as SQLite itself on a bulk read (export_rows)."""
    dbapi = conn.dialect.dbapi
    cursor = conn.connection.driver_connection.cursor()
    try:
        return cursor.execute(sql, params).fetchall()
    except dbapi.Error as exc:
        # the raw cursor bypasses SQLAlchemy's wrapping; the Store turns DBAPIError into one line
        # (a damaged file: "database disk image is malformed", not a driver traceback)
        raise sa.exc.DBAPIError.instance(sql, params, exc, dbapi.Error) from exc
    finally:
        cursor.close()


def _indexed(spec: CollectionSpec) -> bool:
    """Whether the collection keeps a ``vec_<id>`` kNN index (every kind but ``none``)."""
    return spec.index != "none"


def _runs(ids: np.ndarray, row_bytes: int):
    """Split ``ids`` into slices of at most BULK_ROWS rows and BULK_BYTES bytes of blobs (at
    ``row_bytes`` a row); say whether each is a consecutive run."""
    n = len(ids)
    step = max(1, min(BULK_ROWS, BULK_BYTES // max(1, row_bytes)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        chunk = ids[start:stop]
        consecutive = bool(np.all(np.diff(chunk) == 1)) if len(chunk) > 1 else True
        yield start, stop, consecutive


def _key_sql(spec: CollectionSpec) -> str:
    """SQL for the key of row ``r``: its row-table blob, or (``x''``) its index vector's first
    key_dim floats."""
    if not _indexed(spec):
        return "r.key"
    return (
        f"CASE WHEN length(r.key) = 0 THEN substr((SELECT v.key FROM {_vec(spec)} AS v "
        f"WHERE v.id = r.id), 1, {spec.key_dim * 4}) ELSE r.key END"
    )


def _blob(rows: np.ndarray) -> memoryview:
    """A C-contiguous float32 block as a blob parameter without copying it (``tobytes`` would
    copy the whole batch once more; SQLite copies the bound blob itself)."""
    return memoryview(np.ascontiguousarray(rows)).cast("B")


def _row_blobs(rows: np.ndarray, elsewhere: np.ndarray | None = None) -> list[bytes]:
    """One blob per row, ``x''`` where ``elsewhere`` (a value equal to its key)."""
    if elsewhere is None or not elsewhere.any():
        return [r.tobytes() for r in rows]
    return [b"" if e else r.tobytes() for r, e in zip(rows, elsewhere.tolist(), strict=True)]


def _value_is_key(spec: CollectionSpec, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row: whether the value is bit for bit its key (then it is stored once, as the key).
    Values default to the keys (``insert(keys)``), so auto-associative memories store one copy."""
    if spec.value_dim != spec.key_dim:
        return np.zeros(len(keys), bool)
    if values is keys:
        return np.ones(len(keys), bool)
    as_bits = lambda a: np.ascontiguousarray(a, np.float32).view(np.uint32)  # noqa: E731
    return (as_bits(keys) == as_bits(values)).all(axis=1)


def _values_of(spec: CollectionSpec, blobs: list, keys: np.ndarray) -> np.ndarray:
    """Values from their row-table blobs: ``x''`` stands for "the row's key" (``keys``)."""
    if all(blobs):
        return _decode(blobs, spec.value_dim)
    empty = np.fromiter(map(len, blobs), np.int64, len(blobs)) == 0
    out = np.empty((len(blobs), spec.value_dim), np.float32)
    if (~empty).any():
        out[~empty] = _decode([b for b in blobs if b], spec.value_dim)
    out[empty] = keys[empty]
    return out


def _found_keys(spec: CollectionSpec, found: list) -> np.ndarray:
    """The keys of kNN candidates (column 2): the row table's blob or the index's vector, whose
    first key_dim floats are the key (an ``ip`` / bit index appends or pads coordinates)."""
    kw = spec.key_dim * 4
    return _decode([r[2][:kw] for r in found], spec.key_dim)
