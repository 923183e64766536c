"""Paged product-key memory: a cache far smaller than the table never changes a result.

The same layer is run fully resident and paged through a small cache, on SQLite and PostgreSQL:
outputs, gradients, trained rows, the optimizer's state and every stored LRFU field must be equal
bit for bit; missing rows come in one query per forward; changed rows only reach the database
inside the caller's transaction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import Store
from memstore.errors import InvalidInputError
from memstore_torch import ProductKeyMemory, RowwiseAdagrad
from tests.pg_fixture import STORE_BACKENDS

CONFIG = {"n_keys": 16, "heads": 2, "k": 4, "key_dim": 8, "value_init_std": 0.3}
D = 12


@pytest.fixture(params=STORE_BACKENDS)
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'mem.db'}"


def _pair(url: str, cache_rows: int):
    """The same memory twice in one store: resident ("a") and paged ("b"), equal weights."""
    store = Store(url)
    torch.manual_seed(3)
    resident = ProductKeyMemory(D, store=store, collection="a", **CONFIG)
    torch.manual_seed(3)
    paged = ProductKeyMemory(D, store=store, collection="b", cache_rows=cache_rows, **CONFIG)
    assert paged.paged and not resident.paged
    assert paged.index.resident_rows == 0  # nothing read yet
    return store, resident, paged


def _rows(store: Store, name: str):
    return store.collection(name).export_rows()


def _assert_same_rows(store: Store) -> None:
    a, b = _rows(store, "a"), _rows(store, "b")
    for field in ("ids", "keys", "values", "crf", "last_tick", "hits", "created_tick"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    sa, sb = store.collection("a").stats(), store.collection("b").stats()
    for key in ("clock", "inserts", "evictions"):
        assert sa[key] == sb[key], key


def test_fresh_paged_table_equals_resident_one(url):
    store, _, _ = _pair(url, cache_rows=40)
    _assert_same_rows(store)  # created chunk by chunk straight into the collection


def test_inference_is_identical_and_reads_missing_rows_in_one_query(url):
    store, resident, paged = _pair(url, cache_rows=40)
    resident.eval(), paged.eval()
    x = torch.randn(3, D)
    with torch.no_grad():
        for _ in range(3):
            before = paged.index.stats["queries"]
            assert torch.equal(resident(x), paged(x))
            assert paged.index.stats["queries"] - before <= 1
            x = torch.randn(3, D)
    assert paged.index.resident_rows <= 40
    assert paged.index.stats["misses"] > 40  # rows were evicted and read again


def test_training_through_a_small_cache_gives_the_resident_rows(url):
    """Five optimizer steps, then one checkpoint transaction: the paged layer's collection equals
    the resident one's in every field, and so does the row optimizer's state."""
    store, resident, paged = _pair(url, cache_rows=48)
    opts = [RowwiseAdagrad(m.memory_parameters(), lr=0.1) for m in (resident, paged)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, D, generator=g) for _ in range(5)]
    with store.transaction():  # the interval between two checkpoints
        for x in batches:
            resident.train(), paged.train()
            outs = [resident(x), paged(x)]
            assert torch.equal(outs[0], outs[1])
            for out, opt in zip(outs, opts, strict=True):
                out.pow(2).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert paged.index.stats["written_back"] > 0  # dirty rows left the cache mid-interval
        resident.flush(), paged.flush()
    _assert_same_rows(store)
    sums = [
        opt.state[m.memory_values]["sum"] for opt, m in zip(opts, (resident, paged), strict=True)
    ]
    assert sums[0].shape == sums[1].shape == (CONFIG["n_keys"] ** 2,)
    assert torch.equal(sums[0], sums[1])


def test_rows_reach_the_database_only_with_the_transaction(url):
    store, _, paged = _pair(url, cache_rows=40)
    before = _rows(store, "b").values.copy()
    opt = RowwiseAdagrad(paged.memory_parameters(), lr=0.5)
    paged.train()
    with pytest.raises(RuntimeError, match="killed"):
        with store.transaction():
            for _ in range(4):
                paged(torch.randn(5, D)).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert paged.index.stats["written_back"] > 0
            raise RuntimeError("killed")  # the process dies before its checkpoint commits
    np.testing.assert_array_equal(_rows(store, "b").values, before)


def test_writing_back_outside_a_transaction_is_refused(url):
    store, _, paged = _pair(url, cache_rows=40)
    opt = RowwiseAdagrad(paged.memory_parameters(), lr=0.5)
    paged.train()
    before = _rows(store, "b").values.copy()
    with pytest.raises(InvalidInputError, match="transaction"):
        for _ in range(8):
            paged(torch.randn(5, D)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    np.testing.assert_array_equal(_rows(store, "b").values, before)


def test_a_budget_below_one_steps_reads_names_the_budget(url):
    _, _, paged = _pair(url, cache_rows=3)
    with pytest.raises(InvalidInputError, match="memory_budget") as info:
        with torch.no_grad():
            paged(torch.randn(4, D))
    assert info.value.parameter == "memory_budget"


def test_rows_awaiting_a_gradient_stay_until_the_optimizer_steps(url):
    """Two forwards before one backward (gradient accumulation): the first forward's rows are
    pinned, so the second cannot evict them and the gradients land on the right rows."""
    store, resident, paged = _pair(url, cache_rows=40)
    opts = [RowwiseAdagrad(m.memory_parameters(), lr=0.1) for m in (resident, paged)]
    x1, x2 = torch.randn(2, D), torch.randn(2, D)
    with store.transaction():
        for layer, opt in zip((resident, paged), opts, strict=True):
            layer.train()
            (layer(x1).sum() + layer(x2).pow(2).sum()).backward()
            opt.step()
        assert not paged.index._pinned.any()  # the step released them
        resident.flush(), paged.flush()
    _assert_same_rows(store)


def test_coldest_rows_and_reuse_match_the_resident_layer(url):
    store, resident, paged = _pair(url, cache_rows=48)
    opts = [RowwiseAdagrad(m.memory_parameters(), lr=0.1) for m in (resident, paged)]
    with store.transaction():
        for x in [torch.randn(4, D) for _ in range(3)]:
            for layer, opt in zip((resident, paged), opts, strict=True):
                layer.train()
                layer(x).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        cold = resident.coldest_rows(20)
        assert torch.equal(paged.coldest_rows(20), cold)
        assert torch.equal(paged.row_values(cold), resident.row_values(cold))
        for layer, opt in zip((resident, paged), opts, strict=True):
            layer.reuse_rows(cold)
            opt.reset_rows(layer.memory_values, cold)
            layer.flush()
    _assert_same_rows(store)


def test_rows_are_read_ahead_by_a_worker_without_changing_results(url):
    """GrownMemory starts the extra memory's search, the worker reads the missing rows while the
    base layer computes, and the outputs equal the resident layer's and the unprefetched ones."""
    from memstore_torch import GrownMemory

    store, resident, paged = _pair(url, cache_rows=40)
    base = torch.nn.Linear(D, D)
    grown_resident, grown_paged = GrownMemory(base, resident), GrownMemory(base, paged)
    assert not paged.prefetch  # off by default
    paged.prefetch = True
    grown_resident.eval(), grown_paged.eval()
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(3, D)
            want = grown_resident(x)
            assert torch.equal(grown_paged(x), want)
            paged.prefetch = False
            assert torch.equal(grown_paged(x), want)
            paged.prefetch = True
    assert paged.index.stats["prefetched"] > 0


