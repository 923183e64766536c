"""Announcing edits of a memory to the processes that hold it: a version per collection.

Several ``memstore serve`` processes may hold one memory (a PostgreSQL database, or one SQLite
file); each keeps the rows resident or cached, so an edit written to the database must tell them
which rows to read again. Whoever changes rows records the change **in the same transaction** as
the rows (:func:`record_change`): it bumps the collection's version in ``memstore_gpt2_versions``
and writes ``(collection, version, ids)`` to ``memstore_gpt2_changes`` (``ids`` NULL: any row may
have changed, read the whole collection again). A reader (:class:`ChangeFeed`) remembers the
versions it has applied and asks, with one small query, whether any collection has a newer one.

Why a version row rather than "changes after the last change id seen": the version of a collection
is bumped by an ``UPDATE`` of its one row, which PostgreSQL serialises (a second writer waits for
the first to commit, then increments the committed value; SQLite serialises every writer), so
versions commit in order and a reader that sees version ``v`` has seen every change up to ``v``.
A sequence-assigned id has no such order: a transaction that took id 5 may commit after the one
that took id 6, and a reader that already moved past 6 would never see 5.

These are application tables (like ``memstore_gpt2_checkpoints``), made on the first write by
whoever writes; a database that has none has had no recorded change. The log keeps every change
(one row per edit: small) so a reader that was away for a while catches up exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

_META = sa.MetaData()

#: The latest version of each collection that ever changed (absent: version 0).
VERSIONS = sa.Table(
    "memstore_gpt2_versions",
    _META,
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)

#: What each version changed: the row ids as a JSON list, or NULL for "any row".
CHANGES = sa.Table(
    "memstore_gpt2_changes",
    _META,
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("ids", sa.Text, nullable=True),
)


def ensure_tables(conn) -> None:
    """Create the two tables when missing (inside the caller's transaction)."""
    VERSIONS.create(conn, checkfirst=True)
    CHANGES.create(conn, checkfirst=True)


def record_change(conn, collection: str, ids: Iterable[int] | np.ndarray | None = None) -> int:
    """Record that rows ``ids`` of ``collection`` changed (None: any of its rows, e.g. a pack
    written or replaced); returns the collection's new version.

    Call it on the connection of the transaction that writes the rows (``with
    store.transaction() as conn``), so the rows and their announcement commit together: a reader
    never sees the version before the rows, nor rows without a version.
    """
    ensure_tables(conn)
    bumped = conn.execute(
        VERSIONS.update()
        .where(VERSIONS.c.collection == collection)
        .values(version=VERSIONS.c.version + 1)
    )
    if bumped.rowcount == 0:  # its first change
        try:
            with conn.begin_nested():
                conn.execute(VERSIONS.insert().values(collection=collection, version=1))
        except sa.exc.IntegrityError:  # another writer recorded a first change meanwhile
            conn.execute(
                VERSIONS.update()
                .where(VERSIONS.c.collection == collection)
                .values(version=VERSIONS.c.version + 1)
            )
    version = int(
        conn.execute(
            sa.select(VERSIONS.c.version).where(VERSIONS.c.collection == collection)
        ).scalar_one()
    )
    text = None
    if ids is not None:
        text = json.dumps(sorted({int(i) for i in np.asarray(list(ids), np.int64).tolist()}))
    conn.execute(CHANGES.insert().values(collection=collection, version=version, ids=text))
    return version


@dataclass(frozen=True)
class Change:
    """What changed in one collection since a reader last looked: ``ids`` (sorted) or None for
    every row; ``version``: the version these changes bring the reader to."""

    collection: str
    version: int
    ids: tuple[int, ...] | None


def versions(conn) -> dict[str, int]:
    """``{collection: version}`` of every collection that has changed ({} when none ever did)."""
    if not sa.inspect(conn).has_table(VERSIONS.name):
        return {}
    return {
        str(row.collection): int(row.version)
        for row in conn.execute(sa.select(VERSIONS.c.collection, VERSIONS.c.version))
    }


def changes_between(conn, collection: str, after: int, upto: int) -> tuple[int, ...] | None:
    """The ids changed by versions ``after + 1 .. upto`` of ``collection``, merged (None as soon
    as one of them changed any row, or when a version's record is missing)."""
    rows = conn.execute(
        sa.select(CHANGES.c.version, CHANGES.c.ids)
        .where(CHANGES.c.collection == collection)
        .where(CHANGES.c.version > after)
        .where(CHANGES.c.version <= upto)
    ).all()
    if len(rows) != upto - after:
        return None
    ids: set[int] = set()
    for row in rows:
        if row.ids is None:
            return None
        ids.update(int(i) for i in json.loads(row.ids))
    return tuple(sorted(ids))


class ChangeFeed:
    """The changes a process has not applied yet, collection by collection.

    ``ChangeFeed(store)`` starts at the versions committed now: the rows the process is about to
    load (or has just loaded) already hold those changes. Create it **before** loading the rows,
    so a change committed in between is applied once more rather than missed.
    """

    def __init__(self, store, known: dict[str, int] | None = None) -> None:
        """``known``: the versions the rows were loaded at, when read before loading them
        (default: those committed now)."""
        self.store = store
        if known is None:
            with store.read() as conn:
                known = versions(conn)
        self.known = dict(known)
        self._tables = bool(self.known)  # the tables exist (no inspection needed any more)

    def poll(self) -> list[Change]:
        """The collections whose version moved past the one applied (:meth:`applied`), each with
        the ids that changed since. One query when nothing did."""
        with self.store.read() as conn:
            if self._tables:
                now = {
                    str(r.collection): int(r.version)
                    for r in conn.execute(sa.select(VERSIONS.c.collection, VERSIONS.c.version))
                }
            else:
                now = versions(conn)
                self._tables = bool(now)
            out = []
            for collection, version in sorted(now.items()):
                before = self.known.get(collection, 0)
                if version > before:
                    ids = changes_between(conn, collection, before, version)
                    out.append(Change(collection, version, ids))
        return out

    def applied(self, change: Change) -> None:
        """The reader holds ``change`` now: the next :meth:`poll` starts after its version (a
        change not marked applied, e.g. because reading the rows failed, is returned again)."""
        self.known[change.collection] = max(self.known.get(change.collection, 0), change.version)
