"""The distance convention of memstore, as the numpy reference every other implementation mirrors.

Smaller is nearer for every metric:

* ``l2``     -> Euclidean distance ``|q - k|`` (not squared);
* ``cosine`` -> ``1 - cos(q, k)`` (a zero vector is at distance 1 from everything);
* ``ip``     -> ``-(q . k)``, the negative inner product.

One convention for all metrics lets recombination and novelty thresholds, padding (``+inf``) and
"nearest first" mean the same thing everywhere. This module is the single definition; the places
that compute distances their own way are mirrors of it and are tested against it:

* the SQLite backend's exact rescoring (:func:`memstore.backends.sqlite.exact_distances`),
* pgvector's ``<->`` / ``<=>`` / ``<#>`` operators
  (:data:`memstore.backends.pg_sql.DISTANCE_OPERATORS`),
* ``memstore_torch.knn`` (``search``, ``brute_force``, ``distance_to``),

tested in ``tests/store/test_semantics.py`` and ``tests/torch/test_semantics_mirrors.py``.
"""

from __future__ import annotations

import numpy as np

from memstore.errors import bad_parameter
from memstore.types import METRICS

#: Largest broadcast temporary :func:`pairwise_distances` builds at once, in float64 elements.
_BLOCK_ELEMENTS = 1 << 22


def distances(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Distance of each query to each key, broadcasting over the leading axes (last axis: dims).

    ``queries`` (..., d) and ``keys`` (..., d) broadcast like numpy arrays, e.g. (m, 1, d) against
    (1, n, d) for an (m, n) matrix, or (m, 1, d) against (m, c, d) for c candidates per query.
    Computed in float64 from the differences / products directly (no ``|q|^2 - 2 q.k + |k|^2``
    expansion, which loses precision for near-duplicates).
    """
    if metric not in METRICS:
        raise bad_parameter("metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    q = np.asarray(queries, np.float64)
    k = np.asarray(keys, np.float64)
    if metric == "l2":
        return np.sqrt(((q - k) ** 2).sum(-1))
    dot = (q * k).sum(-1)
    if metric == "cosine":
        norms = np.linalg.norm(q, axis=-1) * np.linalg.norm(k, axis=-1)
        return 1.0 - dot / np.where(norms == 0, 1.0, norms)
    return -dot


def pairwise_distances(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) distances between the rows of ``a`` (m, d) and ``b`` (n, d)."""
    a = np.asarray(a)
    b = np.asarray(b)
    out = np.empty((a.shape[0], b.shape[0]), np.float64)
    # Blocks of a's rows keep the broadcast (block, n, d) temporary near _BLOCK_ELEMENTS.
    step = max(1, _BLOCK_ELEMENTS // max(1, b.shape[0] * a.shape[-1]))
    for start in range(0, a.shape[0], step):
        out[start : start + step] = distances(metric, a[start : start + step, None, :], b[None])
    return out
