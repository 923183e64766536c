"""The Store: one database (by SQLAlchemy URL) holding named collections.

Every public call that changes data runs in exactly one write transaction (``BEGIN IMMEDIATE`` on
SQLite, so two writers queue on the busy timeout instead of failing half-way); a call that raises
leaves the database as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from memstore import catalog, migrate
from memstore.backends import backend_class
from memstore.collection import Collection
from memstore.errors import DatabaseError, MemstoreError
from memstore.transactions import mark_write_transaction
from memstore.validation import check_collection_options, check_name


def _describe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


class Store:
    """A memstore database. ``Store("sqlite:///x.db")``; a new SQLite file is created and migrated.

    ``upgrade=True`` migrates an older schema on open (otherwise :class:`SchemaOutdatedError`);
    ``create=False`` refuses to create a new database (a missing SQLite file or an empty database
    is an error: the read-only CLI commands must not litter files);
    ``check_schema=False`` skips the schema check (used by ``memstore upgrade`` and Alembic's env).
    """

    def __init__(
        self,
        url: str | sa.URL,
        *,
        upgrade: bool = False,
        create: bool = True,
        check_schema: bool = True,
    ):
        try:
            self.url = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise DatabaseError(f"not a database URL: {url!r} ({exc})") from None
        self._text = _describe(self.url)
        cls = backend_class(self.url)
        if not create and cls.dialect == "sqlite":
            path = self.url.database or ""
            if path not in ("", ":memory:") and not os.path.exists(path):
                raise DatabaseError(f"no database file at {path} (create it with `memstore init`)")
        self.engine = cls.create_engine(self.url)
        self.backend = cls(self.engine)
        try:
            if check_schema:
                self._translate(
                    migrate.ensure_schema,
                    self.engine,
                    self._text,
                    upgrade_outdated=upgrade,
                    create=create,
                )
                self._translate(self.backend.after_open)
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | sa.URL, **kwargs) -> Store:
        return cls(url, **kwargs)

    def upgrade(self) -> str:
        """Migrate to the latest schema revision; returns it."""
        self._translate(migrate.upgrade, self.engine)
        return migrate.head_revision()

    def schema_revision(self) -> str | None:
        with self.read() as conn:
            return migrate.current_revision(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._text!r})"

    # ------------------------------------------------------------ transactions
    def _translate(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemstoreError:
            raise
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"{self._text}: {_first_line(exc.orig or exc)}") from exc

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                if write:
                    mark_write_transaction(conn)
                with conn.begin():
                    yield conn
        except MemstoreError:
            raise
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"{self._text}: {_first_line(exc.orig or exc)}") from exc

    def write(self):
        """A write transaction (committed on success, rolled back on any error)."""
        return self._transaction(True)

    def read(self):
        """A read transaction (a consistent snapshot)."""
        return self._transaction(False)

    # ------------------------------------------------------------- collections
    def create_collection(
        self,
        name: str,
        *,
        key_dim: int,
        value_dim: int | None = None,
        metric: str = "l2",
        lrfu_lambda: float = 0.5,
        capacity: int | None = None,
        index: str = "exact",
        oversample: int = 8,
    ) -> Collection:
        """Create an empty collection; ``value_dim`` defaults to ``key_dim``."""
        check_name(name)
        options = check_collection_options(
            key_dim,
            key_dim if value_dim is None else value_dim,
            metric,
            lrfu_lambda,
            capacity,
            index,
            oversample,
        )
        with self.write() as conn:
            spec = catalog.add(conn, name, *options)
            self.backend.create_storage(conn, spec)
        return Collection(self, spec)

    def collection(self, name: str) -> Collection:
        check_name(name)
        with self.read() as conn:
            return Collection(self, catalog.get(conn, name))

    def get_or_create_collection(self, name: str, **options) -> Collection:
        """The existing collection (its stored options win) or a new one with ``options``."""
        check_name(name)
        with self.read() as conn:
            spec = catalog.find(conn, name)
        if spec is not None:
            return Collection(self, spec)
        return self.create_collection(name, **options)

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
        return self.backend.size_bytes()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
