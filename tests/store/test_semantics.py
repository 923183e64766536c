"""One semantics, many implementations: the numpy references (memstore.distances, memstore.lrfu,
memstore.recombine) against their SQL mirrors on every backend, through the public Collection API.

* distances: the reference itself against the textbook formulas; every backend's kNN distances
  against the reference;
* LRFU: arbitrary stored states (written with apply_changes, some rows ahead of the clock), then
  touching searches; the effective state read back (export_rows), peek scores, eviction order and
  score summary equal :func:`memstore.lrfu.touch` applied batch by batch. On SQLite this covers the
  append-only touch log folded in closed form (folding every 1 or 3 hits, or never);
* recombination: the store's merges equal :func:`memstore.recombine.plan_merges` applied to the rows
  as they were.

Backends: SQLite, and PostgreSQL on the session database of tests/pg_fixture.py (skipped where no
server can start, unless CI; ``MEMSTORE_STORE_TESTS_PG=0`` runs SQLite only). Example counts are
small: each property takes a second or two.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import RowBlock, Store, lrfu
from memstore.backends import sqlite_lrfu
from memstore.distances import distances, pairwise_distances
from memstore.recombine import merged_rows, plan_merges
from memstore.types import SearchResult

_names = itertools.count()


class _Collection:
    """A uniquely named collection, dropped afterwards (hypothesis runs many per test)."""

    def __init__(self, store: Store, **options) -> None:
        self.store = store
        self.name = f"semantics_{os.getpid()}_{next(_names)}"
        self.coll = store.create_collection(self.name, **options)

    def __enter__(self):
        return self.coll

    def __exit__(self, *exc) -> None:
        self.store.drop_collection(self.name)


# ------------------------------------------------------------------------------ distances
def _textbook(metric: str, q: list[float], k: list[float]) -> float:
    dot = sum(a * b for a, b in zip(q, k, strict=True))
    if metric == "l2":
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(q, k, strict=True)))
    if metric == "cosine":
        nq = math.sqrt(sum(a * a for a in q))
        nk = math.sqrt(sum(b * b for b in k))
        return 1.0 - (dot / (nq * nk) if nq * nk else 0.0)
    return -dot


vectors = st.lists(st.floats(-4, 4, allow_subnormal=False, width=32), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    a=st.lists(vectors, min_size=1, max_size=4),
    b=st.lists(vectors, min_size=1, max_size=4),
)
def test_distance_reference_is_the_documented_convention(metric, a, b):
    got = pairwise_distances(metric, np.array(a, np.float32), np.array(b, np.float32))
    want = [[_textbook(metric, q, k) for k in b] for q in a]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    paired = distances(metric, np.array(a, np.float32)[:, None, :], np.array(b, np.float32)[None])
    np.testing.assert_array_equal(paired, got)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    k=st.integers(1, 6),
)
def test_backend_knn_distances_mirror_the_reference(shared_store, metric, seed, n, k):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, 4)).astype(np.float32)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    with _Collection(shared_store, key_dim=4, metric=metric) as coll:
        ids = coll.insert(keys)
        res = coll.search(queries, k, touch=False)
    want = np.sort(pairwise_distances(metric, queries, keys), axis=1)[:, :k]
    found = min(k, n)
    np.testing.assert_allclose(res.distances[:, :found], want[:, :found], rtol=1e-5, atol=1e-5)
    assert (res.ids[:, found:] == -1).all() and np.isinf(res.distances[:, found:]).all()
    # each returned distance is the reference distance of the returned row
    at = np.searchsorted(ids, res.ids[:, :found])
    own = np.take_along_axis(pairwise_distances(metric, queries, keys), at, axis=1)
    np.testing.assert_allclose(res.distances[:, :found], own, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- LRFU
N_ROWS = 6


def one_hot(targets: list[int]) -> np.ndarray:
    q = np.zeros((len(targets), N_ROWS), np.float32)
    q[np.arange(len(targets)), targets] = 1.0
    return q


def assert_eviction_order(got, ids, crf, last_tick, now, lam) -> None:
    """``got`` is :func:`memstore.lrfu.eviction_order`, up to float noise between distinct states
    whose keys are mathematically equal (e.g. crf 2 at tick 3 vs crf 1 at tick 4, lambda 1): keys
    ascend; rows whose states are identical come by id."""
    assert sorted(got.tolist()) == sorted(ids.tolist())
    pos = {int(i): p for p, i in enumerate(ids.tolist())}
    at = np.array([pos[int(i)] for i in got.tolist()], np.int64)
    key = lrfu.order_key(crf, last_tick, now, lam)[at]
    assert (np.diff(key) >= -1e-9 * np.maximum(1.0, np.abs(key[1:]))).all()
    ref = lrfu.eviction_order(ids, crf, last_tick, now, lam).tolist()
    for i, j in itertools.combinations(range(len(ids)), 2):
        if crf[i] == crf[j] and last_tick[i] == last_tick[j]:
            a, b = int(ids[i]), int(ids[j])
            assert (got.tolist().index(a) < got.tolist().index(b)) == (ref.index(a) < ref.index(b))


lrfu_states = st.lists(
    st.tuples(
        st.floats(1.0, 40.0),  # crf (>= 1: every row was referenced once)
        st.integers(0, 12),  # last_tick (some ahead of the clock)
        st.integers(0, 5),  # hits
    ),
    min_size=N_ROWS,
    max_size=N_ROWS,
)
batches = st.lists(
    st.tuples(
        st.integers(0, 4),  # ticks after the previous batch (0: the same tick again)
        st.lists(st.integers(0, N_ROWS - 1), min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lam=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    clock=st.integers(0, 8),
    states=lrfu_states,
    tie=st.booleans(),
    plan=batches,
    fold_at=st.sampled_from([1, 3, 8192]),
)
def test_backend_lrfu_state_mirrors_the_reference(
    shared_store, lam, clock, states, tie, plan, fold_at
):
    if tie:  # two rows in exactly the same state: ties are broken by id everywhere
        states = list(states)
        states[1] = states[0]
    crf = np.array([s[0] for s in states], np.float64)
    last = np.array([s[1] for s in states], np.int64)
    hits = np.array([s[2] for s in states], np.int64)
    ids = np.arange(N_ROWS, dtype=np.int64)
    saved, sqlite_lrfu.FOLD_AT = sqlite_lrfu.FOLD_AT, fold_at
    try:
        with _Collection(shared_store, key_dim=N_ROWS, metric="ip", lrfu_lambda=lam) as coll:
            keys = np.eye(N_ROWS, dtype=np.float32) * 10  # query e_i hits row i first
            block = RowBlock(ids, keys, keys.copy(), crf, last, hits, np.minimum(last, clock))
            coll.apply_changes(block, clock=clock)
            now = clock
            for gap, targets in plan:
                now += gap
                coll.search(one_hot(targets), 1, tick=now)
                counts = np.bincount(targets, minlength=N_ROWS)
                crf, last, hits = lrfu.touch(crf, last, hits, counts, now, lam)
            rows = coll.export_rows()
            peek = coll.peek(N_ROWS)
            order = coll.evict(0, dry_run=True)
            summary = coll.stats()["score"]
    finally:
        sqlite_lrfu.FOLD_AT = saved
    assert rows.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(rows.crf, crf, rtol=1e-10)
    assert rows.last_tick.tolist() == last.tolist() and rows.hits.tolist() == hits.tolist()
    key = lrfu.order_key(crf, last, now, lam)
    assert_eviction_order(order, ids, crf, last, now, lam)
    assert [p["id"] for p in peek] == order.tolist()
    np.testing.assert_allclose([p["score"] for p in peek], key[order], rtol=1e-9, atol=1e-9)
    assert summary["min"] == pytest.approx(key.min())
    assert summary["max"] == pytest.approx(key.max())
    assert summary["mean"] == pytest.approx(key.mean())


def test_touch_reference_handles_hits_older_than_the_row():
    """A hit at 5 on a row last referenced at 10 counts as of 10, decayed, on every backend."""
    crf, last, hits = lrfu.touch([3.0, 3.0], [10, 2], [0, 0], [1, 1], 5, 0.5)
    assert crf.tolist() == [3.0 + 2**-2.5, 1 + 3.0 * 2**-1.5]
    assert last.tolist() == [10, 5] and hits.tolist() == [1, 1]
    # rows without hits are left exactly as they are
    crf, last, hits = lrfu.touch([3.0], [2], [4], [0], 5, 0.5)
    assert (crf.tolist(), last.tolist(), hits.tolist()) == ([3.0], [2], [4])


# ------------------------------------------------------------------------- recombination
def test_merge_reference_decays_crf_to_the_newest_member_and_keeps_the_nearest_id():
    rows = RowBlock(
        ids=np.array([4, 7, 9]),
        keys=np.array([[0.0, 0], [0.1, 0], [9, 9]], np.float32),
        values=np.array([[1.0], [3.0], [5.0]], np.float32),
        crf=np.array([2.0, 4.0, 1.0]),
        last_tick=np.array([6, 2, 0]),
        hits=np.array([3, 5, 0]),
        created_tick=np.array([1, 0, 0]),
    )
    result_ids = np.array([[7, 4, 9]])  # row 7 is the nearest hit of the query
    result_d = np.array([[0.05, 0.06, 12.0]], np.float32)
    result = SearchResult(result_ids, result_d, np.zeros((1, 3, 2)), np.zeros((1, 3, 1)))
    (group,) = plan_merges(result, rows, threshold=0.1, lam=0.5)
    assert group.keeper == 7 and group.removed.tolist() == [4]
    assert group.crf == pytest.approx(4.0 * 2 ** (-0.5 * 4) + 2.0)  # not 6
    assert (group.last_tick, group.hits, group.created_tick) == (6, 8, 0)
    w = np.exp(-np.array([0.05, 0.06], np.float64))
    w /= w.sum()
    np.testing.assert_allclose(group.value, [w[0] * 3 + w[1] * 1], rtol=1e-6)
    assert merged_rows([group]).ids.tolist() == [7]


def _clustered_rows(rng, clusters: int, per: int, dim: int) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)) * 4
    noise = rng.standard_normal((clusters, per, dim)) * 0.03
    return (centres[:, None, :] + noise).reshape(clusters * per, dim).astype(np.float32)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    lam=st.sampled_from([0.0, 0.5, 1.0]),
    touch=st.booleans(),
    k=st.integers(2, 5),
)
def test_store_merges_equal_the_reference_plan(shared_store, seed, lam, touch, k):
    rng = np.random.default_rng(seed)
    keys = _clustered_rows(rng, 4, 3, 3)
    n = len(keys)
    queries = keys[rng.choice(n, 3, replace=False)] + 0.01
    with _Collection(shared_store, key_dim=3, value_dim=2, metric="l2", lrfu_lambda=lam) as coll:
        block = RowBlock(
            ids=np.arange(n, dtype=np.int64),
            keys=keys,
            values=rng.standard_normal((n, 2)).astype(np.float32),
            crf=rng.uniform(1, 5, n),
            last_tick=rng.integers(0, 6, n),
            hits=rng.integers(0, 4, n),
            created_tick=np.zeros(n, np.int64),
        )
        coll.apply_changes(block, clock=6)
        before = coll.search(queries, k, touch=False)
        if touch:  # the search's own touch comes first, at tick 7
            counts = np.bincount(before.ids[before.ids >= 0], minlength=n)
            block.crf, block.last_tick, block.hits = lrfu.touch(
                block.crf, block.last_tick, block.hits, counts, 7, lam
            )
        groups = plan_merges(before, block, 0.5, lam)
        res = coll.search(queries, k, touch=touch, recombine=0.5)
        after = coll.export_rows()
        again = coll.search(queries, k, touch=False)
    assert res.changes["recombinations"] == len(groups)
    gone = np.concatenate([g.removed for g in groups]) if groups else np.zeros(0, np.int64)
    keep = ~np.isin(block.ids, gone)
    assert after.ids.tolist() == block.ids[keep].tolist()  # keepers keep their ids, no new ids
    expected = block.take(keep)
    if groups:
        merged = merged_rows(groups)
        at = np.searchsorted(expected.ids, merged.ids)
        for name in ("keys", "values", "crf", "last_tick", "hits", "created_tick"):
            getattr(expected, name)[at] = getattr(merged, name)
    for name in ("keys", "values", "crf"):
        np.testing.assert_allclose(getattr(after, name), getattr(expected, name), rtol=1e-6)
    for name in ("last_tick", "hits", "created_tick"):
        assert getattr(after, name).tolist() == getattr(expected, name).tolist(), name
    # the returned result is the search after the merges
    np.testing.assert_array_equal(res.ids, again.ids)
    np.testing.assert_allclose(res.distances, again.distances, rtol=1e-6)
