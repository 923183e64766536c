"""Benchmark of the memstore store on PostgreSQL + pgvector against raw pgvector, in one run.

    python benchmarks/store_pg.py                       # starts a throw-away server (pgserver)
    python benchmarks/store_pg.py --url postgresql://user:pw@host/db
    python benchmarks/store.py --url postgresql://...   # the same, through the store benchmark
    ... --json   # {"insert_rows_per_s", "raw_insert_rows_per_s", "query_ms", "raw_query_ms",
                 #  "rescore_recall_at_k", "rescore_speedup"}   (same keys as benchmarks/store.py)

The same table as ``benchmarks/store.py``, with the reference swapped for the one that matters on
this backend - raw pgvector through psycopg 3, as pgvector-python documents it:

* insert rows/s of ``Collection.insert`` (keys + values + LRFU state, one transaction) against a
  binary ``COPY`` of (id, key) rows into a bare ``vector(d)`` table with ``write_row`` per row;
* single-query latency of ``Collection.search`` (with and without the LRFU touch) against the raw
  ``SELECT id, key <-> q FROM t ORDER BY key <-> q LIMIT k`` (the metric's operator with
  ``--metric``); numpy brute force as the floor;
* recall@k and speed-up of the approximate index over exact search. On PostgreSQL the index kinds
  ``rescore-bit`` / ``rescore-int8`` are served by pgvector's HNSW (see docs/postgres.md), with
  ``hnsw.ef_search = k * oversample``.
Raw and store measurements alternate query by query so that load from other processes hits both.
The database given by ``--url`` must be empty or a memstore database; the benchmark's collections
and raw tables are dropped at the end.
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
import warnings
from importlib import metadata

import numpy as np

# memstore comes from the installed package (an editable install or a wheel), never from the
# checkout around this file: the checkout's memstore/ lacks memstore.migrations, which only an
# install maps in. benchmarks/ itself is sys.path[0] (the script's folder) for its helpers.
from machine_info import cpu_model  # benchmarks/ is sys.path[0]
from vector_data import bench_values, brute_force_topk, clustered

from memstore import Store
from memstore.naming import rows_table

RAW_TABLE = "memstore_bench_raw"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(url: str) -> dict:
    import psycopg

    model = cpu_model()
    with psycopg.connect(url) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        vector = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": server,
        "pgvector": vector[0] if vector else "not installed",
        "psycopg": _version("psycopg"),
        "numpy": np.__version__,
        "sqlalchemy": _version("sqlalchemy"),
        "torch": _version("torch"),
    }


def libpq_url(url: str) -> str:
    """psycopg.connect() takes the plain form; SQLAlchemy's driver suffix is dropped."""
    scheme, sep, rest = url.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


