"""The seam between the dialect-neutral store and one SQL dialect's vector storage.

A :class:`VectorBackend` owns everything that is stored *per collection* and created at run time
(SQLite: a ``rows_<id>`` table plus a sqlite-vec ``vec0`` table ``vec_<id>``; PostgreSQL: a table
with a pgvector ``vector(d)`` column and an HNSW/IVFFlat index). The catalog of collections, their
clocks and counters live in the Alembic-managed schema (:mod:`memstore.schema`) and are handled by
:class:`memstore.store.Store`, not here.

Contract every backend keeps (the Store relies on it; ``tests/store`` checks it):

* every method that takes ``conn`` runs inside the caller's transaction and never commits;
* ids, counts and ticks are int64 numpy arrays; keys/values float32; crf float64;
* tables are named from ``spec.id`` (an integer), never from ``spec.name`` (user text);
* ``knn`` returns distances in the public convention of :mod:`memstore.distances` (the numpy
  reference; smaller = nearer); ``ip`` must equal brute force (ties aside); results are padded with
  id -1, distance +inf, zero keys/values;
* LRFU state (``touch``, ``lowest_scored``, ``score_summary``, and the crf / last_tick / hits that
  ``fetch_rows`` returns) follows :mod:`memstore.lrfu`'s numpy reference exactly;
* the input arrays are already validated (shapes, dtypes, finiteness) by :mod:`memstore.validation`.

Dialect-neutral semantics live outside the backends, each as one numpy reference: distances in
:mod:`memstore.distances`, LRFU in :mod:`memstore.lrfu`, recombination / novelty in
:mod:`memstore.recombine` (planned in numpy, applied by the Collection through this interface),
input checks in :mod:`memstore.validation`. A backend's SQL is a *mirror* of the references, marked
as such where it is written and property-tested against them (``tests/store/test_semantics.py``,
on every backend): PostgreSQL compiles the SQLAlchemy expressions
:func:`memstore.lrfu.touch_assignments` / :func:`memstore.lrfu.order_key_sql`; SQLite keeps an
append-only touch log and reads LRFU state in closed form (:mod:`memstore.backends.sqlite_lrfu`),
which is cheaper on its storage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from memstore.types import CollectionSpec, RowBlock, SearchResult


class VectorBackend(ABC):
    """Vector + row storage of collections for one SQL dialect (see the module docstring)."""

    #: SQLAlchemy dialect name this backend serves (``url.get_backend_name()``).
    dialect: ClassVar[str]

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ engine
    @classmethod
    @abstractmethod
    def create_engine(cls, url: sa.URL, *, read_only: bool = False) -> Engine:
        """Build the engine with whatever the dialect needs on every connection.

        (SQLite: pick a driver that can load extensions, load sqlite-vec, WAL, busy timeout.
        PostgreSQL: ``CREATE EXTENSION vector`` and register the pgvector types.)
        ``read_only``: the Store will only read; open the database so that nothing at all is
        written (SQLite: no ``-wal``/``-shm`` files created in a read-only directory).
        Raise :class:`memstore.errors.DriverError` if the driver cannot be set up.
        """

    def disk_full(self, error: BaseException) -> bool:
        """Whether a driver error means the database ran out of space (reported as
        :class:`memstore.errors.DiskFullError` instead of the driver's wording)."""
        return False

    def after_open(self) -> None:
        """Called once the database is known to be a current memstore database (optional hook;
        SQLite switches the file to WAL here, never on a foreign file)."""
        return None

    # ------------------------------------------------------------- lifecycle
    @abstractmethod
    def create_storage(self, conn: Connection, spec: CollectionSpec) -> None:
        """Create the collection's row table and vector index (empty)."""

    @abstractmethod
    def drop_storage(self, conn: Connection, spec: CollectionSpec) -> None:
        """Drop everything :meth:`create_storage` created."""

    # ------------------------------------------------------------------ rows
    @abstractmethod
    def insert_rows(self, conn: Connection, spec: CollectionSpec, rows: RowBlock) -> None:
        """Bulk-insert complete rows whose ids do not exist yet (the caller guarantees it)."""

    def upsert_rows(self, conn: Connection, spec: CollectionSpec, rows: RowBlock) -> None:
        """Insert rows, fully replacing (key, value, LRFU fields, index entry) existing ids.

        The default deletes then inserts, which every backend supports; override for speed.
        """
        self.delete_rows(conn, spec, rows.ids)
        self.insert_rows(conn, spec, rows)

    @abstractmethod
    def update_rows(
        self,
        conn: Connection,
        spec: CollectionSpec,
        ids: np.ndarray,
        keys: np.ndarray | None,
        values: np.ndarray | None,
    ) -> None:
        """Replace keys and/or values of existing ids (unique); LRFU fields are kept."""

    @abstractmethod
    def delete_rows(self, conn: Connection, spec: CollectionSpec, ids: np.ndarray) -> int:
        """Delete these ids (rows and index entries); unknown ids are ignored. Returns the count."""

    @abstractmethod
    def fetch_rows(
        self, conn: Connection, spec: CollectionSpec, ids: np.ndarray | None = None
    ) -> RowBlock:
        """Rows with these ids ordered by id (ids that do not exist are left out); None = all rows."""

    @abstractmethod
    def count_rows(self, conn: Connection, spec: CollectionSpec) -> int:
        """Number of rows in the collection."""

    @abstractmethod
    def max_id(self, conn: Connection, spec: CollectionSpec) -> int | None:
        """Largest stored id, or None when the collection is empty."""

    def index_ids(self, conn: Connection, spec: CollectionSpec) -> np.ndarray:
        """Ids present in the vector index, ascending (tests check they equal the row ids).

        The default suits backends whose index lives on the row table itself (pgvector), where
        the two cannot diverge; backends with a separate index table override it.
        """
        return self.fetch_rows(conn, spec, None).ids

    # ---------------------------------------------------------------- search
    @abstractmethod
    def knn(
        self, conn: Connection, spec: CollectionSpec, queries: np.ndarray, k: int
    ) -> SearchResult:
        """The k nearest rows of each query (m, dk), with keys and values, padded (see module doc).

        Exact for ``spec.index == "exact"``; otherwise the backend's approximate index with
        ``spec.oversample`` candidates per result rescored exactly.
        """

    # ------------------------------------------------------------------ LRFU
    @abstractmethod
    def touch(
        self,
        conn: Connection,
        spec: CollectionSpec,
        ids: np.ndarray,
        counts: np.ndarray,
        tick: int,
    ) -> None:
        """Record ``counts[i]`` hits of ``ids[i]`` at ``tick``: afterwards the rows read back as
        :func:`memstore.lrfu.touch` says (:func:`memstore.lrfu.touch_assignments` is that update as
        SQL ``SET`` expressions; a backend may also defer it, as SQLite's touch log does).
        """

    @abstractmethod
    def lowest_scored(
        self,
        conn: Connection,
        spec: CollectionSpec,
        now: int,
        *,
        limit: int | None = None,
        below: float | None = None,
    ) -> np.ndarray:
        """Ids ordered by ascending LRFU order key at ``now`` (ties: older last_tick, then lower id).

        ``limit`` caps how many; ``below`` keeps only rows whose key is < below. The order is
        :func:`memstore.lrfu.eviction_order` (:func:`memstore.lrfu.order_key_sql` is the key as
        SQL), so every backend evicts identically.
        """

    @abstractmethod
    def score_summary(self, conn: Connection, spec: CollectionSpec, now: int) -> dict:
        """``{"min": .., "mean": .., "max": ..}`` of the LRFU order key at ``now`` (None if empty)."""

    # ----------------------------------------------------------- maintenance
    @abstractmethod
    def compact(self, spec: CollectionSpec) -> None:
        """Give the space of deleted rows back to the file system (runs its own transactions).

        Called by ``memstore prune`` after evicting; must never lose or duplicate a row even if
        interrupted (every step is its own committed transaction or a no-op).
        """

    @abstractmethod
    def size_bytes(self) -> int | None:
        """Size of the database on disk (None where that is not known)."""
