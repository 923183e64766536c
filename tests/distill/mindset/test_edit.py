"""Edits: one transaction, faithful dry runs, effect on the next load, and the training lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memstore import Store
from memstore.errors import InvalidInputError, RowNotFoundError
from memstore_gpt2.db_lock import hold_database, lock_path
from memstore_gpt2.errors import DatabaseInUseError
from memstore_gpt2.mindset.edit import run_edit
from memstore_gpt2.mindset.session import check_student

PROMPT = "The for statement"


def _rows(student, layer="layer0"):
    with Store(check_student(student)) as store:
        return store.collection(layer).export_rows()


def _busiest(student, layer="layer0", n=1):
    block = _rows(student, layer)
    return [int(i) for i in block.ids[np.argsort(-block.hits, kind="stable")][:n]]


def test_dry_run_writes_nothing_and_predicts_the_real_edit(student):
    ids = _busiest(student, n=3)
    before = _rows(student)
    dry = run_edit(str(student), "layer0", "delete", ids, prompt=PROMPT, dry_run=True)
    untouched = _rows(student)
    assert np.array_equal(untouched.ids, before.ids)
    assert np.array_equal(untouched.values, before.values)
    real = run_edit(str(student), "layer0", "delete", ids, prompt=PROMPT)
    assert dry["after"] == real["after"] and dry["before"] == real["before"]
    assert real["rows_before"] == 128 and real["rows_after"] == dry["rows_after"] == 125
    after = _rows(student)
    assert not set(ids) & set(after.ids.tolist())
    assert len(after) == 125


def test_zero_and_scale_change_only_the_values(student):
    a, b = _busiest(student, n=2)
    before = _rows(student)
    run_edit(str(student), "layer0", "zero", [a])
    run_edit(str(student), "layer0", "scale", f"{b}", factor=2.5)
    after = _rows(student)
    assert np.array_equal(after.ids, before.ids)
    assert np.array_equal(after.keys, before.keys)
    assert np.array_equal(after.hits, before.hits) and np.array_equal(after.crf, before.crf)
    i, j = (int(np.flatnonzero(before.ids == x)[0]) for x in (a, b))
    assert not after.values[i].any()
    np.testing.assert_array_equal(after.values[j], before.values[j] * np.float32(2.5))
    others = np.ones(len(before), bool)
    others[[i, j]] = False
    assert np.array_equal(after.values[others], before.values[others])


def test_the_edit_takes_effect_on_the_next_load(student):
    from memstore_gpt2.mindset.session import Mindset
    from memstore_gpt2.mindset.trace import trace_prompt

    with Mindset.open(student) as mindset:
        fired = trace_prompt(mindset, PROMPT, top=0).layers["layer0"].ids[-1]
    result = run_edit(str(student), "layer0", "delete", fired[:2], prompt=PROMPT)
    with Mindset.open(student) as mindset:
        again = trace_prompt(mindset, PROMPT, top=0).layers["layer0"].ids[-1]
        assert not set(fired[:2]) & set(again)
        assert mindset.greedy(PROMPT) == result["after"]


def test_unknown_ids_change_nothing(student):
    real = _busiest(student)[0]
    before = _rows(student)
    with pytest.raises(RowNotFoundError, match="99999"):
        run_edit(str(student), "layer0", "delete", [real, 99999])
    assert np.array_equal(_rows(student).ids, before.ids)


@pytest.mark.parametrize(
    ("args", "kwargs", "parameter"),
    [
        (("layer9", "delete", "1"), {}, "layer"),
        (("layer0", "delete", "x"), {}, "ids"),
        (("layer0", "delete", ""), {}, "ids"),
        (("layer0", "delete", "1-128"), {}, "ids"),  # every row: the layer could not load again
        (("layer0", "scale", "1"), {}, "factor"),
        (("layer0", "scale", "1"), {"factor": float("nan")}, "factor"),
        (("layer0", "zero", "1"), {"factor": 2.0}, "factor"),
        (("layer0", "zero", "1"), {"prompt": "  "}, "prompt"),
    ],
)
def test_bad_edits_name_their_parameter_and_write_nothing(student, args, kwargs, parameter):
    before = _rows(student)
    layer, action, ids = args
    factor = kwargs.pop("factor", None)
    with pytest.raises(InvalidInputError) as info:
        run_edit(str(student), layer, action, ids, factor, **kwargs)
    assert info.value.parameter == parameter
    after = _rows(student)
    assert np.array_equal(after.ids, before.ids) and np.array_equal(after.values, before.values)


def test_student_without_its_database_is_one_clear_error(student):
    from memstore_gpt2.errors import StudentFormatError

    (student / "memory.db").unlink()
    with pytest.raises(StudentFormatError, match="memory database .* is missing"):
        run_edit(str(student), "layer0", "zero", [1])
    assert not (student / "memory.db").exists(), "no empty database may be left behind"


HOLDER = textwrap.dedent(
    """
    import sys
    from memstore_gpt2.db_lock import hold_database
    writer = hold_database(sys.argv[1], sys.argv[2], "training")
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    """
)


def test_edits_wait_for_a_training_run_in_another_process(student):
    db_url = check_student(student)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url, str(student)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DatabaseInUseError, match=rf"training run \(pid {holder.pid}\)"):
            run_edit(str(student), "layer0", "zero", [1])
        # a dry run writes nothing, so it may run meanwhile
        run_edit(str(student), "layer0", "zero", [1], dry_run=True)
    finally:
        holder.kill()  # a killed run leaves no stale lock: the OS drops it
        holder.wait()
    run_edit(str(student), "layer0", "zero", [1])
    assert not _rows(student).values[_rows(student).ids == 1].any()


def test_a_distillation_run_holds_the_lock_while_it_trains(
    tmp_path, teacher_dir, corpus_dir, monkeypatch
):
    from memstore_gpt2 import distill
    from memstore_gpt2.trainer import DistillConfig

    seen = []

    class Probe(distill.Distiller):
        def run(self, *args, **kwargs):
            out = tmp_path / "s"
            with pytest.raises(DatabaseInUseError, match="training run"):
                hold_database(check_student(out), out, "edit")
            seen.append(True)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(distill, "Distiller", Probe)
    job = distill.DistillJob(
        teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(tmp_path / "s"), k=16,
        context=32, config=DistillConfig(steps=1, batch_size=2, warmup=1, eval_blocks=1,
                                         checkpoint_every=0), progress=False,
    )  # fmt: skip
    distill.run_distill(job)
    assert seen == [True]
    with hold_database(check_student(tmp_path / "s"), tmp_path / "s", "edit"):
        pass  # released when the run ended
    assert lock_path(check_student(tmp_path / "s"), tmp_path / "s").exists()
