"""The Alembic-managed catalog schema, as SQLAlchemy Core metadata (generic, dialect-neutral types).

Only the catalog lives here. Per-collection row tables and vector indexes are created at run time by
the backend (named from the collection's integer id) and are excluded from Alembic's autogenerate in
``migrations/env.py``. Keep this file and the latest migration in step: a schema change is a new
revision under ``migrations/versions``.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: One row per collection: its definition, its logical clock, id allocator and lifetime counters.
collections = sa.Table(
    "memstore_collections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("key_dim", sa.Integer, nullable=False),
    sa.Column("value_dim", sa.Integer, nullable=False),
    sa.Column("metric", sa.String(16), nullable=False),
    sa.Column("lrfu_lambda", sa.Float, nullable=False),
    sa.Column("capacity", sa.BigInteger, nullable=True),
    sa.Column("index_kind", sa.String(32), nullable=False),
    sa.Column("oversample", sa.Integer, nullable=False),
    sa.Column("clock", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("next_id", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("inserts", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("novel_inserts", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("recombinations", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("evictions", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("searches", sa.BigInteger, nullable=False, server_default="0"),
    # Backend-private JSON (e.g. the SQLite backend's inner-product norm bound).
    sa.Column("index_state", sa.Text, nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

#: Counters that ``Collection.apply_changes(counters=...)`` and the store may add to.
COUNTERS = ("inserts", "novel_inserts", "recombinations", "evictions", "searches")
