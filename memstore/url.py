"""What a user may pass as "the database": a URL, a bare file path, or a ``pathlib.Path``.

One rule, shared by :class:`memstore.store.Store` and the CLI, so the two accept the same things:
text containing ``://`` is an SQLAlchemy URL and passes through unchanged; anything else is a SQLite
file path, made absolute (``~`` expanded) so that the URL names the same file from any directory.
Kept free of SQLAlchemy so the CLI can import it without paying for SQLAlchemy at start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from memstore.errors import DatabaseError

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/][^:]*$")


def normalise_url(url: str | os.PathLike) -> str:
    """``x.db`` or ``Path("x.db")`` -> ``sqlite:///<absolute path>``; URLs pass through unchanged.

    Text with a colon but no ``://`` (``sqlite:/x.db``, ``postgresql:db``) is a mistyped URL, not
    a file name: rejected rather than creating a file of that name (a ``pathlib.Path`` is always a
    path, and a Windows drive ``C:\\...`` is allowed).
    """
    if isinstance(url, os.PathLike):
        path = os.fspath(url)
        if not isinstance(path, str) or not path:
            raise DatabaseError(f"not a database path: {url!r}")
        return _sqlite_file(path)
    if not isinstance(url, str) or not url.strip():
        raise DatabaseError(f"not a database URL or path: {url!r}")
    if "://" in url:
        return url
    if ":" in url and not _WINDOWS_DRIVE.match(url):
        raise DatabaseError(
            f"not a database URL: {url!r} (a URL looks like sqlite:///path.db or "
            "postgresql://user@host/db; a plain file path has no colon)"
        )
    return _sqlite_file(url)


def _sqlite_file(path: str) -> str:
    return "sqlite:///" + str(Path(path).expanduser().resolve())
