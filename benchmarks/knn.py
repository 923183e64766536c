"""Resident exact kNN (memstore_torch.ResidentIndex) vs FAISS IndexFlatIP, same data, same run.

d=64, 4096 queries, k=16, inner product, N in {100k, 1M} Gaussian rows; both sides get the same
thread count; timings are interleaved and the median of ``--repeats`` is reported. The resident
index uses its default kernel (FAISS's exhaustive kernel on the resident tensors when faiss is
installed); the table also shows the index's pure-torch kernel (``backend="torch"``: blocked
matmul + grouped exact selection), which runs without faiss and on CUDA.

    python benchmarks/knn.py [--json] [--threads 2] [--sizes 100000,1000000] [--repeats 5]
                            [--no-torch-backend]

``--json`` prints one JSON list with an object per N: ``n``, ``qps``, ``faiss_qps``, ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import faiss
import numpy as np
import torch
from machine_info import cpu_model  # benchmarks/ is sys.path[0]

from memstore_torch import ResidentIndex
from memstore_torch import knn as knn_kernels


def machine(threads: int) -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}, "
        f"faiss {faiss.__version__}"
    )


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_kernel_search(q: torch.Tensor, rows: torch.Tensor, k: int):
    """The index's pure-torch kernel, forced even where faiss is installed (the torch-kernel
    column: what runs without faiss and on CUDA)."""
    return knn_kernels.search(q, rows, k, "ip", backend="torch")


def run_size(n: int, d: int, m: int, k: int, repeats: int, with_torch_backend: bool) -> dict:
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((m, d), dtype=np.float32)
    flat = faiss.IndexFlatIP(d)
    flat.add(rows)
    index = ResidentIndex(d, d, "ip", max_rows=n)
    index.insert(torch.from_numpy(rows))
    q = torch.from_numpy(queries)

    # Same answers first: the resident index must equal FAISS's exact search.
    ref_scores, ref_ids = flat.search(queries[:256], k)
    hits = index.search(q[:256], k)
    assert np.allclose(-hits.distances.numpy(), ref_scores, atol=1e-3)
    assert (hits.slots.numpy() == ref_ids).mean() > 0.999  # same rows (up to exact ties)
    torch_dist, torch_slots = torch_kernel_search(q[:256], index.keys, k)
    assert np.allclose(-torch_dist.numpy(), ref_scores, atol=1e-3)
    assert (torch_slots.numpy() == ref_ids).mean() > 0.999

    times: dict[str, list[float]] = {"faiss": [], "resident": [], "torch_backend": []}
    for rep in range(repeats):
        # Alternate who goes first so neither side systematically inherits the other's caches.
        order = ["faiss", "resident"] if rep % 2 == 0 else ["resident", "faiss"]
        for side in order:
            if side == "faiss":
                times["faiss"].append(timed(lambda: flat.search(queries, k)))
            else:
                times["resident"].append(timed(lambda: index.search(q, k)))
        if with_torch_backend:
            times["torch_backend"].append(timed(lambda: torch_kernel_search(q, index.keys, k)))
    faiss_qps = m / statistics.median(times["faiss"])
    qps = m / statistics.median(times["resident"])
    torch_backend_qps = (
        m / statistics.median(times["torch_backend"]) if with_torch_backend else None
    )
    return {
        "n": n,
        "qps": qps,
        "faiss_qps": faiss_qps,
        "ratio": qps / faiss_qps,
        "_torch_backend_qps": torch_backend_qps,
        "_backend": knn_kernels.choose_backend(index.keys, "ip"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("-k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--no-torch-backend", action="store_true", help="skip the backend='torch' column"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    results = [
        run_size(int(n), args.dim, args.queries, args.k, args.repeats, not args.no_torch_backend)
        for n in args.sizes.split(",")
    ]
    if args.json:
        print(
            json.dumps(
                [{key: r[key] for key in ("n", "qps", "faiss_qps", "ratio")} for r in results]
            )
        )
        return
    print(f"machine: {machine(args.threads)}")
    print(
        f"d={args.dim}, {args.queries} queries, k={args.k}, ip, median of {args.repeats}; "
        f"resident backend: {results[0]['_backend']}"
    )
    print(f"{'N':>9}{'resident q/s':>14}{'FAISS q/s':>12}{'ratio':>8}{'torch-kernel q/s':>19}")
    for r in results:
        extra = r["_torch_backend_qps"]
        extra_col = f"{extra:>19.0f}" if extra else f"{'-':>19}"
        print(f"{r['n']:>9}{r['qps']:>14.0f}{r['faiss_qps']:>12.0f}{r['ratio']:>8.2f}{extra_col}")


if __name__ == "__main__":
    main()