def raw_insert(url: str, keys: np.ndarray) -> float:
    """pgvector-python's bulk path: binary COPY, one write_row per row, one transaction."""
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        conn.execute(
            f"CREATE TABLE {RAW_TABLE} (id bigint PRIMARY KEY, key vector({keys.shape[1]}))"
        )
        conn.commit()
        start = time.perf_counter()
        with conn.cursor().copy(
            f"COPY {RAW_TABLE} (id, key) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "vector"])
            for i, key in enumerate(keys):
                copy.write_row([i, key])
        conn.commit()
        elapsed = time.perf_counter() - start
        conn.autocommit = True
        conn.execute(f"VACUUM ANALYZE {RAW_TABLE}")
    return len(keys) / elapsed


def store_insert(store: Store, name: str, keys: np.ndarray, **options) -> float:
    if store.has_collection(name):
        store.drop_collection(name)
    coll = store.create_collection(name, key_dim=keys.shape[1], **options)
    values = bench_values(keys, options.get("value_dim"))
    start = time.perf_counter()
    coll.insert(keys, values)
    return len(keys) / (time.perf_counter() - start)


def analyze(store: Store, name: str) -> None:
    """Fresh planner statistics, as autovacuum would give a real deployment after a bulk load."""
    table = rows_table(store.collection(name).spec)
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


OPERATORS = {"l2": "<->", "cosine": "<=>", "ip": "<#>"}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main_part(args, url: str, store: Store, rng: np.random.Generator) -> dict:
    import psycopg
    from pgvector.psycopg import register_vector

    n, dim, k = args.n, args.dim, args.k
    centers = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    keys = clustered(rng, n, dim, centers)
    queries = clustered(rng, args.queries, dim, centers)

    raw_rates, store_rates = [], []
    for _ in range(args.repeats):
        raw_rates.append(raw_insert(url, keys))
        store_rates.append(store_insert(store, "bench", keys, metric=args.metric))
    analyze(store, "bench")
    coll = store.collection("bench")

    norms = (keys**2).sum(1)
    times = {"raw": [], "store": [], "store_no_touch": [], "numpy": []}
    op = OPERATORS[args.metric]
    sql = f"SELECT id, key {op} %s AS d FROM {RAW_TABLE} ORDER BY key {op} %s LIMIT %s"
    with psycopg.connect(url) as raw:
        register_vector(raw)
        cur = raw.cursor(binary=True)
        coll.search(queries[:1], k, touch=False)  # warm connection pools and caches
        cur.execute(sql, (queries[0], queries[0], k)).fetchall()
        for q in queries:
            times["raw"].append(timed(lambda q=q: cur.execute(sql, (q, q, k)).fetchall()))
            times["store"].append(timed(lambda q=q: coll.search(q[None], k)))
            times["store_no_touch"].append(timed(lambda q=q: coll.search(q[None], k, touch=False)))
            times["numpy"].append(
                timed(lambda q=q: brute_force_topk(keys, norms, q, k, args.metric))
            )
        raw.execute(f"DROP TABLE {RAW_TABLE}")
        raw.commit()
    store.drop_collection("bench")
    return {
        "insert_rows_per_s": max(store_rates),
        "raw_insert_rows_per_s": max(raw_rates),
        **{f"{name}_ms": statistics.median(values) for name, values in times.items()},
    }


def index_part(args, store: Store, rng: np.random.Generator, dim: int, n: int) -> dict:
    centers = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    keys = clustered(rng, n, dim, centers)
    queries = clustered(rng, args.rescore_queries, dim, centers)
    norms = (keys**2).sum(1)
    truth = [set(brute_force_topk(keys, norms, q, args.k, args.metric).tolist()) for q in queries]
    results = {}
    for index in ("exact", "rescore-bit"):
        name = f"bench_{dim}_{index}"
        rate = store_insert(
            store,
            name,
            keys,
            value_dim=1,
            index=index,
            oversample=args.oversample,
            metric=args.metric,
        )
        analyze(store, name)
        coll = store.collection(name)
        coll.search(queries[:2], args.k, touch=False)
        times, recalls = [], []
        for q, want in zip(queries, truth, strict=True):
            start = time.perf_counter()
            res = coll.search(q[None], args.k, touch=False)
            times.append((time.perf_counter() - start) * 1e3)
            recalls.append(len(want & set(res.ids[0].tolist())) / args.k)
        store.drop_collection(name)
        results[index] = {
            "ms": statistics.median(times),
            "recall": float(np.mean(recalls)),
            "insert_rows_per_s": rate,
        }
    results["rescore-bit"]["speedup"] = results["exact"]["ms"] / results["rescore-bit"]["ms"]
    return results


def start_server() -> tuple[object, str, str]:
    """A throw-away pgserver instance (PostgreSQL 16 + pgvector) when no --url is given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    root = tempfile.mkdtemp(prefix="mspgb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    server = pgserver.get_server(root, cleanup_mode="delete")
    return server, server.get_uri(), root


def run(args) -> None:
    if not hasattr(args, "metric"):  # called from benchmarks/store.py, which has no --metric
        args.metric = "l2"
    server = root = None
    url = args.url
    if url is None:
        server, url, root = start_server()
    try:
        rng = np.random.default_rng(0)
        with Store(url) as store:
            main_figures = main_part(args, libpq_url(url), store, rng)
            dims = args.rescore_dims
            # HNSW builds cost ~1.7k rows/s at d=64, ~230 at d=768 here: 20k rows by default.
            n_index = args.rescore_n or min(args.n, 20_000)
            index = {dim: index_part(args, store, rng, dim, n_index) for dim in dims}
        info = machine(libpq_url(url))
    finally:
        if server is not None:
            server.cleanup()
            shutil.rmtree(root, ignore_errors=True)

    headline = 768 if 768 in index else (max(index) if index else None)
    if args.json:
        print(json.dumps({
            "insert_rows_per_s": round(main_figures["insert_rows_per_s"], 1),
            "raw_insert_rows_per_s": round(main_figures["raw_insert_rows_per_s"], 1),
            "query_ms": round(main_figures["store_ms"], 4),
            "raw_query_ms": round(main_figures["raw_ms"], 4),
            "rescore_recall_at_k": None if headline is None else round(index[headline]["rescore-bit"]["recall"], 4),
            "rescore_speedup": None if headline is None else round(index[headline]["rescore-bit"]["speedup"], 3),
        }))  # fmt: skip
        return

    where = "throw-away pgserver instance (Unix socket)" if server is not None else "--url server"
    print(f"machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, "
          f"PostgreSQL {info['postgresql']} + pgvector {info['pgvector']} ({where}), "
          f"psycopg {info['psycopg']}, numpy {info['numpy']}, SQLAlchemy {info['sqlalchemy']}, "
          f"torch {info['torch']} (not used)")  # fmt: skip
    print(f"data: clustered, {args.clusters} centres, N={args.n}, d={args.dim}, k={args.k}, "
          f"metric {args.metric}, "
          f"{args.queries} single queries (median), insert best of {args.repeats}\n")  # fmt: skip
    m = main_figures
    print("| measure | memstore (PostgreSQL) | raw pgvector | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| insert rows/s (keys+values+LRFU vs id+key) | {m['insert_rows_per_s']:,.0f} | "
        f"{m['raw_insert_rows_per_s']:,.0f} | {m['insert_rows_per_s'] / m['raw_insert_rows_per_s']:.2f}x |"
    )
    print(
        f"| query ms (search, LRFU touch) | {m['store_ms']:.2f} | {m['raw_ms']:.2f} | "
        f"{m['store_ms'] / m['raw_ms']:.2f}x |"
    )
    print(
        f"| query ms (search, touch=False) | {m['store_no_touch_ms']:.2f} | {m['raw_ms']:.2f} | "
        f"{m['store_no_touch_ms'] / m['raw_ms']:.2f}x |"
    )
    print(f"| query ms, numpy brute force (floor) | {m['numpy_ms']:.2f} | | |")  # fmt: skip
    print()
    print(f"approximate index vs exact (N={args.rescore_n or min(args.n, 20_000)}, k={args.k}, oversample "
          f"{args.oversample} -> hnsw.ef_search {args.k * args.oversample}, "
          f"{args.rescore_queries} queries, touch=False):\n")  # fmt: skip
    print("| d | index | insert rows/s | query ms | recall@k | speed-up vs exact |")
    print("|---:|---|---:|---:|---:|---:|")
    for dim, res in index.items():
        for kind, r in res.items():
            label = "rescore-bit (HNSW)" if kind == "rescore-bit" else kind
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            print(f"| {dim} | {label} | {r['insert_rows_per_s']:,.0f} | {r['ms']:.2f} | "
                  f"{r['recall']:.3f} | {speed} |")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="postgresql:// URL (default: start pgserver)")
    p.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--metric", choices=sorted(OPERATORS), default="l2", help="of every collection")
    p.add_argument("--queries", type=int, default=200, help="single queries timed")
    p.add_argument("--repeats", type=int, default=2, help="insert repetitions (best is kept)")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--rescore-dims", type=int, nargs="*", default=[64, 768])
    p.add_argument("--rescore-n", type=int, default=None, help="rows of the index part (20000)")
    p.add_argument("--rescore-queries", type=int, default=50)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the JSON of the issue only")
    return p


if __name__ == "__main__":
    run(parser().parse_args())
