"""Plain data carried across the store's API: what a collection is, a block of rows, a search answer.

They are numpy-only dataclasses so that ``memstore_torch`` and the backends can exchange rows in bulk
without touching SQL or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from memstore.errors import InvalidInputError
from memstore.validation import check_dim, check_lrfu_lambda, check_positive_int

METRICS = ("l2", "cosine", "ip")
#: Index kinds a collection may ask for. sqlite-vec serves the ``rescore-*`` kinds; PostgreSQL serves
#: ``hnsw`` / ``ivfflat`` (pgvector) and maps the ``rescore-*`` kinds to HNSW so SQLite code runs there.
#: ``none`` keeps no kNN index at all (searches scan the rows exactly): for memories searched
#: elsewhere, such as a product-key layer's, whose bulk writes need not maintain one.
SQLITE_INDEX_KINDS = ("exact", "rescore-bit", "rescore-int8", "none")
INDEX_KINDS = (*SQLITE_INDEX_KINDS, "hnsw", "ivfflat")


@dataclass(frozen=True)
class CollectionOptions:
    """How a collection is made: the one list of collection options, their defaults and checks.

    Every front end builds one of these (``Store.create_collection(name, **options)``, the CLI's
    ``import``, the memory layers), so an option is declared, defaulted and validated in exactly
    one place. Construction validates and normalises (``value_dim=None`` becomes ``key_dim``, numpy
    integers become ``int``): an instance is always a valid definition.
    """

    key_dim: int
    #: None means "same as key_dim" (values default to the keys themselves).
    value_dim: int | None = None
    metric: str = "l2"
    lrfu_lambda: float = 0.5
    #: Default target of ``evict()`` / ``memstore prune``; None = unbounded.
    capacity: int | None = None
    index: str = "exact"
    #: Candidates per result that an approximate index rescores exactly.
    oversample: int = 8

    def __post_init__(self) -> None:
        key_dim = check_dim(self.key_dim, "key_dim")
        value_dim = key_dim if self.value_dim is None else check_dim(self.value_dim, "value_dim")
        if self.metric not in METRICS:
            raise InvalidInputError(
                f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}"
            )
        if self.index not in INDEX_KINDS:
            raise InvalidInputError(
                f"unknown index {self.index!r}: use one of {', '.join(INDEX_KINDS)}"
            )
        capacity = None if self.capacity is None else check_positive_int(self.capacity, "capacity")
        normalised = {
            "key_dim": key_dim,
            "value_dim": value_dim,
            "metric": str(self.metric),
            "lrfu_lambda": check_lrfu_lambda(self.lrfu_lambda),
            "capacity": capacity,
            "index": str(self.index),
            "oversample": check_positive_int(self.oversample, "oversample"),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: normalise in place, once

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{option: default}`` for every option that has one (all but ``key_dim``)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @property
    def options(self) -> CollectionOptions:
        """Just the options (a :class:`CollectionSpec` without its identity)."""
        return CollectionOptions(
            **{f.name: getattr(self, f.name) for f in fields(CollectionOptions)}
        )

    def differences(self, wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{option: (ours, wanted)}`` for each option in ``wanted`` whose value differs from ours.

        ``wanted`` is validated and normalised first, completed with our ``key_dim`` when it
        has none (so ``value_dim=None`` there means its own ``key_dim``, else ours).
        """
        given = dict(wanted)
        full = CollectionOptions(**{"key_dim": self.key_dim, **given})
        out = {}
        for name in given:
            ours, theirs = getattr(self, name), getattr(full, name)
            if ours != theirs:
                out[name] = (ours, theirs)
        return out


@dataclass(frozen=True, kw_only=True)
class CollectionSpec(CollectionOptions):
    """A collection as recorded in the catalog: its identity (``id``, ``name``) plus its options.

    Backends receive it for every call, so they never have to look a collection up by name: the
    integer ``id`` names the per-collection tables (``name`` is user text and never reaches SQL).
    """

    id: int
    name: str

    def __post_init__(self) -> None:
        # A record, not a request: its options were validated (as CollectionOptions) when the
        # collection was made, so reading the catalog does not check them again, and backend
        # tests can hand a backend a spec it must refuse.
        pass


