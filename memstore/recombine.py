"""Recombination and novelty (DESIGN §5): pure numpy planning, applied by the Collection in SQL.

Recombination: hits of one query lying within ``threshold`` of the query (distance in the
collection's convention, smaller = nearer) are near-duplicates of one concept; they are replaced by
one row whose key and value are the ``softmax(-d)``-weighted means, whose ``crf`` and ``hits`` are
summed, ``last_tick`` the max and ``created_tick`` the min. Queries are handled in order; a row
already merged for an earlier query of the batch is not merged twice.

Novelty: a query whose nearest hit is farther than ``threshold`` (or that found nothing) is a new
concept and is inserted; a later query of the same batch within ``threshold`` of an already accepted
novel key is not inserted again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memstore.types import RowBlock, SearchResult


@dataclass
class MergeGroup:
    ids: np.ndarray  # int64 (g,) rows replaced
    key: np.ndarray  # float32 (dk,)
    value: np.ndarray  # float32 (dv,)
    crf: float
    hits: int
    last_tick: int
    created_tick: int


def softmax_weights(distances: np.ndarray) -> np.ndarray:
    z = -np.asarray(distances, np.float64)
    z -= z.max()
    w = np.exp(z)
    return w / w.sum()


def plan_merges(result: SearchResult, rows: RowBlock, threshold: float) -> list[MergeGroup]:
    """Groups of >= 2 hits to merge; ``rows`` holds the current state of (at least) every hit."""
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
        ids = np.array([m[0] for m in members], np.int64)
        weights = softmax_weights(np.array([m[1] for m in members]))
        at = np.array([position[i] for i in ids.tolist()])
        groups.append(
            MergeGroup(
                ids=ids,
                key=(weights[:, None] * rows.keys[at].astype(np.float64)).sum(0).astype(np.float32),
                value=(weights[:, None] * rows.values[at].astype(np.float64))
                .sum(0)
                .astype(np.float32),
                crf=float(rows.crf[at].sum()),
                hits=int(rows.hits[at].sum()),
                last_tick=int(rows.last_tick[at].max()),
                created_tick=int(rows.created_tick[at].min()),
            )
        )
        consumed.update(ids.tolist())
    return groups


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


def pairwise_distances(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) distances in the public convention (see SearchResult)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if metric == "l2":
        sq = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2 * a64 @ b64.T
        return np.sqrt(np.clip(sq, 0, None))
    if metric == "cosine":
        an = a64 / np.linalg.norm(a64, axis=1, keepdims=True)
        bn = b64 / np.linalg.norm(b64, axis=1, keepdims=True)
        return 1.0 - an @ bn.T
    return -(a64 @ b64.T)
