"""Rows may store their key only in the index, and a value equal to its key only once.

Revision ID: 0002_keys_stored_once
Revises: 0001_initial
Create Date: 2026-12-02

The catalog is unchanged; what changed is what a SQLite row may hold (see
``memstore.backends.sqlite``): an indexed collection's ``rows_<id>.key`` is the empty blob, its key
living only in ``vec_<id>``, and a value bit for bit equal to its key is the empty blob too. This
code reads both layouts, so the upgrade rewrites no row. The revision exists for the other
direction: a memstore older than this change would read an empty key blob as a zero-length array
and fail with a reshape error (or worse) on a file written now, so such a file must carry a
revision an older memstore does not know, which it refuses in one line (``SchemaTooNewError``).
"""

from __future__ import annotations

revision = "0002_keys_stored_once"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to rewrite: rows of the old layout stay valid under this code's readers."""


def downgrade() -> None:
    """Refused: rows written under this revision cannot be read by 0001's code."""
    raise NotImplementedError(
        "0002_keys_stored_once cannot be downgraded: rows written since keep their key only in the "
        "index, which memstore before this revision cannot read"
    )
