"""Exact batched k-nearest-neighbour search over tensors held in memory.

A memory layer asks ~10^5 queries a training step, so search must run at the speed of a matrix
product. Two kernels answer the same question and must agree with brute force:

* ``faiss`` (the default for float32 CPU tensors when faiss is installed): FAISS's exhaustive
  ``knn`` (the code behind ``IndexFlatIP``/``IndexFlatL2``) run directly on the tensors' memory,
  no copy. On CPU the cost is the top-k selection, not the matrix product, and FAISS fuses BLAS
  tiles with a heap selection.
* ``torch`` (everywhere else: no faiss, CUDA, other dtypes; or ``backend="torch"``): blocked
  ``queries @ rows.T`` score tiles of bounded size, an exact per-tile selection
  (:func:`_tile_topk`: group maxima first, then ``topk`` over the best groups only) merged into a
  running top-k. On an idle 2-core CPU it answers 0.35-0.40x FAISS's throughput (d=64, k=16,
  ``benchmarks/knn.py``'s torch-kernel column), which is why FAISS is the CPU default; on CUDA,
  matmul + ``topk`` is the natural path.

Distances follow the store's convention, smaller = nearer: ``l2`` Euclidean (not squared),
``cosine`` ``1 - cos``, ``ip`` ``-(q . k)``; :func:`search`, :func:`brute_force` and
:func:`distance_to` are mirrors of memstore.distances.distances (the numpy reference; tested in
tests/torch/test_semantics_mirrors.py). Missing neighbours (fewer rows than ``k``) are padded with
index ``-1`` and distance ``+inf``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from memstore.errors import InvalidInputError

Metric = Literal["ip", "l2", "cosine"]
Backend = Literal["auto", "torch", "faiss"]
METRICS = ("ip", "l2", "cosine")

# Largest score tile (query block x row block) the torch kernel builds, in elements (512 MiB
# fp32). Large tiles measured fastest on CPU (fewer Python-level merges, efficient matmuls); the
# full queries x rows matrix is still never built for large collections.
_TILE_ELEMENTS = 1 << 27
_ROW_BLOCK = 262144  # rows scored per tile
_MAX_QUERY_BLOCK = 1024  # queries per tile
_GROUP = 32  # scores per selection group in _tile_topk

try:  # faiss is an optional, benchmark-grade accelerator for CPU search.
    import faiss as _faiss
except ImportError:  # pragma: no cover - depends on the environment
    _faiss = None


def faiss_available() -> bool:
    """Whether the FAISS CPU kernels can be used by :func:`search`."""
    return _faiss is not None


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def choose_backend(rows: torch.Tensor, metric: str, backend: Backend = "auto") -> str:
    """Pick the kernel: FAISS for float32 CPU tensors when installed, torch otherwise."""
    if backend == "torch":
        return "torch"
    usable = _faiss is not None and rows.device.type == "cpu" and rows.dtype == torch.float32
    if backend == "faiss":
        if not usable:
            raise InvalidInputError("backend='faiss' needs faiss installed and float32 CPU tensors")
        return "faiss"
    if backend != "auto":
        raise InvalidInputError(f"unknown backend {backend!r}; expected auto, torch or faiss")
    return "faiss" if usable else "torch"


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows; zero rows stay zero (their cosine distance to anything is 1)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def search(
    queries: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    metric: Metric = "ip",
    *,
    backend: Backend = "auto",
    rows_normalized: bool = False,
    row_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``queries`` (m, d) among ``rows`` (n, d). Distances mirror
    memstore.distances.distances (tested in tests/torch/test_semantics_mirrors.py).

    Returns ``(distances (m, k) float32, indices (m, k) int64)`` sorted nearest first.
    ``rows_normalized`` says ``rows`` are already unit-norm (cosine); ``row_sq_norms`` (n,) caches
    ``|row|^2`` for ``l2`` so a resident index pays for them once per mutation, not per query.
    """
    check_metric(metric)
    if queries.dim() != 2 or rows.dim() != 2 or queries.shape[1] != rows.shape[1]:
        raise InvalidInputError(
            f"queries {tuple(queries.shape)} and rows {tuple(rows.shape)} must be (m, d) and (n, d)"
        )
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    m, n = queries.shape[0], rows.shape[0]
    device = queries.device
    dist = torch.full((m, k), math.inf, dtype=torch.float32, device=device)
    idx = torch.full((m, k), -1, dtype=torch.int64, device=device)
    if m == 0 or n == 0:
        return dist, idx
    queries = queries.to(rows.dtype)
    if metric == "cosine":
        queries = normalize_rows(queries)
        if not rows_normalized:
            rows = normalize_rows(rows)
    kk = min(k, n)
    kernel = choose_backend(rows, metric, backend)
    if kernel == "faiss":
        d_found, i_found = _faiss_search(queries, rows, kk, metric)
    else:
        d_found, i_found = _torch_search(queries, rows, kk, metric, row_sq_norms)
    dist[:, :kk] = d_found
    idx[:, :kk] = i_found
    return dist, idx


