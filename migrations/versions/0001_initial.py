"""Initial catalog schema: the memstore_collections table.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memstore_collections",
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
        sa.Column("index_state", sa.Text, nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("memstore_collections")
