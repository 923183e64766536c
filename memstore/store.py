"""The Store: one database (by SQLAlchemy URL) holding named collections.

Every public call that changes data runs in exactly one write transaction (``BEGIN IMMEDIATE`` on
SQLite, so two writers queue on the busy timeout instead of failing half-way); a call that raises
leaves the database as it was. ``Store.transaction()`` groups several calls into one.

Threads may share a Store: each thread's calls run in that thread's own transactions (a connection
per working thread on a file or server; on an in-memory SQLite database, which *is* its single
connection, transactions of different threads take turns on a lock).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from memstore import catalog, migrate
from memstore.backends import backend_class
from memstore.collection import Collection
from memstore.errors import (
    DatabaseError,
    DimensionMismatchError,
    DiskFullError,
    InvalidInputError,
    MemstoreError,
    StoreClosedError,
    bad_parameter,
    first_line,
)
from memstore.transactions import mark_write_transaction
from memstore.types import CollectionOptions
from memstore.url import normalise_url
from memstore.validation import check_name


def _describe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


class Store:
    """A memstore database. ``Store("sqlite:///x.db")``; a new SQLite file is created and migrated.

    ``url`` is an SQLAlchemy URL, or a file path (``"x.db"``, ``pathlib.Path("x.db")``) meaning a
    SQLite file, exactly as the CLI reads it (:func:`memstore.url.normalise_url`).
    ``upgrade=True`` migrates an older schema on open (otherwise :class:`SchemaOutdatedError`);
    ``create=False`` refuses to create a new database (a missing SQLite file or an empty database
    is an error: the read-only CLI commands must not litter files);
    ``read_only=True`` (implies ``create=False``) writes nothing, not even SQLite's ``-wal`` /
    ``-shm`` files, so a database in a read-only directory can be inspected; writes raise;
    ``check_schema=False`` skips the schema check (used by ``memstore upgrade`` and Alembic's env).
    After :meth:`close` every call on the store or its collections raises
    :class:`StoreClosedError`.
    """

    def __init__(
        self,
        url: str | os.PathLike | sa.URL,
        *,
        upgrade: bool = False,
        create: bool = True,
        check_schema: bool = True,
        read_only: bool = False,
    ):
        self._closed = False
        self._local = threading.local()  # .current: (connection, is_write) of this thread's txn
        self.read_only = bool(read_only)
        create = create and not self.read_only
        try:
            self.url = url if isinstance(url, sa.URL) else sa.make_url(normalise_url(url))
        except sa.exc.ArgumentError as exc:
            raise DatabaseError(f"not a database URL: {url!r} ({exc})") from None
        self._text = _describe(self.url)
        cls = backend_class(self.url)
        if not create and cls.dialect == "sqlite":
            path = self.url.database or ""
            if path not in ("", ":memory:") and not os.path.exists(path):
                raise DatabaseError(f"no database file at {path} (create it with `memstore init`)")
        self.engine = cls.create_engine(self.url, read_only=self.read_only)
        self.backend = cls(self.engine)
        # A pool of one connection (SQLite in memory) is shared by every thread: its transactions
        # must take turns, or two threads' statements interleave inside one SQLite transaction.
        self._serial = (
            threading.RLock() if isinstance(self.engine.pool, StaticPool) else nullcontext()
        )
        try:
            if check_schema:
                self._translate(
                    migrate.ensure_schema,
                    self.engine,
                    self._text,
                    upgrade_outdated=upgrade,
                    create=create,
                )
                if not self.read_only:
                    self._translate(self.backend.after_open)
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | sa.URL, **kwargs) -> Store:
        return cls(url, **kwargs)

    def upgrade(self) -> str:
        """Migrate to the latest schema revision; returns it."""
        self.maintenance(migrate.upgrade, self.engine)
        return migrate.head_revision()

    def schema_revision(self) -> str | None:
        with self.read() as conn:
            return migrate.current_revision(conn)

    def close(self) -> None:
        """Release the connections. The store (and its collections) cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self.engine.dispose()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self._text} is closed: open a new Store to use it again")

    def __enter__(self) -> Store:
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._text!r})"

    # ------------------------------------------------------------ transactions
    @contextmanager
    def _driver_errors(self) -> Iterator[None]:
        """Driver errors raised inside become one-line :class:`DatabaseError` s (memstore's own
        errors pass through): the one place a DBAPI exception is translated."""
        try:
            yield
        except MemstoreError:
            raise
        except sa.exc.DBAPIError as exc:
            raise self._database_error(exc) from exc

    def _translate(self, fn, *args, **kwargs):
        self._check_open()
        with self._serial, self._driver_errors():
            return fn(*args, **kwargs)

    def maintenance(self, fn, *args):
        """Run ``fn(*args)``, a job that commits several transactions of its own (upgrade,
        compact), outside any open transaction, with driver errors as :class:`DatabaseError`."""
        self._check_open()
        if self.read_only:
            raise DatabaseError(f"{self._text} was opened read_only: it cannot be changed")
        if getattr(self._local, "current", None) is not None:
            raise InvalidInputError(
                f"{getattr(fn, '__name__', 'this call')} commits transactions of its own and "
                "cannot run inside store.transaction() / read() / write()"
            )
        return self._translate(fn, *args)

    def _database_error(self, exc: sa.exc.DBAPIError) -> DatabaseError:
        """A driver error as a one-line DatabaseError (DiskFullError when out of space)."""
        orig = exc.orig or exc
        if self.backend.disk_full(orig):
            return DiskFullError(
                f"{self._text}: disk full: the database cannot grow; nothing of this call was "
                f"written. Free space on its file system and retry ({first_line(orig)})"
            )
        return DatabaseError(f"{self._text}: {first_line(orig)}")

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        with self._driver_errors(), self.engine.connect() as conn:
            if write:
                mark_write_transaction(conn)
            with conn.begin():
                yield conn

    @contextmanager
    def _enter(self, write: bool) -> Iterator[Connection]:
        """This thread's transaction: a new one, or the one already open in this thread (joined;
        a joined write runs in a SAVEPOINT so that the call is still all-or-nothing)."""
        self._check_open()
        if write and self.read_only:
            raise DatabaseError(f"{self._text} was opened read_only: it cannot be written")
        current = getattr(self._local, "current", None)
        if current is None:
            with self._serial, self._transaction(write) as conn:
                self._local.current = (conn, write)
                try:
                    yield conn
                finally:
                    self._local.current = None
            return
        conn, writing = current
        if write and not writing:
            raise InvalidInputError(
                "cannot write inside a read transaction (store.read()); "
                "use store.transaction() to read and write together"
            )
        if not writing:
            yield conn
            return
        with self._driver_errors(), conn.begin_nested():
            yield conn

    def transaction(self):
        """One write transaction around several calls (a context manager yielding the connection).

        Every store and collection call this thread makes inside the ``with`` block joins it: all
        of them commit together when the block ends, or none does if it raises (or the process
        dies). A call that fails inside the block is itself undone (it runs in a savepoint), so
        catching its error and carrying on is safe. Writers in other threads and processes wait
        for the block, so keep it short. ``compact()`` and ``upgrade()`` cannot run inside it.

        Example::

            with store.transaction():
                coll = store.create_collection("facts", key_dim=4)
                coll.insert(keys)  # a crash here leaves no empty "facts" behind
        """
        return self._enter(True)

    @property
    def concurrent_reads(self) -> bool:
        """Whether another thread can read while this one holds a transaction (False for an
        in-memory SQLite database, whose one connection every thread takes turns on)."""
        return isinstance(self._serial, nullcontext)

    def in_transaction(self) -> bool:
        """Whether this thread has a write transaction open (``transaction()`` / ``write()``):
        what a caller that must not commit on its own (a paged memory writing rows back between
        checkpoints) checks before writing."""
        current = getattr(self._local, "current", None)
        return current is not None and current[1]

    def write(self):
        """A write transaction (committed on success, rolled back on any error); as
        :meth:`transaction`."""
        return self._enter(True)

    def read(self):
        """A read transaction (a consistent snapshot); calls inside it may only read."""
        return self._enter(False)

    # ------------------------------------------------------------- collections
    def create_collection(
        self, name: str, options: CollectionOptions | None = None, **kwargs: Any
    ) -> Collection:
        """Create an empty collection. Options by keyword (``key_dim=64, metric="ip", ...``: the
        fields of :class:`~memstore.types.CollectionOptions`, with their defaults) or as one
        ``CollectionOptions``; ``value_dim`` defaults to ``key_dim``."""
        check_name(name)
        options = _options(options, kwargs)
        with self.write() as conn:
            spec = catalog.add(conn, name, options)
            self.backend.create_storage(conn, spec)
        return Collection(self, spec)

    def collection(self, name: str) -> Collection:
        check_name(name)
        with self.read() as conn:
            return Collection(self, catalog.get(conn, name))

    def import_rows(
        self, name: str, keys, values=None, **options
    ) -> tuple[Collection, np.ndarray, bool]:
        """Insert rows into collection ``name``, creating it first if it is missing: ONE write
        transaction (what ``memstore import`` runs). Returns ``(collection, ids, created)``.

        A new collection takes ``options`` (``metric``, ``index``, ``oversample``,
        ``lrfu_lambda``, ``capacity``; ``key_dim`` / ``value_dim`` default to the arrays' widths).
        If the collection exists - made earlier, or by another process a moment ago - every
        option given must equal its stored value (as :meth:`get_or_create_collection` checks),
        and the rows are added to it. So concurrent imports into a new collection all succeed,
        and a crash or a rejected file never leaves an empty collection behind.
        """
        check_name(name)
        key_array = np.asarray(keys)
        if key_array.ndim != 2:
            raise bad_parameter(
                "keys", f"must be a 2-D array (rows, dim), got shape {key_array.shape}"
            )
        value_array = None if values is None else np.asarray(values)
        width = value_array.shape[-1] if value_array is not None and value_array.ndim == 2 else None
        dims = {"key_dim": key_array.shape[1], "value_dim": width or key_array.shape[1]}
        with self.transaction():
            created = not self.has_collection(name)
            if created:
                coll = self.create_collection(name, **{**dims, **options})
            else:
                coll = self.get_or_create_collection(name, **options)
            ids = coll.insert(key_array, value_array)
        return coll, ids, created

    def get_or_create_collection(
        self, name: str, options: CollectionOptions | None = None, **kwargs: Any
    ) -> Collection:
        """The existing collection, or a new one made with the options (one transaction, so two
        callers racing to create the same collection both get it).

        An existing collection must agree with every option the caller gave (each keyword, or
        every field of a ``CollectionOptions``): a different dimension raises
        :class:`DimensionMismatchError`, any other difference :class:`InvalidInputError`, naming
        the option, the stored value and the one asked for. Options not given are not compared
        (``get_or_create_collection(name)`` of an existing collection needs no ``key_dim``);
        options given are validated even when the collection exists.
        """
        check_name(name)
        with self.read() as conn:
            spec = catalog.find(conn, name)
        if spec is None:
            with self.transaction() as conn:  # look again where no other writer can interleave
                spec = catalog.find(conn, name)
                if spec is None:
                    return self.create_collection(name, options, **kwargs)
        given = asdict(_options(options, kwargs)) if options is not None else kwargs
        _refuse_different(spec, given)
        return Collection(self, spec)

    def has_collection(self, name: str) -> bool:
        check_name(name)
        with self.read() as conn:
            return catalog.find(conn, name) is not None

    def list_collections(self) -> list[Collection]:
        with self.read() as conn:
            return [Collection(self, spec) for spec in catalog.all_specs(conn)]

    def drop_collection(self, name: str) -> None:
        check_name(name)
        with self.write() as conn:
            spec = catalog.get(conn, name)
            self.backend.drop_storage(conn, spec)
            catalog.remove(conn, spec)

    def size_bytes(self) -> int | None:
        self._check_open()
        return self.backend.size_bytes()


def _options(options: CollectionOptions | None, kwargs: dict[str, Any]) -> CollectionOptions:
    """One validated CollectionOptions from an options object or keywords (not both)."""
    if options is None:
        return CollectionOptions(**kwargs)
    if kwargs:
        raise TypeError("give options either as a CollectionOptions or as keywords, not both")
    if not isinstance(options, CollectionOptions):
        raise TypeError(f"options must be a CollectionOptions, got {type(options).__name__}")
    return options.options


def _refuse_different(spec, given: dict[str, Any]) -> None:
    """An existing collection asked for with options it was not created with is an error naming
    each difference (the first one is the error's ``parameter``)."""
    differences = spec.differences(given)
    if not differences:
        return
    text = "; ".join(
        f"{option} {stored}, not {asked}" for option, (stored, asked) in differences.items()
    )
    error = (
        DimensionMismatchError
        if differences.keys() & {"key_dim", "value_dim"}
        else InvalidInputError
    )
    raise error(f"collection {spec.name!r} exists with {text}", parameter=next(iter(differences)))