def _faiss_search(
    queries: torch.Tensor, rows: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    q = queries.detach().contiguous().numpy()
    r = rows.detach().contiguous().numpy()
    faiss_metric = _faiss.METRIC_L2 if metric == "l2" else _faiss.METRIC_INNER_PRODUCT
    scores, found = _faiss.knn(q, r, k, metric=faiss_metric)
    scores = torch.from_numpy(scores)
    if metric == "l2":
        dist = scores.clamp_min(0).sqrt()
    elif metric == "cosine":
        dist = 1.0 - scores
    else:
        dist = -scores
    return dist.to(queries.device), torch.from_numpy(found).to(torch.int64)


def _torch_search(
    queries: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    metric: str,
    row_sq_norms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked matmul + per-tile selection + running merge; scores are 'higher = nearer'."""
    m, n = queries.shape[0], rows.shape[0]
    if metric == "l2" and row_sq_norms is None:
        row_sq_norms = (rows * rows).sum(dim=1)
    row_block = max(k, min(n, _ROW_BLOCK))
    query_block = max(1, min(m, _MAX_QUERY_BLOCK, _TILE_ELEMENTS // row_block))
    out_scores = torch.empty((m, k), dtype=rows.dtype, device=rows.device)
    out_idx = torch.empty((m, k), dtype=torch.int64, device=rows.device)
    for q0 in range(0, m, query_block):
        q = queries[q0 : q0 + query_block]
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for r0 in range(0, n, row_block):
            r1 = min(n, r0 + row_block)
            # Split off a tail so the main tile is a whole number of selection groups.
            main_end = r1 if (r1 - r0) < _GROUP * 4 * k else r0 + (r1 - r0) // _GROUP * _GROUP
            for a, b in ((r0, main_end), (main_end, r1)):
                if a == b:
                    continue
                s = q @ rows[a:b].T  # (qb, b - a) score tile
                if metric == "l2":
                    # -|q - r|^2 + |q|^2 = 2 q.r - |r|^2: same order, |q|^2 added back at the end.
                    s.mul_(2).sub_(row_sq_norms[a:b])
                s_top, i_top = _tile_topk(s, k)
                i_top += a
                if best_s is None:
                    best_s, best_i = s_top, i_top
                else:
                    cat_s = torch.cat([best_s, s_top], dim=1)
                    cat_i = torch.cat([best_i, i_top], dim=1)
                    best_s, j = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
                    best_i = cat_i.gather(1, j)
        out_scores[q0 : q0 + query_block] = best_s
        out_idx[q0 : q0 + query_block] = best_i
    if metric == "l2":
        q_sq = (queries * queries).sum(dim=1, keepdim=True)
        dist = (q_sq - out_scores).clamp_min(0).sqrt()
    elif metric == "cosine":
        dist = 1.0 - out_scores
    else:
        dist = -out_scores
    return dist.float(), out_idx


def _tile_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of a score tile (qb, w), best first.

    ``topk`` over the whole tile is what costs on CPU. When the width is a multiple of the group
    size, take each group's maximum (one cheap vectorised pass), keep the k groups with the largest
    maxima, and select among their k * G scores only. Exact: every one of the k best scores lies in
    a group whose maximum is at least that score, and at most k groups can hold them, so the k
    groups with the largest maxima contain all of them (ties between equal scores aside).
    """
    qb, width = s.shape
    if width % _GROUP or width < 4 * k * _GROUP:
        return s.topk(min(k, width), dim=1)
    group_max = s.view(qb, width // _GROUP, _GROUP).amax(dim=2)  # (qb, groups)
    groups = group_max.topk(k, dim=1).indices  # (qb, k)
    offsets = torch.arange(_GROUP, device=s.device)
    candidates = (groups[:, :, None] * _GROUP + offsets).reshape(qb, k * _GROUP)
    values, j = s.gather(1, candidates).topk(k, dim=1)
    return values, candidates.gather(1, j)


def brute_force(
    queries: torch.Tensor, rows: torch.Tensor, k: int, metric: Metric = "ip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference answer from the full distance matrix, in float64 (tests and small inputs only).
    Mirror of memstore.distances.pairwise_distances (tested in
    tests/torch/test_semantics_mirrors.py)."""
    check_metric(metric)
    q = queries.double()
    r = rows.double()
    if metric == "l2":
        d = torch.cdist(q, r)
    elif metric == "cosine":
        d = 1.0 - normalize_rows(q) @ normalize_rows(r).T
    else:
        d = -(q @ r.T)
    kk = min(k, r.shape[0])
    dist = torch.full((q.shape[0], k), math.inf, dtype=torch.float64)
    idx = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    if kk:
        v, i = d.topk(kk, dim=1, largest=False)
        dist[:, :kk], idx[:, :kk] = v, i
    return dist.float(), idx


def distance_to(queries: torch.Tensor, rows: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Distance of each query (m, d) to its paired row (m, d), in the store's convention.
    Mirror of memstore.distances.distances (tested in tests/torch/test_semantics_mirrors.py)."""
    if metric == "l2":
        return (queries - rows).norm(dim=-1)
    if metric == "cosine":
        return 1.0 - (normalize_rows(queries) * normalize_rows(rows)).sum(-1)
    return -(queries * rows).sum(-1)
