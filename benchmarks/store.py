"""Benchmark of the memstore SQL store against raw sqlite-vec and numpy, in one run.

    python benchmarks/store.py            # table (N=100k, d=64, k=16; rescore at d=64 and d=768)
    python benchmarks/store.py --json     # {"insert_rows_per_s",
                                          #  "insert_distinct_values_rows_per_s",
                                          #  "raw_insert_rows_per_s",
                                          #  "query_ms", "raw_query_ms",
                                          #  "rescore_recall_at_k", "rescore_speedup"}  (d=768 rescore)

Measures, on clustered data (Gaussian blobs around random centres):
* insert rows/s of ``Collection.insert`` (keys + values + LRFU state, one transaction) against raw
  sqlite-vec ``executemany`` into a bare ``vec0`` table (keys only, one transaction): with values
  equal to the keys (the default, ``insert(keys)``: stored once) and with distinct values (stored
  beside the keys), and the files' sizes at rest;
* single-query latency of ``Collection.search`` (one query, k, with and without the LRFU touch)
  against the raw ``SELECT id, distance FROM vec0 WHERE key MATCH ? AND k = ?``; numpy brute force
  (one query against the in-memory keys) as the floor;
* recall@k and speed-up of ``index="rescore-bit"`` (and ``rescore-int8``) over ``index="exact"`` at
  d=64 and d=768 (GPT-2's width).
Raw and store measurements alternate query by query so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

# One BLAS thread unless told otherwise: SQLite answers a query on one core, so the numpy floor
# is measured on one too (and multi-threaded BLAS degrades badly on a loaded 2-core machine).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# memstore comes from the installed package (an editable install or a wheel), never from the
# checkout around this file: the checkout's memstore/ lacks memstore.migrations, which only an
# install maps in. benchmarks/ itself is sys.path[0] (the script's folder) for its helpers.
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])
from vector_data import SPREAD, bench_values, brute_force_topk, clustered  # noqa: E402

from memstore import Store  # noqa: E402
from memstore.sqlite_driver import (  # noqa: E402
    PAGE_SIZE,
    load_sqlite_vec,
    prepare_connection,
    sqlite_module,
)

DEFAULT_PAGE_SIZE = 4096  # SQLite's default
RAW_VARIANTS = {"raw": PAGE_SIZE, "raw_default_pages": DEFAULT_PAGE_SIZE}


def machine() -> dict:
    model = cpu_model()
    module = sqlite_module()
    conn = module.connect(":memory:")
    load_sqlite_vec(conn)
    sqlite_version, vec_version = conn.execute("SELECT sqlite_version(), vec_version()").fetchone()
    conn.close()

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "sqlite_driver": module.__name__,
        "sqlite": sqlite_version,
        "sqlite_vec": vec_version,
        "numpy": np.__version__,
        "torch": version("torch"),
        "sqlalchemy": version("sqlalchemy"),
    }


def raw_connection(path: Path, page_size: int = DEFAULT_PAGE_SIZE):
    """A plain sqlite-vec connection (same driver, WAL, synchronous=NORMAL); ``page_size`` only
    matters for a new file: SQLite's default 4096, or memstore's 16384."""
    conn = sqlite_module().connect(str(path))
    prepare_connection(conn, file_backed=True)
    conn.execute(f"PRAGMA page_size = {int(page_size)}")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def raw_insert(path: Path, keys: np.ndarray, page_size: int) -> float:
    conn = raw_connection(path, page_size)
    conn.execute(
        f"CREATE VIRTUAL TABLE v USING vec0(id integer primary key, key float[{keys.shape[1]}])"
    )
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO v(id, key) VALUES (?, ?)",
        zip(range(len(keys)), [k.tobytes() for k in keys], strict=True),
    )
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(keys) / elapsed


def store_insert(path: Path, keys: np.ndarray, values=None, **options) -> tuple[float, Store]:
    store = Store(f"sqlite:///{path}")
    coll = store.create_collection("bench", key_dim=keys.shape[1], **options)
    if values is None:
        values = bench_values(keys, options.get("value_dim"))
    start = time.perf_counter()
    coll.insert(keys, values)
    elapsed = time.perf_counter() - start
    return len(keys) / elapsed, store


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def fresh(workdir: Path, name: str) -> Path:
    path = workdir / name
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


def main_part(args, workdir: Path, rng: np.random.Generator) -> dict:
    n, dim, k = args.n, args.dim, args.k
    centers = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    keys = clustered(rng, n, dim, centers)
    queries = clustered(rng, args.queries, dim, centers)

    raw_rates = {name: [] for name in RAW_VARIANTS}
    store_rates, distinct_rates = [], []
    distinct = keys[::-1] + np.float32(1)  # as many bytes as the keys, none equal to its key
    store = None
    for rep in range(args.repeats):
        for name, page_size in RAW_VARIANTS.items():
            raw_rates[name].append(raw_insert(fresh(workdir, f"{name}.db"), keys, page_size))
        if store is not None:
            store.close()
        rate, other = store_insert(fresh(workdir, "distinct.db"), keys, values=distinct)
        other.close()
        distinct_rates.append(rate)
        rate, store = store_insert(fresh(workdir, f"store{rep}.db"), keys)
        store_rates.append(rate)
    store.close()  # at rest: the insert's WAL is checkpointed on close, as the raw table's was
    sizes = {
        "raw": (workdir / "raw.db").stat().st_size,
        "store": (workdir / f"store{args.repeats - 1}.db").stat().st_size,
        "distinct": (workdir / "distinct.db").stat().st_size,
    }
    store = Store(f"sqlite:///{workdir / f'store{args.repeats - 1}.db'}")
    coll = store.collection("bench")

    raws = {name: raw_connection(workdir / f"{name}.db") for name in RAW_VARIANTS}
    sql = "SELECT id, distance FROM v WHERE key MATCH ? AND k = ?"
    norms = (keys.astype(np.float32) ** 2).sum(1)
    times = {"raw": [], "raw_default_pages": [], "store": [], "store_no_touch": [], "numpy": []}
    for q in queries:
        one = q[None]
        for name, conn in raws.items():
            times[name].append(
                timed(lambda b, c=conn: c.execute(sql, (b, k)).fetchall(), q.tobytes())
            )
        times["store"].append(timed(coll.search, one, k))
        times["store_no_touch"].append(timed(lambda x: coll.search(x, k, touch=False), one))
        times["numpy"].append(timed(brute_force_topk, keys, norms, q, k))
    for conn in raws.values():
        conn.close()
    store.close()
    return {
        "insert_rows_per_s": max(store_rates),
        "insert_distinct_values_rows_per_s": max(distinct_rates),
        "raw_insert_rows_per_s": max(raw_rates["raw"]),
        **{f"{name}_file_bytes": size for name, size in sizes.items()},
        "raw_default_pages_insert_rows_per_s": max(raw_rates["raw_default_pages"]),
        **{f"{name}_ms": statistics.median(values) for name, values in times.items()},
        **{f"{name}_p10_ms": float(np.percentile(values, 10)) for name, values in times.items()},
    }


def rescore_part(args, workdir: Path, rng: np.random.Generator, dim: int, n: int) -> dict:
    centers = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    keys = clustered(rng, n, dim, centers)
    queries = clustered(rng, args.rescore_queries, dim, centers)
    norms = (keys**2).sum(1)
    truth = [set(brute_force_topk(keys, norms, q, args.k).tolist()) for q in queries]
    results = {}
    for index in ("exact", "rescore-bit", "rescore-int8"):
        _, store = store_insert(
            fresh(workdir, f"r{dim}_{index}.db"),
            keys,
            value_dim=1,
            index=index,
            oversample=args.oversample,
        )
        coll = store.collection("bench")
        coll.search(queries[:2], args.k, touch=False)  # warm the page cache
        times, recalls = [], []
        for q, want in zip(queries, truth, strict=True):
            start = time.perf_counter()
            res = coll.search(q[None], args.k, touch=False)
            times.append((time.perf_counter() - start) * 1e3)
            recalls.append(len(want & set(res.ids[0].tolist())) / args.k)
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(workdir / f"r{dim}_{index}.db") + suffix).unlink(missing_ok=True)
        results[index] = {"ms": statistics.median(times), "recall": float(np.mean(recalls))}
    for index in ("rescore-bit", "rescore-int8"):
        results[index]["speedup"] = results["exact"]["ms"] / results[index]["ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    parser.add_argument("--dim", type=int, default=64, help="key dim of the insert/query part")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--queries", type=int, default=200, help="single queries timed")
    parser.add_argument("--repeats", type=int, default=2, help="insert repetitions (best is kept)")
    parser.add_argument(
        "--clusters", type=int, default=1000, help="cluster centres; 0 = plain Gaussian data"
    )
    parser.add_argument("--rescore-dims", type=int, nargs="*", default=[64, 768])
    parser.add_argument(
        "--rescore-n", type=int, default=None, help="rows for the rescore part (default --n)"
    )
    parser.add_argument("--rescore-queries", type=int, default=50)
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the databases go (default: a temp dir)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON of the issue only")
    parser.add_argument(
        "--url",
        default=None,
        help="postgresql:// URL: the same table on PostgreSQL + pgvector, raw pgvector as the "
        "reference (benchmarks/store_pg.py); default: SQLite files in --workdir",
    )
    args = parser.parse_args()
    if args.url is not None and not args.url.startswith("sqlite"):
        import store_pg  # benchmarks/ is sys.path[0] when run as a script

        store_pg.run(args)
        return

    rng = np.random.default_rng(0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="memstore-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        main_figures = main_part(args, workdir, rng)
        rescore = {
            dim: rescore_part(args, workdir, rng, dim, args.rescore_n or args.n)
            for dim in args.rescore_dims
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    headline_dim = 768 if 768 in rescore else max(rescore) if rescore else None
    if args.json:
        print(
            json.dumps(
                {
                    "insert_rows_per_s": round(main_figures["insert_rows_per_s"], 1),
                    "insert_distinct_values_rows_per_s": round(
                        main_figures["insert_distinct_values_rows_per_s"], 1
                    ),
                    "raw_insert_rows_per_s": round(main_figures["raw_insert_rows_per_s"], 1),
                    "query_ms": round(main_figures["store_ms"], 4),
                    "raw_query_ms": round(main_figures["raw_ms"], 4),
                    "rescore_recall_at_k": None
                    if headline_dim is None
                    else round(rescore[headline_dim]["rescore-bit"]["recall"], 4),
                    "rescore_speedup": None
                    if headline_dim is None
                    else round(rescore[headline_dim]["rescore-bit"]["speedup"], 3),
                }
            )
        )
        return

    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, {info['sqlite_driver']} "
        f"(SQLite {info['sqlite']}), sqlite-vec {info['sqlite_vec']}, numpy {info['numpy']}, "
        f"SQLAlchemy {info['sqlalchemy']}, torch {info['torch']} (not used)"
    )
    print(
        f"threads: SQLite 1, numpy BLAS {os.environ.get('OPENBLAS_NUM_THREADS')}; "
        f"load average {os.getloadavg()[0]:.1f} when the run ended (other processes share the cores)"
    )
    print(
        f"data: {'Gaussian' if args.clusters == 0 else f'clustered, {args.clusters} centres (spread {SPREAD})'}, N={args.n}, d={args.dim}, k={args.k}, "
        f"{args.queries} single queries (median), insert best of {args.repeats}\n"
    )
    m = main_figures
    print(
        f"raw sqlite-vec = the same driver and pragmas with memstore's {PAGE_SIZE}-byte pages (the "
        f"JSON's raw_* figures); SQLite's default 4096-byte pages in the last column\n"
    )
    print("| measure | memstore | raw sqlite-vec | ratio | target | raw, 4 KiB pages |")
    print("|---|---:|---:|---:|---|---:|")
    print(
        f"| insert rows/s (keys+values+LRFU vs keys only) | {m['insert_rows_per_s']:,.0f} | "
        f"{m['raw_insert_rows_per_s']:,.0f} | {m['insert_rows_per_s'] / m['raw_insert_rows_per_s']:.2f}x | >= 0.7x "
        f"| {m['raw_default_pages_insert_rows_per_s']:,.0f} |"
    )
    print(
        f"| insert rows/s, distinct values (keys+values+LRFU vs keys only) | "
        f"{m['insert_distinct_values_rows_per_s']:,.0f} | {m['raw_insert_rows_per_s']:,.0f} | "
        f"{m['insert_distinct_values_rows_per_s'] / m['raw_insert_rows_per_s']:.2f}x | | |"
    )
    for label, key in (("values = keys", "store"), ("distinct values", "distinct")):
        print(
            f"| file MB at rest, {label} | {m[f'{key}_file_bytes'] / 1e6:.1f} | "
            f"{m['raw_file_bytes'] / 1e6:.1f} | {m[f'{key}_file_bytes'] / m['raw_file_bytes']:.2f}x "
            "| | |"
        )
    for label, key in (
        ("search, LRFU touch (default)", "store"),
        ("search, touch=False", "store_no_touch"),
    ):
        for stat, suffix in (("median", ""), ("p10", "_p10")):
            ours, raw = m[f"{key}{suffix}_ms"], m[f"raw{suffix}_ms"]
            print(
                f"| query ms, {label}, {stat} | {ours:.2f} | {raw:.2f} | {ours / raw:.2f}x | <= 1.2x "
                f"| {m[f'raw_default_pages{suffix}_ms']:.2f} |"
            )
    print(f"| query ms, numpy brute force (floor), median | {m['numpy_ms']:.2f} | | | | |")
    print()
    print(
        f"rescore indexes vs exact (N={args.rescore_n or args.n}, k={args.k}, oversample {args.oversample}, "
        f"{args.rescore_queries} queries, touch=False):\n"
    )
    print("| d | index | query ms | recall@k | speed-up vs exact |")
    print("|---:|---|---:|---:|---:|")
    for dim, res in rescore.items():
        for index, r in res.items():
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            print(f"| {dim} | {index} | {r['ms']:.2f} | {r['recall']:.3f} | {speed} |")


if __name__ == "__main__":
    main()
