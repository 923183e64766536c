"""Vector-storage backends, one per SQL dialect, chosen from the database URL.

``sqlite`` -> :class:`memstore.backends.sqlite.SqliteBackend` (sqlite-vec);
``postgresql`` -> :class:`memstore.backends.postgres.PostgresBackend` (pgvector). Backends are
imported lazily so a missing optional driver only matters to URLs that need it.
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa

from memstore.backends.base import VectorBackend
from memstore.errors import DatabaseError, DriverError

BACKENDS = {
    "sqlite": ("memstore.backends.sqlite", "SqliteBackend"),
    "postgresql": ("memstore.backends.postgres", "PostgresBackend"),
    # the scheme Heroku-style URLs and libpq accept; the backend maps it to psycopg 3
    "postgres": ("memstore.backends.postgres", "PostgresBackend"),
}


def backend_class(url: sa.URL) -> type[VectorBackend]:
    dialect = url.get_backend_name()
    if dialect not in BACKENDS:
        raise DatabaseError(
            f"unsupported database {url.render_as_string(hide_password=True)!r}: "
            "use a sqlite:/// or postgresql:// URL"
        )
    module_name, class_name = BACKENDS[dialect]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        extra = " (install the 'postgres' extra)" if dialect.startswith("postgres") else ""
        raise DriverError(f"the {dialect} backend is not available{extra}: {exc}") from exc


__all__ = ["VectorBackend", "backend_class", "BACKENDS"]
