"""Numbers at the edges: k, 64-bit integers and float32 range get clear InvalidInputErrors (never a
MemoryError, an OverflowError from the driver, or +inf distances that look like padding), and a
rejected call changes nothing. On SQLite and PostgreSQL (``store``, tests/store/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import errors
from memstore.types import RowBlock
from memstore.validation import INT64_MAX, MAX_K

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


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_distances_beyond_float32_are_an_error_not_padding(store, metric):
    """Finite float32 inputs whose distances overflow float32 (3e38 and -3e38 are 6e38 apart;
    their inner product 3.6e77). Cosine distances stay in [0, 2] and need no such rule."""
    coll = store.create_collection("big", key_dim=4, metric=metric)
    huge = np.full((1, 4), 3e38, np.float32)
    try:
        coll.insert(huge)
    except errors.InvalidInputError as exc:  # SQLite's ip index cannot hold such a norm
        assert metric == "ip" and "too long for an ip collection" in str(exc)
        assert len(coll) == 0
        return
    coll.insert(np.ones((1, 4), np.float32))
    with pytest.raises(errors.InvalidInputError, match="overflows float32"):
        coll.search(-huge, 2)
    assert coll.clock == 0 and coll.stats()["searches"] == 0  # the touching search was undone
    assert int(coll.export_rows().hits.sum()) == 0
