"""The layer library's seam with the store is exactly the protocols in memstore_torch.rows_source.

memstore's Collection and Store satisfy them (by member and by signature), and an in-memory fake
that has only the protocol's members is a complete home for a ResidentIndex and for memory layers.
"""

from __future__ import annotations

import inspect
from collections import Counter

import numpy as np
import pytest
import torch
from typing_extensions import get_protocol_members

from memstore import Collection, CollectionOptions, RowBlock, Store
from memstore_torch import AssociativeMemory, FeaturalMemory, ResidentIndex
from memstore_torch.rows_source import CollectionStore, LayerCollection, RowsSource

_P = inspect.Parameter


def assert_implements(cls: type, protocol: type) -> None:
    """Every protocol member exists on ``cls``; every method accepts the protocol's calls."""
    for name in get_protocol_members(protocol):
        want = inspect.getattr_static(protocol, name)
        have = inspect.getattr_static(cls, name, None)
        assert have is not None, f"{cls.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(have, property), f"{cls.__name__}.{name} is not a property"
            continue
        want_params = list(inspect.signature(want).parameters.values())
        have_params = inspect.signature(have).parameters
        have_order = list(have_params)
        takes_kwargs = any(p.kind is _P.VAR_KEYWORD for p in have_params.values())
        for position, p in enumerate(want_params):
            where = f"{cls.__name__}.{name}({p.name})"
            if p.kind is _P.VAR_KEYWORD:
                assert takes_kwargs, where
                continue
            if p.name not in have_params:
                assert p.kind is _P.KEYWORD_ONLY and takes_kwargs, where
                continue
            hp = have_params[p.name]
            if p.kind is _P.POSITIONAL_OR_KEYWORD:
                assert hp.kind is _P.POSITIONAL_OR_KEYWORD, where
                assert have_order.index(p.name) == position, where
            else:
                assert hp.kind in (_P.KEYWORD_ONLY, _P.POSITIONAL_OR_KEYWORD), where
            if p.default is not _P.empty:
                assert hp.default is not _P.empty, f"{where} must be optional"
        wanted = {p.name for p in want_params}
        for hp in have_params.values():
            if hp.name not in wanted and hp.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
                assert hp.default is not _P.empty, f"{cls.__name__}.{name} requires {hp.name}"


@pytest.mark.parametrize(
    "cls, protocol",
    [
        (Collection, RowsSource),
        (Collection, LayerCollection),
        (Store, CollectionStore),
    ],
)
def test_memstore_classes_implement_the_protocols(cls, protocol):
    assert_implements(cls, protocol)


def test_memstore_objects_are_protocol_instances(store):
    coll = store.create_collection("c", key_dim=4, value_dim=3)
    assert isinstance(coll, RowsSource)
    assert isinstance(coll, LayerCollection)
    assert isinstance(store, CollectionStore)
    assert not isinstance(object(), RowsSource)


class FakeRows:
    """Rows in a dict, with only the members of :class:`RowsSource` (no SQL at all)."""

    def __init__(self, key_dim: int, value_dim: int, metric: str, lrfu_lambda: float) -> None:
        self._spec = (key_dim, value_dim, metric, lrfu_lambda)
        self._rows: dict[int, tuple] = {}
        self._clock = 0
        self._next_id = 0
        self._counters: Counter[str] = Counter()

    key_dim = property(lambda self: self._spec[0])
    value_dim = property(lambda self: self._spec[1])
    metric = property(lambda self: self._spec[2])
    lrfu_lambda = property(lambda self: self._spec[3])

    def stats(self) -> dict:
        return {"clock": self._clock, "next_id": self._next_id}

    def export_rows(self) -> RowBlock:
        ids = sorted(self._rows)
        if not ids:
            return RowBlock.empty(self.key_dim, self.value_dim)
        key, value, crf, last, hits, created = zip(*(self._rows[i] for i in ids), strict=True)
        return RowBlock(
            ids=np.array(ids, np.int64),
            keys=np.stack(key).astype(np.float32),
            values=np.stack(value).astype(np.float32),
            crf=np.array(crf, np.float64),
            last_tick=np.array(last, np.int64),
            hits=np.array(hits, np.int64),
            created_tick=np.array(created, np.int64),
        )

    def apply_changes(self, upserts=None, deletes=None, *, clock=None, counters=None) -> None:
        for i in [] if deletes is None else np.asarray(deletes).tolist():
            self._rows.pop(int(i), None)
        if upserts is not None:
            for j, i in enumerate(upserts.ids.tolist()):
                self._rows[int(i)] = (
                    np.array(upserts.keys[j]),
                    np.array(upserts.values[j]),
                    float(upserts.crf[j]),
                    int(upserts.last_tick[j]),
                    int(upserts.hits[j]),
                    int(upserts.created_tick[j]),
                )
                self._next_id = max(self._next_id, int(i) + 1)
        if clock is not None:
            self._clock = int(clock)
        self._counters.update(counters or {})


class FakeCollection(FakeRows):
    """A :class:`FakeRows` that also has the members :class:`LayerCollection` adds."""

    def __len__(self) -> int:
        return len(self._rows)

    def max_id(self) -> int | None:
        return max(self._rows, default=None)