@dataclass
class RowBlock:
    """A batch of complete rows, ordered as given; the unit of bulk export and bulk upsert."""

    ids: np.ndarray  # int64 (n,)
    keys: np.ndarray  # float32 (n, dk)
    values: np.ndarray  # float32 (n, dv)
    crf: (
        np.ndarray
    )  # float64 (n,)  LRFU combined recency-frequency, as of last_tick (memstore.lrfu)
    last_tick: np.ndarray  # int64 (n,)
    hits: np.ndarray  # int64 (n,)
    created_tick: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls, key_dim: int, value_dim: int) -> RowBlock:
        return cls(
            ids=np.empty(0, np.int64),
            keys=np.empty((0, key_dim), np.float32),
            values=np.empty((0, value_dim), np.float32),
            crf=np.empty(0, np.float64),
            last_tick=np.empty(0, np.int64),
            hits=np.empty(0, np.int64),
            created_tick=np.empty(0, np.int64),
        )

    @classmethod
    def fresh(cls, ids: np.ndarray, keys: np.ndarray, values: np.ndarray, tick: int) -> RowBlock:
        """Rows as a plain insert creates them: one reference at ``tick`` (crf 1), no search hits yet.

        Counting the insertion as the first reference (standard LRFU) keeps ``crf >= 1`` for every
        row, so ``log2(crf)`` in the SQL order key is always finite.
        """
        n = len(ids)
        return cls(
            ids=np.asarray(ids, np.int64),
            keys=keys,
            values=values,
            crf=np.ones(n, np.float64),
            last_tick=np.full(n, tick, np.int64),
            hits=np.zeros(n, np.int64),
            created_tick=np.full(n, tick, np.int64),
        )

    def take(self, index: np.ndarray) -> RowBlock:
        """The rows at the given positions (a numpy fancy index or boolean mask)."""
        return RowBlock(
            ids=self.ids[index],
            keys=self.keys[index],
            values=self.values[index],
            crf=self.crf[index],
            last_tick=self.last_tick[index],
            hits=self.hits[index],
            created_tick=self.created_tick[index],
        )

    @staticmethod
    def concat(blocks: list[RowBlock]) -> RowBlock:
        return RowBlock(
            ids=np.concatenate([b.ids for b in blocks]),
            keys=np.concatenate([b.keys for b in blocks]),
            values=np.concatenate([b.values for b in blocks]),
            crf=np.concatenate([b.crf for b in blocks]),
            last_tick=np.concatenate([b.last_tick for b in blocks]),
            hits=np.concatenate([b.hits for b in blocks]),
            created_tick=np.concatenate([b.created_tick for b in blocks]),
        )


@dataclass
class SearchResult:
    """k nearest rows per query; smaller distance = nearer for every metric.

    Distances as defined by :mod:`memstore.distances`: l2 -> Euclidean distance, cosine ->
    1 - cosine similarity, ip -> -(q . k).
    Where fewer than k rows exist, ids are -1, distances +inf and keys/values 0.
    """

    ids: np.ndarray  # int64 (m, k)
    distances: np.ndarray  # float32 (m, k)
    keys: np.ndarray  # float32 (m, k, dk)
    values: np.ndarray  # float32 (m, k, dv)
    changes: dict = field(default_factory=dict)  # {"recombinations": n, "novel_inserts": n, ...}

    @classmethod
    def padded(cls, m: int, k: int, key_dim: int, value_dim: int) -> SearchResult:
        return cls(
            ids=np.full((m, k), -1, np.int64),
            distances=np.full((m, k), np.inf, np.float32),
            keys=np.zeros((m, k, key_dim), np.float32),
            values=np.zeros((m, k, value_dim), np.float32),
        )
