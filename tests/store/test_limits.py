"""Numbers at the edges: k, 64-bit integers and float32 range get clear InvalidInputErrors (never a
MemoryError, an OverflowError from the driver, or +inf distances that look like padding), and a
rejected call changes nothing. On SQLite and PostgreSQL (``store``, tests/store/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store, errors
from memstore.types import RowBlock
from memstore.validation import INT64_MAX, MAX_DIM, MAX_K, MAX_NORM

BIG = [2**63, 2**64, 10**30]


@pytest.fixture
def coll(store):
    c = store.create_collection("c", key_dim=4, capacity=10)
    c.insert(np.eye(4, dtype=np.float32))
    return c


def test_k_is_capped_and_padding_is_kept(coll):
    q = np.ones((2, 4), np.float32)
    for k in (MAX_K + 1, 10**9, 2**64):
        with pytest.raises(errors.InvalidInputError, match=f"k must be at most {MAX_K}") as info:
            coll.search(q, k)
        assert info.value.parameter == "k"
    res = coll.search(q, 6, touch=False)  # below the cap, fewer rows than k: padded as documented
    assert res.ids.shape == (2, 6) and (res.ids[:, 4:] == -1).all()
    assert np.isinf(res.distances[:, 4:]).all()
    assert coll.stats()["searches"] == 0 and coll.clock == 0


@pytest.mark.parametrize("value", BIG)
def test_integers_beyond_int64_are_refused_by_name(store, coll, value):
    q = np.ones((1, 4), np.float32)
    calls = {
        "tick": lambda: coll.search(q, 1, tick=value),
        "clock": lambda: coll.apply_changes(clock=value),
        "counters['searches']": lambda: coll.apply_changes(counters={"searches": value}),
        "capacity": lambda: coll.evict(value),
        "ids": lambda: coll.get([1, value]),
        "n": lambda: coll.peek(value),
    }
    for name, call in calls.items():
        with pytest.raises(errors.InvalidInputError, match="2\\*\\*63 - 1") as info:
            call()
        assert str(info.value).startswith(name), (name, info.value)
    for option in ("capacity", "oversample", "key_dim", "value_dim"):
        options = {"key_dim": 4, option: value}
        with pytest.raises(errors.InvalidInputError, match=f"{option} must be at most 2"):
            store.create_collection("d", **options)
    with pytest.raises(errors.InvalidInputError, match="ids must be at most"):
        coll.delete(np.array([3, 2**63 + 5], np.uint64))  # would wrap round to a negative id
    assert not store.has_collection("d")
    assert coll.stats()["clock"] == 0 and len(coll) == 4


def test_the_clock_stops_at_int64_max(coll):
    q = np.ones((1, 4), np.float32)
    coll.search(q, 1, tick=INT64_MAX)
    with pytest.raises(errors.InvalidInputError, match="clock is at 2\\*\\*63 - 1"):
        coll.search(q, 1)
    assert coll.clock == INT64_MAX
    with pytest.raises(errors.InvalidInputError, match="upserts.ids must be below"):
        block = RowBlock.fresh(
            np.array([INT64_MAX]), np.ones((1, 4), np.float32), np.ones((1, 4), np.float32), 0
        )
        coll.apply_changes(block)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_vectors_whose_distances_could_overflow_float32_are_refused(store, metric):
    """Keys and queries longer than MAX_NORM (2**62) are refused on the way in, so no distance
    can overflow float32 (3e38 and -3e38 are 6e38 apart; their inner product is -3.6e77, which
    came back as a -inf ip distance). Vectors at the bound give finite distances everywhere."""
    coll = store.create_collection("big", key_dim=4, metric=metric)
    huge = np.full((1, 4), 3e38, np.float32)
    with pytest.raises(errors.InvalidInputError, match="above the limit 2\\*\\*62"):
        coll.insert(huge)
    assert len(coll) == 0
    edge = np.array([[MAX_NORM, 0, 0, 0], [0, -MAX_NORM, 0, 0]], np.float32)
    coll.insert(edge)
    for query in (-edge[:1], edge[1:], np.ones((1, 4), np.float32)):
        res = coll.search(query, 2)
        assert np.isfinite(res.distances).all(), (metric, query, res.distances)
    with pytest.raises(errors.InvalidInputError, match="queries row 0 has norm 6e\\+38"):
        coll.search(-huge, 2)
    with pytest.raises(errors.InvalidInputError, match="queries row 0 has norm"):
        coll.search(-huge[0], 2)  # a 1-D query is checked as its one row
    assert coll.clock == 3 and coll.stats()["searches"] == 3  # the refused searches changed nothing


def test_sqlite_refuses_key_dims_its_index_cannot_hold():
    """sqlite-vec indexes at most 8192 dimensions (ip adds one): a memstore error naming key_dim
    and the limit before any SQL runs, not sqlite-vec's own message; index="none" is unlimited
    up to MAX_DIM."""
    with Store("sqlite://") as store:
        for options, limit in (({}, 8192), ({"metric": "ip"}, 8191)):
            with pytest.raises(errors.InvalidInputError, match=f"key_dim must be at most {limit}"):
                store.create_collection("wide", key_dim=limit + 1, **options)
            assert not store.has_collection("wide")
            store.create_collection("wide", key_dim=limit, **options)
            store.drop_collection("wide")
        store.create_collection("flat", key_dim=MAX_DIM, index="none")
        with pytest.raises(errors.InvalidInputError, match="key_dim must be at most 65536"):
            store.create_collection("flatter", key_dim=MAX_DIM + 1, index="none")