def test_rows_written_back_are_not_read_ahead_until_committed(url):
    """The worker's connection cannot see rows written back inside the caller's open transaction:
    those are read by the caller's connection (else a stale value would come back), and prefetch
    covers them again once the caller reports the commit."""
    store, resident, paged = _pair(url, cache_rows=40)
    paged.prefetch = True
    opts = [RowwiseAdagrad(m.memory_parameters(), lr=0.5) for m in (resident, paged)]
    g = torch.Generator().manual_seed(1)
    with store.transaction():
        for _ in range(8):
            x = torch.randn(5, D, generator=g)
            resident.train(), paged.train()
            outs = [resident(x), paged(x, searched=paged.start(x, read_ahead=True))]
            assert torch.equal(outs[0], outs[1])
            for out, opt in zip(outs, opts, strict=True):
                out.pow(2).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert paged.index._unsure.any() and paged.index.stats["prefetched"] > 0
        resident.flush(), paged.flush()
    paged.index.committed()
    assert not paged.index._unsure.any()
    _assert_same_rows(store)


def test_an_in_memory_store_reads_nothing_ahead():
    store = Store("sqlite://")
    layer = ProductKeyMemory(D, store=store, collection="m", cache_rows=40, **CONFIG)
    assert not store.concurrent_reads
    with torch.no_grad():
        layer.eval()(torch.randn(3, D))
    assert layer.index.stats["prefetched"] == 0 and layer.index.stats["misses"] > 0


