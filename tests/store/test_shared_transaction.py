"""``store.transaction()`` around ``apply_changes`` calls: several collections change in one atomic commit.

The seam a training checkpoint needs (every memory layer's rows and the checkpoint's stamp commit
together, or none of them do); tested on both backends like the rest of the store contract.
"""

from __future__ import annotations

import numpy as np
import pytest

from memstore import RowBlock


def _rows(ids, value: float) -> RowBlock:
    n = len(ids)
    return RowBlock.fresh(
        np.asarray(ids, np.int64),
        np.full((n, 3), value, np.float32),
        np.full((n, 3), value, np.float32),
        tick=0,
    )


def test_changes_to_two_collections_commit_together(store):
    a = store.create_collection("a", key_dim=3)
    b = store.create_collection("b", key_dim=3)
    with store.transaction():
        a.apply_changes(_rows([0, 1], 1.0), clock=4)
        b.apply_changes(_rows([0], 2.0), clock=5, counters={"inserts": 1})
    assert (len(a), len(b), a.clock, b.clock) == (2, 1, 4, 5)
    assert b.stats()["inserts"] == 1


def test_a_failed_shared_transaction_changes_no_collection(store):
    a = store.create_collection("a", key_dim=3)
    b = store.create_collection("b", key_dim=3)
    a.apply_changes(_rows([0], 1.0), clock=1)
    b.apply_changes(_rows([0], 1.0), clock=1)
    with pytest.raises(RuntimeError, match="killed half-way"):
        with store.transaction():
            a.apply_changes(_rows([0, 1], 9.0), clock=7)
            b.apply_changes(_rows([5], 9.0), clock=7)
            raise RuntimeError("killed half-way")
    for coll in (a, b):
        rows = coll.export_rows()
        assert rows.ids.tolist() == [0] and coll.clock == 1
        assert np.all(rows.keys == 1.0)
