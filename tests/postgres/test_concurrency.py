"""Two processes writing to one collection and a reader at the same time lose nothing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstore import Store

WORKER = Path(__file__).with_name("concurrency_worker.py")
BATCHES, ROWS = 25, 20


@pytest.mark.slow
def test_two_writers_and_a_reader_lose_nothing(pg_url, tmp_path):
    with Store(pg_url) as store:
        store.create_collection("shared", key_dim=4, metric="l2")
    stop = tmp_path / "stop"
    run = [sys.executable, str(WORKER)]
    reader = subprocess.Popen(
        run + ["reader", pg_url, "shared", str(ROWS), str(stop)], stdout=subprocess.PIPE, text=True
    )
    writers = [
        subprocess.Popen(
            run + ["writer", pg_url, "shared", str(tag), str(BATCHES), str(ROWS), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in (1, 2)
    ]
    try:
        for proc in writers:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
    finally:
        stop.touch()
        reader_out, _ = reader.communicate(timeout=240)
    assert reader.returncode == 0, reader_out
    observed = json.loads(reader_out.strip().splitlines()[-1])
    assert observed["reads"] > 0
    assert (
        observed["distinct_counts"] >= 2
    )  # it did read while the writers were writing (hand-shake)

    total = 2 * BATCHES * ROWS
    with Store(pg_url) as store:
        coll = store.collection("shared")
        block = coll.export_rows()
        stats = coll.stats()
    assert len(block) == total
    assert block.ids.tolist() == list(range(total))  # ids allocated without gaps or collisions
    tags = block.values[:, :3].astype(int)
    for tag in (1, 2):
        mine = tags[tags[:, 0] == tag]
        assert len(mine) == BATCHES * ROWS
        expected = {(tag, b, r) for b in range(BATCHES) for r in range(ROWS)}
        assert set(map(tuple, mine.tolist())) == expected
    assert stats["inserts"] == total
    assert stats["searches"] == 2 * BATCHES  # counters of concurrent writers are not lost
    assert stats["clock"] == 2 * BATCHES  # every touching search advanced the clock once
    assert int(block.hits.sum()) == 2 * BATCHES * 2 * 3  # 2 queries x 3 hits each, all recorded
    assert np.isfinite(block.crf).all()
