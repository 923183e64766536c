"""ResidentIndex: loads a collection, mutates in place with dirty tracking, flushes in one go."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore import Store
from memstore.errors import DimensionMismatchError, InvalidInputError, RowNotFoundError
from memstore_torch import ResidentIndex, knn


def make_collection(store, metric="l2", n=40, dk=6, dv=3):
    coll = store.create_collection("c", key_dim=dk, value_dim=dv, metric=metric, lrfu_lambda=0.5)
    rng = np.random.default_rng(0)
    coll.insert(
        rng.standard_normal((n, dk)).astype(np.float32),
        rng.standard_normal((n, dv)).astype(np.float32),
    )
    return coll


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_search_matches_store_and_brute_force(store, metric):
    coll = make_collection(store, metric)
    index = ResidentIndex.from_collection(coll)
    queries = torch.randn(5, 6)
    hits = index.search(queries, 4)
    ref_d, ref_i = knn.brute_force(queries, index.keys, 4, metric)
    torch.testing.assert_close(hits.distances, ref_d, atol=1e-4, rtol=1e-5)
    assert torch.equal(hits.ids, index.ids[ref_i])
    sql = coll.search(queries.numpy(), 4, touch=False)
    np.testing.assert_array_equal(hits.ids.numpy(), sql.ids)
    np.testing.assert_allclose(hits.distances.numpy(), sql.distances, atol=1e-4)


def test_mutations_flush_and_reload_give_identical_results(store):
    coll = make_collection(store, "l2")
    index = ResidentIndex.from_collection(coll)
    assert index.dirty_count == 0
    first_new = max(int(index.ids.max()) + 1, coll.stats()["next_id"])
    new_ids = index.insert(torch.randn(3, 6), torch.randn(3, 3))
    assert new_ids.tolist() == [first_new, first_new + 1, first_new + 2]
    old_id = int(index.ids[7])
    some_id = int(index.ids[5])
    index.update(index.slots_of([some_id]), keys=torch.ones(1, 6))
    removed = index.delete(index.slots_of([old_id, first_new + 1]))
    assert sorted(removed.tolist()) == [old_id, first_new + 1]
    index.search(torch.randn(8, 6), 3, touch=True)
    assert index.dirty_count > 0
    index.flush(coll)
    assert index.dirty_count == 0
    assert len(coll) == 41
    reloaded = ResidentIndex.from_collection(coll)
    assert reloaded.clock == index.clock
    order_a, order_b = index.ids.argsort(), reloaded.ids.argsort()
    for name in ["ids", "keys", "values", "crf", "last_tick", "hits", "created_tick"]:
        a, b = getattr(index, name)[order_a], getattr(reloaded, name)[order_b]
        assert torch.equal(a, b), name
    q = torch.randn(10, 6)
    a, b = index.search(q, 5), reloaded.search(q, 5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.distances, b.distances)
    assert coll.get([some_id]).keys.tolist() == [[1.0] * 6]
    assert coll.stats()["inserts"] == 43


def test_lrfu_touch_follows_the_design_formula():
    index = ResidentIndex(2, 2, "l2", lrfu_lambda=0.5)
    index.insert(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # crf 1 at tick 0
    index.touch(torch.tensor([0, 0, -1]), tick=4)  # two hits at t=4
    assert index.crf[0].item() == pytest.approx(2 + 2 ** (-0.5 * 4) * 1.0)
    assert index.hits.tolist() == [2, 0] and index.last_tick.tolist() == [4, 0]
    index.touch(torch.tensor([0]), tick=6)
    expected = 1 + 2 ** (-0.5 * 2) * (2 + 2**-2)
    assert index.crf[0].item() == pytest.approx(expected)
    scores = index.lrfu_scores(now=6)
    assert scores[0].item() == pytest.approx(np.log2(expected))
    assert scores[1].item() == pytest.approx(0 - 0.5 * 6)


def test_bounded_index_evicts_lowest_lrfu_to_make_room():
    index = ResidentIndex(1, 1, "l2", max_rows=3)
    index.insert(torch.tensor([[0.0], [1.0], [2.0]]))
    index.touch(torch.tensor([0, 2]), tick=1)
    ids = index.insert(torch.tensor([[5.0]]))
    assert len(index) == 3 and sorted(index.ids.tolist()) == [1, 3, ids.item()]
    assert index.counters["evictions"] == 1
    storage = index.key_storage
    index.insert(torch.tensor([[6.0], [7.0]]))
    assert index.key_storage is storage  # bounded storage is never re-allocated
    with pytest.raises(InvalidInputError):
        index.insert(torch.zeros(4, 1))


def test_recombination_merges_near_duplicates(store):
    index = ResidentIndex(2, 1, "l2")
    index.insert(
        torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]]), torch.tensor([[1.0], [3.0], [9.0]])
    )
    q = torch.tensor([[0.05, 0.0]])
    hits = index.search(q, 3)
    removed = index.recombine(q, hits, threshold=0.2)
    assert removed == 1 and len(index) == 2
    merged = index.slots_of([hits.ids[0, 0].item()])
    assert index.values[merged].item() == pytest.approx(2.0, abs=1e-5)  # equal distances
    assert index.counters["recombinations"] == 1
    assert index.crf[merged].item() == pytest.approx(2.0)


def test_growth_beyond_initial_storage_keeps_rows():
    index = ResidentIndex(3, 3, "ip")
    keys = torch.randn(2500, 3)
    ids = index.insert(keys)
    assert len(index) == 2500 and torch.equal(index.keys, keys) and ids[-1].item() == 2500
    index.delete(index.slots_of(torch.arange(1, 2501, 2)))
    assert torch.equal(index.keys[index.ids.argsort()], keys[1::2])


def test_bad_input_never_corrupts_rows():
    index = ResidentIndex(3, 2, "l2")
    index.insert(torch.randn(4, 3), torch.randn(4, 2))
    before = index.keys.clone()
    with pytest.raises(DimensionMismatchError):
        index.insert(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(InvalidInputError):
        index.insert(torch.tensor([[float("nan"), 0, 0]]), torch.zeros(1, 2))
    with pytest.raises(DimensionMismatchError):
        index.search(torch.randn(2, 5), 1)
    with pytest.raises(RowNotFoundError):
        index.slots_of([99])
    with pytest.raises(InvalidInputError):
        ResidentIndex(3, 3, "hamming")
    assert torch.equal(index.keys, before) and len(index) == 4


def test_flush_is_one_transaction_that_fails_cleanly(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        coll = make_collection(store, "ip", n=5)
        index = ResidentIndex.from_collection(coll)
        index.insert(torch.randn(2, 6), torch.randn(2, 3))
        index._crf[0] = -1.0  # the store refuses crf <= 0: nothing of the batch may land
        with pytest.raises(InvalidInputError):
            index.mark_rows_changed(torch.tensor([0]))
            index.flush(coll)
        assert len(coll) == 5


@settings(max_examples=20, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["insert", "delete", "update"]), st.integers(1, 5)), max_size=25
    ),
    seed=st.integers(0, 1000),
)
def test_random_mutations_match_a_reference_model(ops, seed):
    """Any sequence of inserts, deletes and updates leaves exactly the rows a dict would hold,
    and search over them equals brute force."""
    g = torch.Generator().manual_seed(seed)
    index = ResidentIndex(3, 2, "l2", max_rows=None)
    model: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for op, count in ops:
        if op == "insert":
            keys, values = torch.randn(count, 3, generator=g), torch.randn(count, 2, generator=g)
            for i, row_id in enumerate(index.insert(keys, values).tolist()):
                model[row_id] = (keys[i], values[i])
        elif model:
            chosen = list(model)[:: max(1, len(model) // count)][:count]
            if op == "delete":
                index.delete_ids(chosen)
                for row_id in chosen:
                    del model[row_id]
            else:
                values = torch.randn(len(chosen), 2, generator=g)
                index.update(index.slots_of(chosen), values=values)
                for i, row_id in enumerate(chosen):
                    model[row_id] = (model[row_id][0], values[i])
    assert sorted(index.ids.tolist()) == sorted(model)
    for row_id, (key, value) in model.items():
        slot = index.slots_of([row_id])
        assert torch.equal(index.keys[slot][0], key) and torch.equal(index.values[slot][0], value)
    if model:
        q = torch.randn(4, 3, generator=g)
        hits = index.search(q, 3)
        ref_d, ref_i = knn.brute_force(q, index.keys, 3, "l2")
        torch.testing.assert_close(hits.distances, ref_d, atol=1e-4, rtol=1e-5)


def test_replace_all_deletes_every_row_and_continues_the_ids(store):
    coll = make_collection(store, "l2", n=10)  # ids 0..9
    index = ResidentIndex.from_collection(coll, max_rows=12)
    index.evict(capacity=9)
    assert index.counters["evictions"] == 1
    index.insert(torch.randn(1, 6), torch.randn(1, 3))  # id 10, never stored
    index.delete_ids([10])
    new = index.replace_all(torch.ones(3, 6), torch.zeros(3, 3))
    assert new.tolist() == [10, 11, 12] and sorted(index.ids.tolist()) == [10, 11, 12]
    assert index.counters["evictions"] == 0 and index.counters["inserts"] == 4
    report = index.flush(coll)
    assert report == {"upserts": 3, "deletes": 10}
    assert coll.export_rows().ids.tolist() == [10, 11, 12]
    assert np.array_equal(coll.export_rows().keys, np.ones((3, 6), np.float32))


def test_replace_all_never_reuses_an_id_awaiting_deletion(store):
    coll = make_collection(store, "l2", n=10)  # ids 0..9
    index = ResidentIndex.from_collection(coll)
    index.delete_ids([9])  # larger than every resident id, and still in the store
    assert index.replace_all(torch.ones(2, 6), torch.zeros(2, 3)).tolist() == [10, 11]
    assert index.flush(coll) == {"upserts": 2, "deletes": 10}
    assert coll.export_rows().ids.tolist() == [10, 11]

    empty = ResidentIndex(2, 1, "l2")
    assert empty.replace_all(torch.zeros(2, 2), torch.zeros(2, 1)).tolist() == [1, 2]


def test_replace_all_with_bad_rows_changes_nothing():
    index = ResidentIndex(2, 1, "l2", max_rows=3)
    index.insert(torch.randn(3, 2), torch.randn(3, 1))
    before = index.keys.clone()
    with pytest.raises(InvalidInputError):
        index.replace_all(torch.randn(4, 2), torch.randn(4, 1))  # more than max_rows
    with pytest.raises(InvalidInputError):
        index.replace_all(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 1))
    with pytest.raises(DimensionMismatchError):
        index.replace_all(torch.randn(2, 3), torch.randn(2, 1))
    assert len(index) == 3 and torch.equal(index.keys, before) and index.dirty_count == 3


def test_adopt_store_makes_the_collection_hold_exactly_the_resident_rows(store):
    coll = make_collection(store, "l2", n=6)  # ids 0..5
    index = ResidentIndex(6, 3, "l2")
    index.insert(torch.randn(8, 6), torch.randn(8, 3))  # ids 1..8
    index.adopt_store(coll.export_rows().ids)
    assert index.dirty_count == 8 + 1  # every row written, stored id 0 deleted
    index.delete_ids([2, 7])  # 2 is stored already: it must go; 7 never reached the store
    index.flush(coll)
    assert coll.export_rows().ids.tolist() == [1, 3, 4, 5, 6, 8]
    stored = coll.get(index.ids.numpy())
    np.testing.assert_array_equal(stored.keys, index.keys.numpy())
    np.testing.assert_array_equal(stored.values, index.values.numpy())


def test_count_adds_to_the_counters_the_next_flush_reports(store):
    coll = make_collection(store, "l2", n=2)
    index = ResidentIndex.from_collection(coll)
    index.count("novel_inserts", 3)
    index.count("novel_inserts")
    assert index.counters["novel_inserts"] == 4
    index.flush(coll)
    assert coll.stats()["novel_inserts"] == 4 and index.counters["novel_inserts"] == 0
