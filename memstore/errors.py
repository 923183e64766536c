"""Exception classes for memstore.

Every error the package raises on purpose derives from :class:`MemstoreError`, so the CLI can turn
it into a one-line message and callers can catch the exact problem they care about.
"""

from __future__ import annotations


class MemstoreError(Exception):
    """Base class of every error memstore raises on purpose."""


class InvalidInputError(MemstoreError, ValueError):
    """An argument is malformed: wrong shape, dtype, NaN/inf, empty batch, bad k, bad option.

    ``parameter`` names the offending argument when there is one, and the message then starts with
    that name, so a front end can speak its own spelling of it (the CLI says ``--batch-size`` where
    the API says ``batch_size``) without parsing prose: see :func:`bad_parameter`.
    """

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


def bad_parameter(name: str, problem: str) -> InvalidInputError:
    """``InvalidInputError("<name> <problem>", parameter=name)``, e.g. ``bad_parameter("k", "must be
    positive, got 0")``; raise the result."""
    return InvalidInputError(f"{name} {problem}", parameter=name)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error quotes of a cause it wraps (a driver's or torch's multi-line text)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def typed_first_line(exc: BaseException) -> str:
    """``"<type>: <first line>"`` (just the type when the message is empty): how a server
    reports a failure it survived (a scheduler's, a refresher's) in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class DimensionMismatchError(InvalidInputError):
    """An array's trailing dimension does not match the collection's key or value dimension."""


class InvalidNameError(InvalidInputError):
    """A collection name does not match ``[A-Za-z_][A-Za-z0-9_.-]{0,63}``."""


class CollectionNotFoundError(MemstoreError, LookupError):
    """The named collection does not exist in this store."""


class CollectionExistsError(MemstoreError):
    """A collection of that name already exists."""


class RowNotFoundError(MemstoreError, LookupError):
    """One or more requested row ids are not in the collection."""


class DatabaseError(MemstoreError):
    """The URL does not point at a usable memstore database (not a database, unreachable, ...)."""


class StoreClosedError(DatabaseError):
    """The :class:`memstore.Store` (or a collection handle from it) was used after ``close()``."""


class DiskFullError(DatabaseError):
    """The database could not grow: its file system (or SQLite's ``max_page_count``) is full.

    Nothing of the failed call was written (it ran in one transaction, rolled back).
    """


class DatabaseInUseError(DatabaseError):
    """Another process writes the database right now (a training run, an edit, a prune, ...):
    see :mod:`memstore.writer_lock`."""


class CorruptDataError(DatabaseError):
    """Stored rows cannot be used as they are: non-finite values, blobs of the wrong length, a
    damaged file. Nothing was written; the message names the collection (and rows when known)."""


class SchemaTooNewError(DatabaseError):
    """The database was written by a newer memstore; opening it could corrupt it."""


class SchemaOutdatedError(DatabaseError):
    """The database schema is older than this code; run ``memstore upgrade URL``."""


class DriverError(MemstoreError):
    """No available SQLite driver can load the sqlite-vec extension (or a backend driver is missing)."""


class MissingDependencyError(MemstoreError):
    """An optional dependency (for instance the ``torch`` extra) is not installed."""
