"""Alembic environment for memstore.

Normally memstore runs migrations itself (``memstore upgrade`` / :mod:`memstore.migrate`) and hands
the open connection in through ``config.attributes["connection"]``. Run from a checkout with the
``alembic`` command, set ``sqlalchemy.url`` (``-x url=...`` also works) and an engine is built
through memstore's backend so sqlite-vec is loaded.

Per-collection tables (``rows_<id>``, ``vec_<id>``) and sqlite-vec's shadow tables
(``vec_<id>_chunks``, ``_rowids``, ``_vector_chunksNN``, ``_rescore_*``, ``_info``, ``_auxiliary``,
``_metadata*``) are created at run time by the backend, so autogenerate must never see them.
"""

from __future__ import annotations

from alembic import context

from memstore.migrate import include_name, include_object
from memstore.schema import metadata


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_name=include_name,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    from memstore.store import Store

    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    store = Store(url, check_schema=False)
    try:
        with store.engine.connect() as connection:
            _configure_and_run(connection)
            connection.commit()
    finally:
        store.close()


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        include_name=include_name,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