def _plant_duplicate(layer: ProductKeyMemory, x: torch.Tensor):
    """Make the second-ranked row of token 0, head 0 a near-copy of its first-ranked row."""
    scores, rows = layer.search(x)
    weights = torch.softmax(scores.double(), dim=-1)
    a, b = int(rows[0, 0, 0]), int(rows[0, 0, 1])
    value = layer.row_values(torch.tensor([a]))
    layer.reuse_rows(torch.tensor([b]), value * 1.001)  # relative distance 0.001
    return rows.detach(), weights, a, b


def test_cofiring_near_duplicates_merge_like_the_store_rule(url):
    """The pair merges by memstore.recombine.merge_group (the better-ranked row keeps its id and
    address, the value is the pair's weighted mean, LRFU merged); the other row becomes blank.
    A paged memory does exactly what the resident one does."""
    store, resident, paged = _pair(url, cache_rows=48)
    x = torch.randn(3, D)
    with store.transaction():
        for layer in (resident, paged):
            rows, weights, a, b = _plant_duplicate(layer, x)
            va, vb = layer.row_values(torch.tensor([a, b])).double()
            blanks = layer.recombine_rows(rows, weights, threshold=0.01)
            assert blanks.tolist() == [b]
            wa, wb = weights[0, 0, 0], weights[0, 0, 1]
            want = (wa * va + wb * vb) / (wa + wb)
            got = layer.row_values(torch.tensor([a, b]))
            torch.testing.assert_close(got[0].double(), want, rtol=1e-6, atol=1e-7)
            assert not got[1].any()
            assert layer.recombine_rows(rows, weights, threshold=0.01).numel() == 0  # no more
            layer.flush()
    _assert_same_rows(store)
    assert store.collection("a").stats()["recombinations"] == 1


def test_rows_far_apart_or_blank_are_not_merged(url):
    store, resident, _ = _pair(url, cache_rows=48)
    x = torch.randn(3, D)
    scores, rows = resident.search(x)
    weights = torch.softmax(scores, dim=-1)
    assert resident.recombine_rows(rows, weights, threshold=0.05).numel() == 0  # random values
    with pytest.raises(InvalidInputError, match="threshold"):
        resident.recombine_rows(rows, weights, threshold=-1.0)
    blank = ProductKeyMemory(D, **{**CONFIG, "value_init_std": 0.0})
    s2, r2 = blank.search(x)
    assert blank.recombine_rows(r2, torch.softmax(s2, -1), threshold=1.0).numel() == 0


