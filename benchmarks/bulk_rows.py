"""Bulk flush and load of a large collection against raw SQLite, in one run.

    python benchmarks/bulk_rows.py                      # table: 1M rows, value_dim 256
    python benchmarks/bulk_rows.py --json               # one JSON object
    python benchmarks/bulk_rows.py --rows 100000 --value-dim 768 --indexes exact,none

What a memory layer does with its collection at a checkpoint and at start-up:

* **first flush**: ``Collection.apply_changes`` upserting every row of an empty collection (ids
  1..N, keys, values and LRFU state; one transaction) -- against raw ``executemany`` of
  ``INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)`` into a plain table of the same columns, one
  transaction, same driver, page size and journal mode;
* **re-flush**: ``apply_changes`` of the same ids with new values and LRFU state (every row
  exists) -- against raw ``executemany`` of ``UPDATE t SET key = ?, value = ?, ... WHERE id = ?``;
* **load**: ``Collection.export_rows()`` (every row as numpy arrays, ordered by id) -- against
  raw ``SELECT ... ORDER BY id`` turned into the same arrays (both after a WAL checkpoint, best
  of two reads).

Rates are rows/s (best of ``--repeats``; rounds alternate which side runs first). Keys default to 2 floats, the ``[i, j]`` sub-key address
a product-key memory stores per row (docs/layers.md, Large memory); values are float32 of
``--value-dim``. ``--indexes`` picks the collections' index kinds (``exact`` keeps a sqlite-vec
``vec0`` kNN index beside the rows; ``none`` stores rows only, for memories searched in torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine_info import cpu_model  # (benchmarks/ is sys.path[0])

from memstore import Store
from memstore.sqlite_driver import PAGE_SIZE, prepare_connection, sqlite_module
from memstore.types import RowBlock

COLUMNS = "id, key, value, crf, last_tick, hits, created_tick"
#: Each round reads the rows back this often (best counts): the first read after a bulk write
#: also pays for a cold page cache, whichever side runs first.
READS = 2


def machine() -> str:
    module = sqlite_module()
    conn = module.connect(":memory:")
    version = conn.execute("SELECT sqlite_version()").fetchone()[0]
    conn.close()
    return f"{cpu_model()}, {os.cpu_count()} cores, {module.__name__} (SQLite {version})"


def make_rows(n: int, key_dim: int, value_dim: int, seed: int) -> RowBlock:
    """Rows as a layer flushes them: consecutive ids from 1, keys, values, LRFU state."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n + 1, dtype=np.int64)
    if key_dim == 2:  # the [i, j] address of a product-key row
        side = int(np.ceil(np.sqrt(n)))
        keys = np.stack([(ids - 1) // side, (ids - 1) % side], axis=1).astype(np.float32)
    else:
        keys = rng.standard_normal((n, key_dim), dtype=np.float32)
    values = rng.standard_normal((n, value_dim), dtype=np.float32)
    return RowBlock(
        ids=ids,
        keys=keys,
        values=values,
        crf=rng.uniform(1.0, 4.0, n),
        last_tick=rng.integers(0, 100, n),
        hits=rng.integers(0, 50, n),
        created_tick=np.zeros(n, np.int64),
    )


def changed(rows: RowBlock, seed: int) -> RowBlock:
    """The same ids with new values and LRFU state (what a training step changes)."""
    rng = np.random.default_rng(seed)
    return RowBlock(
        ids=rows.ids,
        keys=rows.keys,
        values=rows.values + np.float32(0.01),
        crf=rows.crf + 1.0,
        last_tick=rows.last_tick + 1,
        hits=rows.hits + rng.integers(0, 3, len(rows)),
        created_tick=rows.created_tick,
    )


def fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


def raw_connection(path: Path):
    """Same driver, connection setup (page size, WAL, synchronous) as the store's."""
    conn = sqlite_module().connect(str(path), isolation_level=None)
    prepare_connection(conn, file_backed=True)
    conn.execute(f"PRAGMA page_size = {int(PAGE_SIZE)}")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def raw_tuples(rows: RowBlock):
    """One parameter tuple per row, made as ``executemany`` consumes them."""
    return zip(
        rows.ids.tolist(),
        (k.tobytes() for k in rows.keys),
        (v.tobytes() for v in rows.values),
        rows.crf.tolist(),
        rows.last_tick.tolist(),
        rows.hits.tolist(),
        rows.created_tick.tolist(),
        strict=True,
    )


def checkpoint(path: Path) -> None:
    """Fold the WAL into the database file (not timed), so both reads start from the same state."""
    conn = raw_connection(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def decode(result: list[tuple], key_dim: int, value_dim: int) -> RowBlock:
    """The rows as numpy arrays, decoded as the store decodes them (one copy per blob column)."""
    n = len(result)
    keys = bytearray().join([r[1] for r in result])
    values = bytearray().join([r[2] for r in result])
    return RowBlock(
        ids=np.fromiter((r[0] for r in result), np.int64, n),
        keys=np.frombuffer(keys, np.float32).reshape(n, key_dim),
        values=np.frombuffer(values, np.float32).reshape(n, value_dim),
        crf=np.fromiter((r[3] for r in result), np.float64, n),
        last_tick=np.fromiter((r[4] for r in result), np.int64, n),
        hits=np.fromiter((r[5] for r in result), np.int64, n),
        created_tick=np.fromiter((r[6] for r in result), np.int64, n),
    )


def raw_round(path: Path, rows: RowBlock, again: RowBlock) -> dict[str, float]:
    """Seconds of the raw insert (tuples built inside the timing, as any caller must), update
    and select of the same rows."""
    conn = raw_connection(fresh(path))
    conn.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL, "
        "crf REAL NOT NULL, last_tick INTEGER NOT NULL, hits INTEGER NOT NULL, "
        "created_tick INTEGER NOT NULL)"
    )
    out = {}
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO t ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", raw_tuples(rows))
    conn.execute("COMMIT")
    out["insert"] = time.perf_counter() - start
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(
        "UPDATE t SET key = ?2, value = ?3, crf = ?4, last_tick = ?5, hits = ?6, "
        "created_tick = ?7 WHERE id = ?1",
        raw_tuples(again),
    )
    conn.execute("COMMIT")
    out["update"] = time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out["select"] = math.inf
    for _ in range(READS):
        start = time.perf_counter()
        block = decode(
            conn.execute(f"SELECT {COLUMNS} FROM t ORDER BY id").fetchall(),
            rows.keys.shape[1],
            rows.values.shape[1],
        )
        out["select"] = min(out["select"], time.perf_counter() - start)
        del block
    conn.close()
    return out


def store_round(path: Path, rows: RowBlock, again: RowBlock, index: str) -> dict[str, float]:
    """Seconds of the store's first flush, re-flush and export of the same rows."""
    store = Store(f"sqlite:///{fresh(path)}")
    try:
        coll = store.create_collection(
            "bulk",
            key_dim=rows.keys.shape[1],
            value_dim=rows.values.shape[1],
            metric="l2",
            index=index,
        )
        out = {}
        start = time.perf_counter()
        coll.apply_changes(upserts=rows, clock=100)
        out["insert"] = time.perf_counter() - start
        start = time.perf_counter()
        coll.apply_changes(upserts=again, clock=101)
        out["update"] = time.perf_counter() - start
        checkpoint(path)
        out["select"] = math.inf
        for _ in range(READS):
            start = time.perf_counter()
            block = coll.export_rows()
            out["select"] = min(out["select"], time.perf_counter() - start)
            assert np.array_equal(block.ids, again.ids)
            assert np.array_equal(block.values, again.values)
            assert np.array_equal(block.hits, again.hits)
            del block
        return out
    finally:
        store.close()


def run(args) -> dict:
    rows = make_rows(args.rows, args.key_dim, args.value_dim, seed=0)
    again = changed(rows, seed=1)
    workdir = Path(tempfile.mkdtemp(prefix="memstore-bulk-", dir=args.workdir))
    indexes = [s for s in args.indexes.split(",") if s]
    best: dict[str, dict[str, float]] = {}
    try:
        for rep in range(args.repeats):
            sides = ["raw", *indexes]
            rounds = {}
            for side in sides if rep % 2 == 0 else sides[::-1]:  # alternate who goes first
                path = workdir / f"{side}.db"
                if side == "raw":
                    rounds[side] = raw_round(path, rows, again)
                else:
                    rounds[side] = store_round(path, rows, again, side)
                fresh(path)
            for name, seconds in rounds.items():
                for op, s in seconds.items():
                    best.setdefault(name, {})[op] = min(best.get(name, {}).get(op, s), s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = args.rows
    result: dict[str, object] = {
        "machine": machine(),
        "rows": n,
        "key_dim": args.key_dim,
        "value_dim": args.value_dim,
    }
    for op in ("insert", "update", "select"):
        result[f"raw_{op}_rows_per_s"] = n / best["raw"][op]
    for index in indexes:
        tag = index.replace("-", "_")
        for op in ("insert", "update", "select"):
            rate = n / best[index][op]
            result[f"store_{tag}_{op}_rows_per_s"] = rate
            result[f"store_{tag}_{op}_vs_raw"] = rate / result[f"raw_{op}_rows_per_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--key-dim", type=int, default=2)
    ap.add_argument("--value-dim", type=int, default=256)
    ap.add_argument("--indexes", default="exact,none", help="index kinds, comma-separated")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the databases go (default: tmp)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(
        f"{args.rows:,} rows, key_dim {args.key_dim}, value_dim {args.value_dim}, "
        f"best of {args.repeats}; rows/s (x raw SQLite)"
    )
    print(f"{'':<14}{'first flush':>22}{'re-flush':>22}{'load':>22}")
    raw = [result[f"raw_{op}_rows_per_s"] for op in ("insert", "update", "select")]
    print(f"{'raw SQLite':<14}" + "".join(f"{r:>15,.0f}       " for r in raw))
    for index in [s for s in args.indexes.split(",") if s]:
        tag = index.replace("-", "_")
        cells = "".join(
            f"{result[f'store_{tag}_{op}_rows_per_s']:>15,.0f} ({result[f'store_{tag}_{op}_vs_raw']:.2f}x)"
            for op in ("insert", "update", "select")
        )
        print(f"{'index=' + index:<14}{cells}")


if __name__ == "__main__":
    main()
