"""kNN search: exact search equals numpy brute force for every metric (hypothesis), padding,
inner-product norm-bound growth, and the rescore indexes where they are exact by construction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import Store

_names = itertools.count()


@pytest.fixture(scope="module")
def mem_store():
    with Store("sqlite://") as s:
        yield s


def assert_matches_brute_force(result, queries, keys, metric, k, brute_force):
    """Distances equal the k smallest brute-force ones; each id really has its distance (ties ok)."""
    ref = brute_force(metric, queries, keys)
    n = keys.shape[0]
    c = min(k, n)
    scale = max(1.0, float(np.abs(ref).max()))
    tol = 2e-5 * scale + 1e-5
    np.testing.assert_allclose(
        result.distances[:, :c], np.sort(ref, axis=1)[:, :c], atol=tol, rtol=0
    )
    for row in range(len(queries)):
        ids = result.ids[row, :c]
        assert len(set(ids.tolist())) == c
        np.testing.assert_allclose(ref[row, ids], result.distances[row, :c], atol=tol, rtol=0)
        np.testing.assert_array_equal(result.keys[row, :c], keys[ids])
    assert (result.ids[:, c:] == -1).all() and np.isinf(result.distances[:, c:]).all()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    n=st.integers(1, 60),
    dim=st.integers(1, 12),
    m=st.integers(1, 4),
    k=st.integers(1, 70),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_exact_search_equals_brute_force(mem_store, brute_force, metric, n, dim, m, k, scale, seed):
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, dim)) * scale * rng.uniform(0.1, 2.0, (n, 1))).astype(
        np.float32
    )
    values = rng.standard_normal((n, 2)).astype(np.float32)
    queries = (rng.standard_normal((m, dim)) * scale).astype(np.float32)
    coll = mem_store.create_collection(f"h{next(_names)}", key_dim=dim, value_dim=2, metric=metric)
    ids = coll.insert(keys, values)
    result = coll.search(queries, k, touch=False)
    assert result.ids.shape == (m, k) and result.keys.shape == (m, k, dim)
    assert result.values.shape == (m, k, 2) and result.distances.dtype == np.float32
    assert_matches_brute_force(result, queries, keys, metric, k, brute_force)
    hit = result.ids[result.ids >= 0]
    np.testing.assert_array_equal(result.values[result.ids >= 0], values[np.searchsorted(ids, hit)])


@given(seed=st.integers(0, 2**16), growth=st.sampled_from([2.0, 10.0, 1000.0]))
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_ip_stays_exact_when_longer_keys_arrive(mem_store, brute_force, seed, growth):
    """The MIPS->L2 norm bound is raised (index rebuilt) when a longer key is inserted or updated."""
    rng = np.random.default_rng(seed)
    coll = mem_store.create_collection(f"ip{next(_names)}", key_dim=6, metric="ip")
    keys = rng.standard_normal((30, 6)).astype(np.float32)
    coll.insert(keys)
    longer = (rng.standard_normal((5, 6)) * growth).astype(np.float32)
    coll.insert(longer)
    all_keys = np.concatenate([keys, longer])
    queries = rng.standard_normal((3, 6)).astype(np.float32)
    assert_matches_brute_force(
        coll.search(queries, 8, touch=False), queries, all_keys, "ip", 8, brute_force
    )
    all_keys[2] = all_keys[2] * growth * 3
    coll.update([2], keys=all_keys[2:3])
    assert_matches_brute_force(
        coll.search(queries, 8, touch=False), queries, all_keys, "ip", 8, brute_force
    )


def test_padding_when_fewer_rows_than_k(store):
    coll = store.create_collection("p", key_dim=3, value_dim=2)
    coll.insert(np.eye(3, dtype=np.float32)[:2], np.ones((2, 2), np.float32))
    res = coll.search(np.ones((2, 3), np.float32), 5)
    assert (res.ids[:, 2:] == -1).all() and np.isinf(res.distances[:, 2:]).all()
    assert (res.keys[:, 2:] == 0).all() and (res.values[:, 2:] == 0).all()
    assert (res.ids[:, :2] >= 0).all()


def test_search_on_empty_collection_is_all_padding(store):
    coll = store.create_collection("e", key_dim=3)
    res = coll.search(np.ones((1, 3), np.float32), 2)
    assert res.ids.tolist() == [[-1, -1]] and np.isinf(res.distances).all()


@pytest.mark.parametrize("index", ["rescore-bit", "rescore-int8"])
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_rescore_index_is_exact_when_oversampling_covers_all_rows(
    store, brute_force, rng, index, metric
):
    """With k*oversample >= rows every row is rescored exactly, so results equal brute force; this
    also exercises the zero-padding to a multiple of 8 dimensions (key_dim 5, ip -> 6)."""
    coll = store.create_collection("r", key_dim=5, metric=metric, index=index, oversample=8)
    keys = rng.standard_normal((40, 5)).astype(np.float32)
    coll.insert(keys)
    queries = rng.standard_normal((4, 5)).astype(np.float32)
    assert_matches_brute_force(
        coll.search(queries, 6, touch=False), queries, keys, metric, 6, brute_force
    )


def test_rescore_bit_is_approximate_but_useful_on_clustered_data(store, rng):
    """Beyond exactness: on clustered data at d=64 the bit index still finds most neighbours."""
    centers = rng.standard_normal((20, 64)).astype(np.float32) * 4
    keys = (centers[rng.integers(0, 20, 3000)] + rng.standard_normal((3000, 64))).astype(np.float32)
    coll = store.create_collection("b", key_dim=64, index="rescore-bit", oversample=16)
    coll.insert(keys)
    queries = keys[:20] + 0.1 * rng.standard_normal((20, 64)).astype(np.float32)
    res = coll.search(queries, 10, touch=False)
    exact = np.argsort(np.linalg.norm(queries[:, None] - keys[None], axis=-1), axis=1)[:, :10]
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), exact.tolist(), strict=True)]
    )
    assert recall >= 0.5


def test_k_beyond_sqlite_vec_limit_falls_back_to_exact_scan(store, brute_force, rng):
    """sqlite-vec refuses k > 4096; the backend then scans the row table exactly."""
    coll = store.create_collection("big_k", key_dim=3, metric="ip")
    keys = rng.standard_normal((4200, 3)).astype(np.float32)
    coll.insert(keys)
    queries = rng.standard_normal((2, 3)).astype(np.float32)
    assert_matches_brute_force(
        coll.search(queries, 4150, touch=False), queries, keys, "ip", 4150, brute_force
    )


def test_a_one_dimensional_query_is_one_row(store, rng):
    """A 1-D query of length key_dim (``q`` rather than ``q[None]``) is answered as a batch of one:
    the same (1, k) arrays as the 2-D form, and it counts as one touching search. With ``novel``,
    1-D ``novel_values`` go with it."""
    coll = store.create_collection("one", key_dim=4, value_dim=2)
    keys = rng.standard_normal((6, 4)).astype(np.float32)
    coll.insert(keys, rng.standard_normal((6, 2)).astype(np.float32))
    q = rng.standard_normal(4).astype(np.float32)
    flat, batch = coll.search(q, 3, touch=False), coll.search(q[None], 3, touch=False)
    for field in ("ids", "distances", "keys", "values"):
        np.testing.assert_array_equal(getattr(flat, field), getattr(batch, field))
    assert flat.ids.shape == (1, 3) and flat.keys.shape == (1, 3, 4)
    coll.search(q.tolist(), 3)  # a plain list too
    assert coll.stats()["searches"] == 1
    far = np.full(4, 50.0, np.float32)
    res = coll.search(far, 1, novel=1.0, novel_values=np.array([7.0, 8.0], np.float32))
    assert res.changes["novel_inserts"] == 1 and res.ids.shape == (1, 1)
    np.testing.assert_array_equal(res.values[0, 0], [7.0, 8.0])
