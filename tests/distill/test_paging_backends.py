"""A paged distillation on each backend: the rows written back between checkpoints reach the
database only with the next checkpoint, so a run that dies in between leaves the database exactly
as of its last checkpoint (SQLite is also SIGKILLed at those moments in test_run_kills.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import Store
from memstore_gpt2.lm_training import batch_for_step
from memstore_gpt2.student import MemoryRows, memory_factory
from memstore_gpt2.surgery import capture_mlp_inputs, clone_with_mlps
from memstore_gpt2.trainer import DistillConfig, Distiller
from tests.pg_fixture import STORE_BACKENDS

EXTRA = ("layer0.extra", "layer1.extra")


@pytest.fixture(params=STORE_BACKENDS)
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'memory.db'}"


def _snapshot(store: Store) -> dict:
    out = {}
    for name in EXTRA:
        coll = store.collection(name)
        rows = coll.export_rows()
        out[name] = (
            {f: getattr(rows, f).copy() for f in ("values", "crf", "last_tick", "hits")},
            {k: coll.stats()[k] for k in ("clock", "inserts", "evictions")},
        )
    return out


def test_a_run_dying_between_checkpoints_leaves_the_last_checkpoint(
    url, teacher, blocks, tmp_path, monkeypatch
):
    model, _ = teacher
    store = Store(url)
    batches = [batch_for_step(blocks[0], s, 8, seed=9) for s in range(2)]
    calibration = capture_mlp_inputs(model, [0, 1], batches)
    factory = memory_factory("featural", store, k=16, init="mlp", calibration=calibration,
                             memory_rows=MemoryRows(1024, memory_rows_heads=2, memory_rows_k=4),
                             cache_rows=120)  # fmt: skip
    torch.manual_seed(0)
    grown = clone_with_mlps(model, [0, 1], factory)
    # the tiny student's queries are alike; the cold-row reuse of step 3 (index 3: a quarter of
    # each table read through the 120-row cache) is what makes changed rows leave the cache
    config = DistillConfig(steps=6, batch_size=4, eval_blocks=2, checkpoint_every=2,
                           memory_rows_reuse_every=2, memory_rows_reuse_fraction=0.25)  # fmt: skip
    distiller = Distiller(grown, model, blocks[0], blocks[1], config, tmp_path / "run",
                          tensorboard=False, handle_signals=False)  # fmt: skip
    at_checkpoint: dict = {}
    save = distiller.save_checkpoint

    def written_back() -> int:
        return sum(m.index.stats["written_back"] for m in grown.modules()
                   if getattr(m, "paged", False))  # fmt: skip

    def save_and_look(*args, **kwargs):
        save(*args, **kwargs)
        if distiller.state.step == 2:
            with Store(url) as reader:  # another connection: what is committed
                at_checkpoint.update(_snapshot(reader))
            at_checkpoint["written"] = written_back()

    step = distiller.train_step

    def dying_step(n):
        metrics = step(n)
        if n == 3:
            assert written_back() > at_checkpoint["written"], "no row was written back since"
            raise RuntimeError("the process dies")
        return metrics

    monkeypatch.setattr(distiller, "save_checkpoint", save_and_look)
    monkeypatch.setattr(distiller, "train_step", dying_step)
    with pytest.raises(RuntimeError, match="dies"):
        distiller.run()
    store.close()
    with Store(url) as reader:
        after = _snapshot(reader)
    at_checkpoint.pop("written")
    assert at_checkpoint and after.keys() == at_checkpoint.keys()
    for name, (rows, counters) in at_checkpoint.items():
        assert after[name][1] == counters, name
        for field, want in rows.items():
            np.testing.assert_array_equal(after[name][0][field], want, err_msg=(name, field))


def _run(url: str, model, blocks, out, cache_rows):
    store = Store(url)
    batches = [batch_for_step(blocks[0], s, 8, seed=9) for s in range(2)]
    calibration = capture_mlp_inputs(model, [0, 1], batches)
    factory = memory_factory("featural", store, k=16, init="mlp", calibration=calibration,
                             memory_rows=MemoryRows(1024, memory_rows_heads=2, memory_rows_k=4),
                             cache_rows=cache_rows)  # fmt: skip
    torch.manual_seed(0)
    grown = clone_with_mlps(model, [0, 1], factory)
    # no checkpoint between the first and the last: the final evaluation pages rows in while
    # the rows trained since the first checkpoint are still dirty
    config = DistillConfig(steps=3, batch_size=8, eval_blocks=None, checkpoint_every=100)
    distiller = Distiller(grown, model, blocks[0], blocks[1], config, out, tensorboard=False,
                          handle_signals=False)  # fmt: skip
    summary = distiller.run()
    snapshot = _snapshot(store)
    store.close()
    return summary, snapshot


def test_a_paged_run_ends_with_the_rows_of_the_resident_run(url, teacher, blocks, tmp_path):
    model, _ = teacher
    paged_url = url
    resident_url = f"sqlite:///{tmp_path / 'resident.db'}"
    paged, paged_rows = _run(paged_url, model, blocks, tmp_path / "paged", 120)
    resident, resident_rows = _run(resident_url, model, blocks, tmp_path / "resident", None)
    assert paged["student_ppl"] == resident["student_ppl"]
    for name, (rows, counters) in resident_rows.items():
        assert paged_rows[name][1] == counters, name
        for field, want in rows.items():
            np.testing.assert_array_equal(paged_rows[name][0][field], want, err_msg=(name, field))