def test_pairs_are_taken_greedily_nearest_first_each_row_once():
    from memstore_torch.cofiring import cofiring_pairs, near_duplicates

    rows = torch.tensor([[[1, 2, 3]], [[2, 3, 4]]])  # adjacent pairs (1,2) (2,3) (2,3) (3,4)
    weights = torch.full(rows.shape, 1 / 3)
    first, second, _, _, times = cofiring_pairs(rows, weights)
    assert (first[0], second[0], times[0]) == (2, 3, 2)  # the most frequent pair first
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(1, 2), (2, 3), (3, 4)]
    # relative distances: (3,4) 1e-4, (1,2) 1e-3, (2,3) 2e-3 -> (3,4), then (1,2); (2,3) blocked
    table = torch.tensor([[0.0], [1.0], [1.001], [1.003], [1.0031]])
    chosen, distance = near_duplicates(first, second, lambda r: table[r], threshold=0.02)
    assert [(int(first[c]), int(second[c])) for c in chosen] == [(3, 4), (1, 2)]
    assert bool((distance <= 0.02).all()) and bool((distance[:-1] <= distance[1:]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_paged_memory_trains_on_cuda(tmp_path):
    """The cache, its slot map and the rows read in live on the GPU; results match resident."""
    store, resident, paged = _pair(f"sqlite:///{tmp_path / 'mem.db'}", cache_rows=48)
    resident.cuda(), paged.cuda()
    paged.prefetch = True  # the worker's rows land on the GPU too
    assert paged.index._slot.is_cuda and paged.memory_values.is_cuda
    opts = [RowwiseAdagrad(m.memory_parameters(), lr=0.1) for m in (resident, paged)]
    with store.transaction():
        for _ in range(4):
            x = torch.randn(5, D, device="cuda")
            resident.train(), paged.train()
            outs = [resident(x), paged(x, searched=paged.start(x, read_ahead=True))]
            torch.testing.assert_close(outs[0], outs[1])
            for out, opt in zip(outs, opts, strict=True):
                out.pow(2).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        resident.flush(), paged.flush()
    a, b = _rows(store, "a"), _rows(store, "b")
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.hits, b.hits)


def test_novel_queries_claim_the_coldest_row_they_read(url):
    """The weakest-matched share of token-heads each take over the coldest row among their own
    reads (blank, counted as a novel insert); paged and resident claim the same rows."""
    store, resident, paged = _pair(url, cache_rows=48)
    g = torch.Generator().manual_seed(5)
    warm = [torch.randn(4, D, generator=g) for _ in range(3)]
    x = torch.randn(6, D, generator=g)
    claimed = []
    with store.transaction():
        for layer in (resident, paged):
            layer.train()
            with torch.no_grad():
                for w in warm:  # LRFU state that differs from row to row
                    layer(w)
            scores, rows = layer.search(x)
            got = layer.insert_novel(rows, scores, share=0.25)
            best = scores.reshape(-1, scores.shape[-1]).amax(1)
            weakest = best.argsort()[: int(0.25 * best.numel())]
            reads = rows.reshape(-1, rows.shape[-1])[weakest]
            assert 0 < got.numel() <= weakest.numel() and bool(torch.isin(got, reads).all())
            assert got.unique().numel() == got.numel()
            assert not layer.row_values(got).any()
            assert layer.insert_novel(rows, scores, share=0.0).numel() == 0
            claimed.append(got)
            layer.flush()
    assert torch.equal(claimed[0], claimed[1])
    _assert_same_rows(store)
    stats = store.collection("a").stats()
    assert stats["novel_inserts"] == claimed[0].numel()
    with pytest.raises(InvalidInputError, match="share"):
        resident.insert_novel(rows, scores, share=1.5)


def test_binding_a_paged_memory_reads_no_row(url, monkeypatch):
    """Counting rows (len, stats) would read a whole table: a paged memory binds with one
    index lookup (the largest id) and the catalog's clock, and reads rows only when used."""
    from memstore.collection import Collection

    store, resident, _ = _pair(url, cache_rows=40)
    for name in ("__len__", "stats", "export_rows", "get"):
        monkeypatch.setattr(Collection, name, _forbidden(name))
    again = ProductKeyMemory.from_config(resident.extra_config(), store, cache_rows=40)
    assert again.paged and again.index.clock == resident.index.clock


def _forbidden(name):
    def call(*args, **kwargs):
        raise AssertionError(f"Collection.{name} must not be called when a paged memory binds")

    return call


def test_a_collection_that_is_not_the_table_is_refused(url):
    store, _, _ = _pair(url, cache_rows=40)
    other = ProductKeyMemory(D, store=store, collection="c", **{**CONFIG, "n_keys": 8})
    saved = {**other.extra_config(), "n_keys": 16}
    with pytest.raises(InvalidInputError, match="largest id is 64"):
        ProductKeyMemory.from_config(saved, store, cache_rows=40)
