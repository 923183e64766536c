"""The Store: one database (by SQLAlchemy URL) holding named collections.

Every public call that changes data runs in exactly one write transaction (``BEGIN IMMEDIATE`` on
SQLite, so two writers queue on the busy timeout instead of failing half-way); a call that raises
leaves the database as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from memstore import catalog, migrate
from memstore.backends import backend_class
from memstore.collection import Collection
from memstore.errors import (
    DatabaseError,
    DimensionMismatchError,
    InvalidInputError,
    MemstoreError,
)
from memstore.transactions import mark_write_transaction
from memstore.types import CollectionOptions
from memstore.validation import check_name


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

    def get_or_create_collection(
        self, name: str, options: CollectionOptions | None = None, **kwargs: Any
    ) -> Collection:
        """The existing collection, or a new one made with the options.

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
            return self.create_collection(name, options, **kwargs)
        given = asdict(_options(options, kwargs)) if options is not None else kwargs
        differences = spec.differences(given)
        if differences:
            text = ", ".join(
                f"{option} {stored!r} (asked for {asked!r})"
                for option, (stored, asked) in differences.items()
            )
            error = (
                DimensionMismatchError
                if differences.keys() & {"key_dim", "value_dim"}
                else InvalidInputError
            )
            raise error(f"collection {name!r} exists with different options: {text}")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
