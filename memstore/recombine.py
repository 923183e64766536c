"""Recombination and novelty: pure numpy planning, the one definition of both.

The store applies the plans in SQL (:meth:`memstore.Collection.search` with ``recombine=`` /
``novel=``, :meth:`memstore.Collection.recombine`); ``memstore_torch.ResidentIndex.recombine`` is a
torch mirror of :func:`plan_merges`, tested to leave the database exactly as the store does
(``tests/torch/test_semantics_mirrors.py``).

**Recombination.** Hits of one query lying within ``threshold`` of the query (distance in the
collection's convention, :mod:`memstore.distances`, smaller = nearer) are near-duplicates of one
concept; two or more of them are replaced by one row (:func:`merge_group`):

* key and value: the ``softmax(-d)``-weighted means, ``d`` each member's distance to the query as
  the search measured it;
* ``crf``: each member's crf decayed to the group's newest ``last_tick``, then summed. crf is stored
  *as of* ``last_tick`` (:mod:`memstore.lrfu`), so values taken at different ticks cannot be added
  as they are: the undecayed sum would credit an old member's references as if they were recent,
  and the merged row's score would depend on where the merge happened;
* ``hits`` summed, ``last_tick`` the max, ``created_tick`` the min;
* the **nearest member keeps its id** and the others are deleted. Ids stay stable: users inspect
  and edit rows by id, a merge in the resident index flushes as an in-place upsert plus deletes,
  and no id is used up by a merge.

Queries are handled in order and a row merged for an earlier query of the batch is not merged
again (greedy, each row at most once per call); within a query, members are taken nearest first.

**Novelty.** A query whose nearest hit is farther than ``threshold`` (or that found nothing) is a
new concept and is inserted; a later query of the same batch within ``threshold`` of an already
accepted novel key is not inserted again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memstore import lrfu
from memstore.distances import pairwise_distances
from memstore.types import RowBlock, SearchResult

__all__ = [
    "MergeGroup",
    "merge_group",
    "merged_rows",
    "pairwise_distances",
    "plan_merges",
    "plan_novel",
    "softmax_weights",
]


@dataclass
class MergeGroup:
    """One merge: ``ids`` are the members nearest first; ``ids[0]`` keeps its id for the result."""

    ids: np.ndarray  # int64 (g,) members, nearest to the query first
    key: np.ndarray  # float32 (dk,)
    value: np.ndarray  # float32 (dv,)
    crf: float
    hits: int
    last_tick: int
    created_tick: int

    @property
    def keeper(self) -> int:
        """The id the merged row keeps (the member nearest to the query)."""
        return int(self.ids[0])

    @property
    def removed(self) -> np.ndarray:
        """The ids that disappear (every member but the keeper)."""
        return self.ids[1:]


def softmax_weights(distances: np.ndarray) -> np.ndarray:
    z = -np.asarray(distances, np.float64)
    z -= z.max()
    w = np.exp(z)
    return w / w.sum()


def merge_group(members: RowBlock, distances: np.ndarray, lam: float) -> MergeGroup:
    """The row replacing ``members`` (nearest first), ``distances`` (g,) theirs to the query."""
    weights = softmax_weights(distances)[:, None]
    crf, last_tick, hits, created_tick = lrfu.merged(
        members.crf, members.last_tick, members.hits, members.created_tick, lam
    )
    return MergeGroup(
        ids=np.asarray(members.ids, np.int64),
        key=(weights * members.keys.astype(np.float64)).sum(0).astype(np.float32),
        value=(weights * members.values.astype(np.float64)).sum(0).astype(np.float32),
        crf=crf,
        hits=hits,
        last_tick=last_tick,
        created_tick=created_tick,
    )


def plan_merges(
    result: SearchResult, rows: RowBlock, threshold: float, lam: float
) -> list[MergeGroup]:
    """Groups of >= 2 hits to merge; ``rows`` holds the current state of (at least) every hit
    and ``lam`` is the collection's LRFU lambda."""
    position = {int(i): p for p, i in enumerate(rows.ids.tolist())}
    consumed: set[int] = set()
    groups: list[MergeGroup] = []
    for q in range(result.ids.shape[0]):
        near = (result.ids[q] >= 0) & (result.distances[q] <= threshold)
        members = [
            (int(i), float(d))
            for i, d in zip(result.ids[q][near], result.distances[q][near], strict=True)
            if int(i) not in consumed and int(i) in position
        ]
        if len(members) < 2:
            continue
        at = np.array([position[m[0]] for m in members])
        groups.append(merge_group(rows.take(at), np.array([m[1] for m in members]), lam))
        consumed.update(m[0] for m in members)
    return groups


def merged_rows(groups: list[MergeGroup]) -> RowBlock:
    """The merged rows of ``groups`` as one block, each under its keeper's id."""
    return RowBlock(
        ids=np.array([g.keeper for g in groups], np.int64),
        keys=np.stack([g.key for g in groups]),
        values=np.stack([g.value for g in groups]),
        crf=np.array([g.crf for g in groups], np.float64),
        last_tick=np.array([g.last_tick for g in groups], np.int64),
        hits=np.array([g.hits for g in groups], np.int64),
        created_tick=np.array([g.created_tick for g in groups], np.int64),
    )


def plan_novel(queries: np.ndarray, nearest: np.ndarray, threshold: float, distance) -> np.ndarray:
    """Indices of queries to insert as new rows.

    ``nearest`` (m,) is each query's nearest-hit distance (+inf when nothing was found);
    ``distance(a, b)`` gives the (len(a), len(b)) distance matrix in the collection's metric, used to
    keep near-identical novel queries of one batch from being inserted twice.
    """
    chosen: list[int] = []
    for q in np.flatnonzero(nearest > threshold).tolist():
        if chosen:
            d = distance(queries[q : q + 1], queries[chosen])[0]
            if (d <= threshold).any():
                continue
        chosen.append(q)
    return np.array(chosen, np.int64)
