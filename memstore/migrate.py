"""Schema versioning: create new databases, refuse newer ones, upgrade older ones on request.

Policy (documented in docs/store.md): a new, empty database is created and migrated to the latest
revision on open. A database with an *older* schema is NOT upgraded silently -- opening it raises
:class:`SchemaOutdatedError` until ``memstore upgrade URL`` (or ``Store(url, upgrade=True)``) is run,
because an upgrade can make the file unreadable to the older memstore another process may be using.
A database whose revision this code does not know was written by a newer memstore:
:class:`SchemaTooNewError`.

The Alembic scripts are found with ``importlib.resources`` on ``memstore.migrations`` so the same
code works from a checkout, an editable install and a wheel.
"""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection, Engine

from memstore.errors import DatabaseError, SchemaOutdatedError, SchemaTooNewError

VERSION_TABLE = "alembic_version"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("memstore.migrations")))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def schema_status(conn: Connection) -> str:
    """One of ``"empty"``, ``"current"``, ``"outdated"``, ``"newer"``, ``"foreign"``."""
    tables = set(sa.inspect(conn).get_table_names())
    if VERSION_TABLE not in tables:
        return "empty" if not tables else "foreign"
    revision = current_revision(conn)
    script = ScriptDirectory.from_config(alembic_config())
    if revision is None:
        return "outdated"
    try:
        script.get_revision(revision)
    except CommandError:
        return "newer"
    return "current" if revision == script.get_current_head() else "outdated"


def upgrade(engine: Engine) -> None:
    """Migrate to the latest revision in one transaction (Alembic runs on our connection)."""
    config = alembic_config()
    with engine.connect() as conn:
        conn.execution_options(memstore_begin="IMMEDIATE")
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        conn.commit()


def ensure_schema(
    engine: Engine, url_text: str, *, upgrade_outdated: bool, create: bool = True
) -> None:
    """Create, check or upgrade the schema as the module docstring describes."""
    with engine.connect() as conn:
        status = schema_status(conn)
        revision = current_revision(conn) if status in ("newer", "outdated") else None
    if status == "current":
        return
    if status == "empty" and not create:
        raise DatabaseError(f"{url_text} is not a memstore database yet: run `memstore init` first")
    if status == "foreign":
        raise DatabaseError(
            f"{url_text} is a database but not a memstore database (it has tables but no "
            f"'{VERSION_TABLE}' table); refusing to modify it"
        )
    if status == "newer":
        raise SchemaTooNewError(
            f"{url_text} has schema revision {revision!r}, written by a newer memstore than this one "
            f"(latest known: {head_revision()!r}); upgrade memstore to open it"
        )
    if status == "outdated" and not upgrade_outdated:
        raise SchemaOutdatedError(
            f"{url_text} has an older schema (revision {revision!r}, latest {head_revision()!r}); "
            f"run `memstore upgrade {url_text}` first"
        )
    upgrade(engine)
