"""Recombination and novelty (docs/design.md, Recombination and novelty): merged rows, counters, consistency, atomicity."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import errors
from memstore.recombine import softmax_weights


@pytest.fixture
def clustered(store):
    """Rows 0,1,2 near (1,0,0); rows 3,4 near (0,10,0); row 5 alone."""
    coll = store.create_collection("r", key_dim=3, value_dim=2, metric="l2", lrfu_lambda=0.5)
    keys = np.array(
        [[1, 0, 0], [1.05, 0, 0], [0.95, 0.02, 0], [0, 10, 0], [0, 10.1, 0], [-20, 0, 0]],
        np.float32,
    )
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    coll.insert(keys, values)
    return coll, keys, values


def test_recombine_merges_near_duplicates(clustered, index_consistent):
    coll, keys, values = clustered
    coll.search(np.array([[1, 0, 0]], np.float32), 2, tick=3)  # touch rows 0 and 1 first
    before = coll.export_rows()
    query = np.array([[1.0, 0.0, 0.0]], np.float32)
    res = coll.search(query, 5, recombine=0.2, tick=4)
    assert res.changes == {"recombinations": 1, "novel_inserts": 0}
    rows = coll.export_rows()
    assert rows.ids.tolist() == [0, 3, 4, 5]  # 0,1,2 replaced by one row keeping 0 (the nearest)
    d = np.linalg.norm(keys[:3] - query, axis=1)
    w = softmax_weights(d)
    merged = rows.take(np.array([0]))
    np.testing.assert_allclose(merged.keys[0], (w[:, None] * keys[:3]).sum(0), rtol=1e-5)
    np.testing.assert_allclose(merged.values[0], (w[:, None] * values[:3]).sum(0), rtol=1e-5)
    # LRFU state: the batch's own touch at tick 4 first, then crf/hits summed, max/min ticks
    touched = before.take(np.array([0, 1, 2]))
    crf_after_touch = 1 + 2.0 ** (-0.5 * (4 - touched.last_tick)) * touched.crf
    assert merged.crf[0] == pytest.approx(crf_after_touch.sum())
    assert merged.hits[0] == touched.hits.sum() + 3
    assert merged.last_tick[0] == 4 and merged.created_tick[0] == 0
    assert res.ids[0, 0] == 0  # the answer is re-searched after the merge
    assert coll.stats()["recombinations"] == 1 and index_consistent(coll)


def test_recombine_groups_do_not_overlap_within_a_batch(clustered, index_consistent):
    coll, _, _ = clustered
    queries = np.array([[1, 0, 0], [1.01, 0, 0], [0, 10, 0]], np.float32)
    res = coll.search(queries, 3, recombine=0.5)
    assert res.changes["recombinations"] == 2  # {0,1,2} once, {3,4} once
    assert len(coll) == 3 and index_consistent(coll)


def test_novel_queries_are_inserted_once(clustered, index_consistent):
    coll, _, _ = clustered
    far = np.array([[50, 50, 50], [50, 50, 50.01], [1, 0, 0]], np.float32)
    res = coll.search(far, 1, novel=1.0, novel_values=np.ones((3, 2), np.float32))
    assert res.changes == {"recombinations": 0, "novel_inserts": 1}
    assert len(coll) == 7 and index_consistent(coll)
    row = coll.get([6])
    np.testing.assert_array_equal(row.keys[0], far[0])
    np.testing.assert_array_equal(row.values[0], [1, 1])
    assert res.ids[0, 0] == 6 and res.ids[1, 0] == 6
    stats = coll.stats()
    assert stats["novel_inserts"] == 1 and stats["inserts"] == 7


def test_novelty_fills_an_empty_collection(store):
    coll = store.create_collection("empty", key_dim=2)
    res = coll.search(np.array([[1, 2]], np.float32), 1, novel=0.5)
    assert len(coll) == 1 and res.ids.tolist() == [[0]] and res.distances[0, 0] == 0


def test_novelty_needs_values_when_dims_differ(clustered):
    coll, _, _ = clustered
    with pytest.raises(errors.InvalidInputError, match="novel_values"):
        coll.search(np.array([[9, 9, 9]], np.float32), 1, novel=0.1)


def test_recombination_is_atomic(clustered, monkeypatch):
    coll, _, _ = clustered
    before = coll.export_rows()
    stats = coll.stats()

    def boom(*args, **kwargs):
        raise RuntimeError("crash between delete and insert")

    monkeypatch.setattr(coll.store.backend, "insert_rows", boom)
    with pytest.raises(RuntimeError):
        coll.search(np.array([[1, 0, 0]], np.float32), 3, recombine=0.5)
    monkeypatch.undo()
    after = coll.export_rows()
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.crf, before.crf)
    assert coll.stats() == stats


def test_recombine_method_merges_without_touching(clustered, index_consistent):
    coll, _, _ = clustered
    clock = coll.clock
    assert coll.recombine(np.array([[0, 10, 0]], np.float32), threshold=0.5, k=4) == 1
    assert len(coll) == 5 and coll.clock == clock and index_consistent(coll)
    merged = coll.get([3])  # row 3 is the nearest of {3, 4} to the query: it keeps its id
    assert merged.hits[0] == 0 and merged.crf[0] == pytest.approx(2.0)  # two fresh rows, crf 1 each


def test_result_sees_a_merged_row_that_came_nearer_to_another_query(store):
    """Query 2 hit none of the merged rows, but their weighted mean is nearer to it than its
    second hit was: the returned result must be the search after the merge."""
    coll = store.create_collection("near", key_dim=2, metric="l2")
    a, b, c, d = [0.0, 0.0], [0.21, 0.0], [0.1, 2.003], [0.1, 1.5]
    coll.insert(np.array([a, b, c, d], np.float32))
    queries = np.array([[0.1, 0.0], [0.1, 1.0]], np.float32)
    before = coll.search(queries, 2, touch=False)
    assert before.ids.tolist() == [[0, 1], [3, 2]]  # query 2's hits: d, then c at 1.003
    res = coll.search(queries, 2, touch=False, recombine=0.15)
    assert res.changes["recombinations"] == 1 and coll.export_rows().ids.tolist() == [0, 2, 3]
    assert res.ids.tolist() == [[0, 3], [3, 0]]  # the merged row 0 (~(0.105, 0)) beats c
    again = coll.search(queries, 2, touch=False)
    np.testing.assert_array_equal(res.ids, again.ids)
    np.testing.assert_allclose(res.distances, again.distances)


def test_merged_crf_is_decayed_to_the_newest_member(store):
    """crf is stored as of last_tick: an old member's crf counts decayed, not as if it were new."""
    coll = store.create_collection("decay", key_dim=2, metric="l2", lrfu_lambda=0.5)
    coll.insert(np.array([[0, 0], [0.1, 0], [5, 5]], np.float32))  # crf 1 at tick 0
    coll.search(np.array([[0.1, 0]], np.float32), 1, tick=4)  # row 1: crf 1 + 2^-2, tick 4
    assert coll.recombine(np.array([[0.09, 0]], np.float32), threshold=0.2, k=3) == 1
    row = coll.get([1])  # the nearest member (row 1) keeps its id
    assert len(coll) == 2 and row.last_tick[0] == 4 and row.hits[0] == 1
    assert row.crf[0] == pytest.approx((1 + 2**-2) + 1 * 2 ** (-0.5 * 4))