class FakeStore:
    """Collections by name, with only the members of :class:`CollectionStore`."""

    def __init__(self) -> None:
        self._collections: dict[str, FakeCollection] = {}

    def has_collection(self, name) -> bool:
        return name in self._collections

    def create_collection(self, name, options=None, **kwargs) -> FakeCollection:
        o = options if options is not None else CollectionOptions(**kwargs)
        self._collections[name] = FakeCollection(o.key_dim, o.value_dim, o.metric, o.lrfu_lambda)
        return self._collections[name]

    def get_or_create_collection(self, name, options=None, **kwargs) -> FakeCollection:
        if name not in self._collections:
            return self.create_collection(name, options, **kwargs)
        return self._collections[name]


def _public_members(cls: type) -> set[str]:
    names = set().union(*(vars(base) for base in cls.__mro__ if base is not object))
    return {n for n in names if not n.startswith("_") or n == "__len__"}


def test_fakes_implement_exactly_the_protocols():
    assert_implements(FakeRows, RowsSource)
    assert_implements(FakeCollection, LayerCollection)
    assert_implements(FakeStore, CollectionStore)
    assert _public_members(FakeRows) == set(get_protocol_members(RowsSource))
    assert _public_members(FakeCollection) == set(get_protocol_members(LayerCollection))
    assert _public_members(FakeStore) == set(get_protocol_members(CollectionStore))


def _index_rows(index: ResidentIndex) -> dict[str, np.ndarray]:
    order = index.ids.argsort()
    return {
        name: getattr(index, name)[order].detach().cpu().numpy()
        for name in ("ids", "keys", "values", "crf", "last_tick", "hits", "created_tick")
    }


def _assert_same_rows(index: ResidentIndex, block: RowBlock) -> None:
    rows = _index_rows(index)
    for name, expected in rows.items():
        np.testing.assert_allclose(getattr(block, name), expected, rtol=1e-6, err_msg=name)


def test_resident_index_loads_and_flushes_through_the_protocol_alone():
    fake = FakeRows(5, 3, "l2", 0.5)
    assert not hasattr(fake, "__len__")
    rng = np.random.default_rng(0)
    ids = np.arange(10, 40, dtype=np.int64)
    fake.apply_changes(
        RowBlock.fresh(
            ids,
            rng.standard_normal((30, 5)).astype(np.float32),
            rng.standard_normal((30, 3)).astype(np.float32),
            4,
        ),
        clock=4,
    )
    fake._next_id = 100  # ids 40..99 were handed out before and deleted: never reused

    index = ResidentIndex.from_collection(fake)
    assert (index.key_dim, index.value_dim, index.metric) == (5, 3, "l2")
    assert index.clock == 4 and len(index) == 30 and index.dirty_count == 0
    _assert_same_rows(index, fake.export_rows())

    new = index.insert(torch.randn(2, 5), torch.randn(2, 3))
    assert new.tolist() == [100, 101]
    index.delete_ids([10, 11, 100])
    index.search(torch.randn(4, 5), 3, touch=True)
    report = index.flush(fake)

    assert report["deletes"] == 2  # 100 never reached the collection
    assert fake.stats() == {"clock": index.clock, "next_id": 102}
    assert fake._counters["inserts"] == 2
    _assert_same_rows(index, fake.export_rows())
    _assert_same_rows(ResidentIndex.from_collection(fake), fake.export_rows())


def test_featural_layer_lives_in_a_fake_store():
    fake = FakeStore()
    layer = FeaturalMemory(8, n_rows=16, k=4, store=fake, collection="f")
    coll = fake._collections["f"]
    assert layer.collection is coll and len(coll) == 16
    with torch.no_grad():
        layer.memory_values[:3] += 1.0  # what an optimizer step does
    assert layer.flush()["upserts"] == 3

    again = FeaturalMemory(8, n_rows=16, k=4, store=fake, collection="f")
    again.load_state_dict(layer.state_dict())
    assert again._loaded
    _assert_same_rows(again.index, coll.export_rows())
    x = torch.randn(2, 5, 8)
    layer.eval(), again.eval()
    torch.testing.assert_close(again(x), layer(x))


def test_attach_overwrites_a_fake_collection():
    fake = FakeStore()
    stale = fake.get_or_create_collection("f", key_dim=9, value_dim=8, metric="ip", lrfu_lambda=0.5)
    ids = np.arange(0, 20, dtype=np.int64)  # 1..16 are the layer's ids too, 0 and 17..19 not
    stale.apply_changes(
        RowBlock.fresh(ids, np.ones((20, 9), np.float32), np.ones((20, 8), np.float32), 0)
    )
    layer = FeaturalMemory(8, n_rows=16, k=4)
    layer.attach(fake, "f")
    assert layer.collection is stale
    assert stale.export_rows().ids.tolist() == list(range(1, 17))
    _assert_same_rows(layer.index, stale.export_rows())


def test_associative_layer_counts_novel_inserts_through_the_protocol():
    fake = FakeStore()
    layer = AssociativeMemory(8, heads=2, k=4, capacity=64, store=fake, collection="a")
    layer.train()
    layer(torch.randn(2, 6, 8))
    layer.flush()  # applies the queued novel inserts, then writes them
    coll = fake._collections["a"]
    assert len(coll) == len(layer.index) > 0
    assert coll._counters["novel_inserts"] == coll._counters["inserts"] == len(coll)
    _assert_same_rows(layer.index, coll.export_rows())
