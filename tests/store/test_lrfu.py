"""LRFU: stored state and eviction order equal the reference formula (docs/design.md, LRFU), including the
LFU (lambda=0) and LRU (lambda=1) limits, large ticks, and eviction keeping rows and index in step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import RowBlock, Store, errors
from memstore.backends import sqlite_lrfu


def reference_scores(hit_ticks: dict[int, list[int]], now: int, lam: float) -> dict[int, float]:
    """log2 of sum over references t of 2^(-lam (now - t)) -- the LRFU definition, summed directly."""
    return {
        i: float(np.log2(sum(2.0 ** (-lam * (now - t)) for t in ticks)))
        for i, ticks in hit_ticks.items()
    }


def one_hot_queries(ids, dim):
    q = np.zeros((len(ids), dim), np.float32)
    q[np.arange(len(ids)), ids] = 1.0
    return q


def make_collection(store, name, lam, n):
    coll = store.create_collection(name, key_dim=n, metric="ip", lrfu_lambda=lam)
    coll.insert(np.eye(n, dtype=np.float32) * 10)  # query e_i hits row i first
    return coll


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fold_at=st.sampled_from([1, 3, 8192]),
    lam=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    batches=st.lists(
        st.tuples(st.integers(1, 5), st.lists(st.integers(0, 7), min_size=1, max_size=6)),
        min_size=1,
        max_size=8,
    ),
)
def test_state_and_order_equal_reference(fold_at, lam, batches):
    """Also across folds of the SQLite backend's pending-hit log (folded every ``fold_at`` hits)."""
    n = 8
    saved, sqlite_lrfu.FOLD_AT = sqlite_lrfu.FOLD_AT, fold_at
    try:
        _check_against_reference(lam, batches, n)
    finally:
        sqlite_lrfu.FOLD_AT = saved


def _check_against_reference(lam, batches, n):
    with Store("sqlite://") as store:
        coll = make_collection(store, "l", lam, n)
        hits = {i: [0] for i in range(n)}  # insertion at tick 0 counts as the first reference
        now = 0
        for gap, targets in batches:
            now += gap
            coll.search(one_hot_queries(targets, n), 1, tick=now)
            for t in targets:
                hits[t].append(now)
        assert coll.clock == now
        ref = reference_scores(hits, now, lam)
        rows = coll.export_rows()
        stored = np.log2(rows.crf) - lam * (now - rows.last_tick)
        np.testing.assert_allclose(stored, [ref[i] for i in rows.ids.tolist()], rtol=0, atol=1e-9)
        assert rows.hits.tolist() == [len(hits[i]) - 1 for i in rows.ids.tolist()]
        order = coll.evict(0, dry_run=True)
        ref_keys = np.array([ref[i] for i in order.tolist()])
        assert (np.diff(ref_keys) >= -1e-9).all()  # ascending reference score
        assert sorted(order.tolist()) == list(range(n)) and len(coll) == n


def test_lambda_zero_is_lfu_and_lambda_one_is_lru():
    with Store("sqlite://") as store:
        lfu = make_collection(store, "lfu", 0.0, 4)
        lru = make_collection(store, "lru", 1.0, 4)
        # row 0: 3 hits early; row 1: 1 hit late; row 2: 2 hits middle; row 3: never hit
        schedule = [(1, [0]), (2, [0]), (3, [0, 2]), (4, [2]), (9, [1])]
        for tick, targets in schedule:
            for coll in (lfu, lru):
                coll.search(one_hot_queries(targets, 4), 1, tick=tick)
        assert lfu.evict(0, dry_run=True).tolist() == [3, 1, 2, 0]  # fewest hits first
        assert lru.evict(0, dry_run=True).tolist() == [3, 0, 2, 1]  # least recent first


def test_large_ticks_do_not_overflow():
    with Store("sqlite://") as store:
        coll = make_collection(store, "big", 1.0, 3)
        coll.search(one_hot_queries([0], 3), 1, tick=10**12)
        coll.search(one_hot_queries([1], 3), 1, tick=2 * 10**12)
        rows = coll.export_rows()
        assert np.isfinite(rows.crf).all()
        assert coll.evict(0, dry_run=True).tolist() == [2, 0, 1]
        assert np.isfinite(coll.stats()["score"]["min"])


def test_evict_to_capacity_removes_lowest_rows_and_index_entries(store, index_consistent):
    coll = store.create_collection("e", key_dim=5, metric="ip", lrfu_lambda=0.5, capacity=3)
    coll.insert(np.eye(5, dtype=np.float32))
    coll.search(one_hot_queries([4, 4, 1, 3], 5), 1)
    coll.search(one_hot_queries([4], 5), 1)
    preview = coll.evict(dry_run=True)
    assert len(coll) == 5 and preview.tolist() == [0, 2]
    evicted = coll.evict()  # default: the collection's capacity
    assert evicted.tolist() == [0, 2] and len(coll) == 3
    assert coll.stats()["evictions"] == 2 and index_consistent(coll)
    res = coll.search(np.eye(5, dtype=np.float32), 5, touch=False)
    assert set(res.ids[res.ids >= 0].tolist()) == {1, 3, 4}
    assert coll.evict().tolist() == []  # already within capacity


def test_evict_by_min_score(store, index_consistent):
    coll = store.create_collection("m", key_dim=3, metric="ip", lrfu_lambda=1.0)
    coll.insert(np.eye(3, dtype=np.float32))
    coll.search(one_hot_queries([2], 3), 1, tick=10)
    # scores at now=10: rows 0,1 -> log2(1) - 10 = -10; row 2 -> log2(1 + 2^-10) ~ 0
    assert coll.evict(min_score=-5).tolist() == [0, 1]
    assert coll.export_rows().ids.tolist() == [2] and index_consistent(coll)


def test_evict_argument_errors(store):
    coll = store.create_collection("x", key_dim=2)
    with pytest.raises(errors.InvalidInputError, match="capacity"):
        coll.evict()
    with pytest.raises(errors.InvalidInputError):
        coll.evict(-1)
    with pytest.raises(errors.InvalidInputError):
        coll.evict(min_score=float("nan"))


def test_search_without_touch_changes_nothing(store):
    coll = make_collection(store, "t", 0.5, 3)
    coll.search(one_hot_queries([0], 3), 1, touch=False)
    assert coll.clock == 0 and coll.export_rows().hits.tolist() == [0, 0, 0]


def test_tick_before_clock_is_rejected(store):
    coll = make_collection(store, "c", 0.5, 3)
    coll.search(one_hot_queries([0], 3), 1, tick=5)
    with pytest.raises(errors.InvalidInputError, match="before"):
        coll.search(one_hot_queries([0], 3), 1, tick=4)


def test_replacing_a_row_discards_its_pending_hits(store):
    """apply_changes gives a row its full LRFU state; hits logged before must not be added."""
    coll = make_collection(store, "r", 0.5, 3)
    coll.search(one_hot_queries([0, 0, 1], 3), 1, tick=4)
    row = coll.get([0])
    assert row.hits.tolist() == [2]
    replaced = RowBlock(
        ids=row.ids,
        keys=row.keys,
        values=row.values,
        crf=np.array([7.0]),
        last_tick=np.array([4]),
        hits=np.array([9]),
        created_tick=np.array([1]),
    )
    coll.apply_changes(replaced)
    again = coll.get([0, 1])
    assert again.crf.tolist()[0] == 7.0 and again.hits.tolist() == [9, 1]
    coll.search(one_hot_queries([0], 3), 1, tick=6)
    assert coll.get([0]).crf[0] == pytest.approx(1 + 2.0 ** (-0.5 * 2) * 7.0)
