"""Transactions: the write-transaction flag, and what a collection needs from its store.

Writers mark a connection before ``conn.begin()``; each backend's ``begin`` hook turns the mark into
its dialect's way of queueing writers (SQLite: ``BEGIN IMMEDIATE``, so two writers wait on the
busy timeout instead of failing half-way; PostgreSQL: a transaction-scoped advisory lock). The mark
is made and read only through :func:`mark_write_transaction` / :func:`is_write_transaction`.

:class:`TransactionHost` is the seam between :class:`memstore.collection.Collection` and
:class:`memstore.store.Store`: a collection only runs read and write transactions against its
store's backend, so it depends on this small protocol rather than on the Store class (which
creates collections and therefore imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from memstore.backends.base import VectorBackend

T = TypeVar("T")

#: Connection execution options that make the next ``conn.begin()`` a write transaction.
WRITE_TRANSACTION: dict[str, str] = {"memstore_begin": "IMMEDIATE"}


def mark_write_transaction(conn: Connection) -> Connection:
    """Make the next transaction begun on ``conn`` a (queued, single-writer) write transaction."""
    return conn.execution_options(**WRITE_TRANSACTION)


def is_write_transaction(conn: Connection) -> bool:
    """True when ``conn`` was marked by :func:`mark_write_transaction` (read in ``begin`` hooks)."""
    options = conn.get_execution_options()
    return all(options.get(name) == value for name, value in WRITE_TRANSACTION.items())


@runtime_checkable
class TransactionHost(Protocol):
    """What a collection uses of the store it belongs to (:class:`memstore.store.Store` is one)."""

    backend: VectorBackend

    def read(self) -> AbstractContextManager[Connection]:
        """A read transaction (a consistent snapshot)."""
        ...

    def write(self) -> AbstractContextManager[Connection]:
        """A write transaction, committed on success and rolled back on any error."""
        ...

    def maintenance(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``, which commits transactions of its own (``compact``), outside any
        open transaction, with driver errors turned into :class:`memstore.errors.DatabaseError`."""
        ...
