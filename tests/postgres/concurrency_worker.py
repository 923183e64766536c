"""A process of the concurrency test (run as a script: ``python concurrency_worker.py ROLE ...``).

writer: inserts BATCHES batches of ROWS rows tagged (writer, batch, row) in their values, with a
        touching search (a write transaction: LRFU update + clock) after every batch;
reader: until the stop file appears, checks that it only ever sees whole batches, a count that
        never shrinks, and unique ids; prints a JSON summary of what it observed.

Two hand-shake files beside the stop file make "the reader read while the writers wrote" certain
rather than a matter of timing: the reader creates ``<stop>.ready`` after its first read (of the
empty collection) and writers start only then; it creates ``<stop>.seen`` once it has read a
non-empty collection, and writers go past their first batch only then.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from memstore import Store


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path.name}")
        time.sleep(0.01)


def writer(url: str, name: str, tag: int, batches: int, rows: int, stop_file: str) -> None:
    rng = np.random.default_rng(tag)
    _wait_for(Path(stop_file + ".ready"))
    with Store(url) as store:
        coll = store.collection(name)
        for batch in range(batches):
            if batch == 1:
                _wait_for(Path(stop_file + ".seen"))
            values = np.zeros((rows, 4), np.float32)
            values[:, 0], values[:, 1], values[:, 2] = tag, batch, np.arange(rows)
            coll.insert(rng.standard_normal((rows, 4)).astype(np.float32), values)
            coll.search(rng.standard_normal((2, 4)).astype(np.float32), 3)
    print(json.dumps({"role": "writer", "tag": tag}))


def reader(url: str, name: str, rows: int, stop_file: str) -> None:
    seen, last, reads = [], 0, 0
    deadline = time.monotonic() + 120
    with Store(url) as store:
        coll = store.collection(name)
        while not Path(stop_file).exists() and time.monotonic() < deadline:
            block = coll.export_rows()
            n = len(block)
            if n % rows:
                raise SystemExit(f"reader saw a partial batch: {n} rows")
            if n < last:
                raise SystemExit(f"row count went back from {last} to {n}")
            if len(np.unique(block.ids)) != n:
                raise SystemExit("reader saw duplicate ids")
            coll.search(np.ones((1, 4), np.float32), 2, touch=False)
            last, reads = n, reads + 1
            seen.append(n)
            Path(stop_file + ".ready").touch()
            if n:
                Path(stop_file + ".seen").touch()
    print(json.dumps({"role": "reader", "reads": reads, "distinct_counts": len(set(seen))}))


if __name__ == "__main__":
    role, url, name = sys.argv[1], sys.argv[2], sys.argv[3]
    if role == "writer":
        writer(url, name, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    else:
        reader(url, name, int(sys.argv[4]), sys.argv[5])
