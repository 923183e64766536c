"""Training runs that are stopped, resumed with other arguments, tampered with or damaged.

Signals end a run with a checkpoint and a clear line; a resume refuses anything that would make it
a different run; a checkpoint cannot run code; damaged files give one-line errors; an unfinished
run directory is never loaded as if it were a finished student.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from memstore_gpt2.cli import main
from memstore_gpt2.errors import StudentFormatError
from memstore_gpt2.student import load_student
from memstore_gpt2.surgery import clone_with_mlps, reinit_mlps
from memstore_gpt2.trainer import DistillConfig, Distiller


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def last_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def base_args(teacher, corpus, out, steps=4):
    return ["distill", "gpt2", "--teacher", teacher, "--data", corpus, "--out", out,
            "--k", "16", "--batch-size", "4", "--eval-blocks", "4", "--steps", steps,
            "--checkpoint-every", "2", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_dir, corpus_dir):
    out = tmp_path_factory.mktemp("finished") / "student"
    result = run_cli(base_args(teacher_dir, corpus_dir, out, steps=2))
    assert result.exit_code == 0, result.output
    return out


def summary_of(result) -> dict:
    return json.loads(last_line(result))


# -- signals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_the_resumed_run_matches(
    monkeypatch, tmp_path, dropout_teacher_dir, corpus_dir, signum, code
):
    straight = run_cli(base_args(dropout_teacher_dir, corpus_dir, tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output

    out = tmp_path / "stopped"
    train_step = Distiller.train_step

    def signalled_step(self, step):
        if step == 1:  # the signal arrives while step 1 is being trained
            os.kill(os.getpid(), signum)
        return train_step(self, step)

    monkeypatch.setattr(Distiller, "train_step", signalled_step)
    handler_before = signal.getsignal(signum)
    stopped = run_cli(base_args(dropout_teacher_dir, corpus_dir, out))
    monkeypatch.undo()
    assert stopped.exit_code == code
    name = signal.Signals(signum).name
    assert last_line(stopped) == (
        f"Error: interrupted by {name} at step 2 of 4; a checkpoint was saved; "
        "continue it with the same command and --resume"
    )
    assert signal.getsignal(signum) is handler_before  # the handler was put back
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2

    # the directory says it is unfinished, to the API and to `generate`
    with pytest.raises(StudentFormatError, match="has not finished"):
        load_student(out)
    sampled = run_cli(["generate", out, "--prompt", "The"])
    assert sampled.exit_code == 1 and "has not finished" in last_line(sampled)
    again = run_cli(base_args(dropout_teacher_dir, corpus_dir, out))
    assert again.exit_code == 1 and "pass --resume" in last_line(again)

    resumed = run_cli([*base_args(dropout_teacher_dir, corpus_dir, out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    for key in ("teacher_ppl", "student_ppl", "final_train_loss"):
        assert summary_of(resumed)[key] == summary_of(straight)[key], key
    want = torch.load(tmp_path / "straight" / "dense.pt", weights_only=True)
    got = torch.load(out / "dense.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    load_student(out).close()  # finished now


# -- TensorBoard -------------------------------------------------------------------------------------
def test_resumed_tensorboard_log_holds_each_step_once(monkeypatch, teacher, blocks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _ = teacher
    train, held = blocks
    config = DistillConfig(steps=6, batch_size=2, eval_blocks=2, checkpoint_every=2)

    def student():
        return clone_with_mlps(model, [0], reinit_mlps(0))

    train_step = Distiller.train_step

    def crash_at_3(self, step):
        if step == 3:  # steps 0-2 are logged, the last checkpoint is at step 2
            raise RuntimeError("crash")
        return train_step(self, step)

    monkeypatch.setattr(Distiller, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="crash"):
        Distiller(student(), model, train, held, config, tmp_path).run()
    monkeypatch.undo()
    resumed = Distiller(student(), model, train, held, config, tmp_path)
    resumed.load_checkpoint()
    assert resumed.state.step == 2
    resumed.run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(6))
    assert [e.step for e in events.Scalars("eval/teacher_ppl")] == [0]
    assert [e.step for e in events.Scalars("eval/student_ppl")] == [0, 6]


# -- resume checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--k", "32"], "Error: --k is 32 but the run being resumed used 16"),
        (["--layers", "0"], "Error: --layers is [0] but the run being resumed used [0, 1]"),
        (["--kind", "associative"], "Error: --kind is 'associative' but the run being resumed"),
        (["--seed", "1"], "Error: --seed is 1 but the run being resumed used 0"),
    ],
)
def test_resume_refuses_a_changed_option(finished_run, teacher_dir, corpus_dir, extra, expected):
    before = (finished_run / "memstore_student.json").read_text()
    result = run_cli([*base_args(teacher_dir, corpus_dir, finished_run), "--resume", *extra])
    assert result.exit_code == 1
    assert last_line(result).startswith(expected), last_line(result)
    assert (finished_run / "memstore_student.json").read_text() == before  # nothing touched


def test_resume_refuses_other_data(finished_run, teacher_dir, corpus_dir):
    result = run_cli([*base_args(teacher_dir, corpus_dir / "001.txt", finished_run), "--resume"])
    assert result.exit_code == 1
    assert last_line(result).startswith("Error: --data differs from the training data of the run")
    assert "teacher perplexity" not in result.output


def test_resume_refuses_other_held_out_data(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "s"
    args = [*base_args(teacher_dir, corpus_dir, out, steps=2), "--eval-data"]
    assert run_cli([*args, corpus_dir / "000.txt"]).exit_code == 0
    result = run_cli([*args, corpus_dir / "001.txt", "--resume"])
    assert result.exit_code == 1
    assert last_line(result).startswith("Error: --eval-data differs from the held-out data")


def test_resume_refuses_another_teacher(finished_run, teacher_dir, corpus_dir, tmp_path):
    from memstore_gpt2.teacher import load_teacher

    model, tokenizer = load_teacher(teacher_dir)
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    result = run_cli([*base_args(tmp_path / "other", corpus_dir, finished_run), "--resume"])
    assert result.exit_code == 1
    assert last_line(result).startswith("Error: --teacher ")
    assert "is not the teacher of the run being resumed" in last_line(result)


def test_resume_keeps_the_run_options_that_are_left_out(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "s"
    args = ["distill", "gpt2", "--teacher", teacher_dir, "--data", corpus_dir, "--out", out,
            "--json"]  # fmt: skip
    first = run_cli([*args, "--k", "8", "--layers", "1", "--batch-size", "2", "--steps", "2",
                     "--eval-blocks", "2"])  # fmt: skip
    assert first.exit_code == 0, first.output
    resumed = run_cli([*args, "--resume", "--steps", "3"])  # --k 8, --layers 1 ... from the run
    assert resumed.exit_code == 0, resumed.output
    summary = summary_of(resumed)
    assert summary["k"] == 8 and summary["layers"] == [1] and summary["steps"] == 3


# -- checkpoints that could run code, damaged files ----------------------------------------------------
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "s"
    assert run_cli(base_args(teacher_dir, corpus_dir, out, steps=2)).exit_code == 0
    marker = tmp_path / "code-ran"
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    payload["state"]["evil"] = _RunsCode(str(marker))
    torch.save(payload, out / "checkpoint.pt")
    result = run_cli([*base_args(teacher_dir, corpus_dir, out, steps=3), "--resume"])
    assert result.exit_code == 1
    assert "refusing to load it, because unpickling them could run code" in last_line(result)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damaged", ["dense.pt", "memstore_student.json", "config.json", "tokenizer.json"]
)
def test_damaged_student_file_is_a_one_line_error(tmp_path, finished_run, damaged):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / damaged).write_bytes(b"\x00not what it should be{")
    result = run_cli(["generate", out, "--prompt", "The"])
    assert result.exit_code == 1
    line = last_line(result)
    assert line.startswith("Error: ") and damaged.rsplit(".", 1)[0] in line, line
    with pytest.raises(StudentFormatError):
        load_student(out)


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.prev.pt"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, finished_run, teacher_dir, corpus_dir,
                                                name):  # fmt: skip
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    if name == "checkpoint.prev.pt":  # the current one is gone: resume must read the other
        (out / "checkpoint.pt").unlink()
    (out / name).write_bytes(b"PK\x03\x04 truncated")
    result = run_cli([*base_args(teacher_dir, corpus_dir, out, steps=3), "--resume"])
    assert result.exit_code == 1
    assert last_line(result).startswith("Error: ") and "is damaged" in last_line(result)


def test_generate_on_a_missing_directory_does_not_talk_about_teachers(tmp_path):
    result = run_cli(["generate", tmp_path / "nope", "--prompt", "The"])
    assert result.exit_code == 1
    assert "no directory" in last_line(result) and "--teacher" not in result.output


def test_generate_with_a_new_db_file_creates_nothing(tmp_path, finished_run):
    target = tmp_path / "new.db"
    result = run_cli(["generate", finished_run, "--prompt", "The", "--db", f"sqlite:///{target}"])
    assert result.exit_code == 1 and last_line(result).startswith("Error: ")
    assert not target.exists()


# -- the stamp table on the other backend ------------------------------------------------------------
def test_checkpoint_commit_and_resume_on_postgresql(fresh_postgres_url, teacher, blocks, tmp_path):
    from memstore import Store
    from memstore_gpt2.checkpoint import committed_stamp, read_checkpoint
    from memstore_gpt2.lm_training import batch_for_step
    from memstore_gpt2.student import build_student_skeleton, memory_factory, save_student
    from memstore_gpt2.surgery import capture_mlp_inputs

    model, tokenizer = teacher
    train, held = blocks
    config = DistillConfig(steps=3, batch_size=2, eval_blocks=2, checkpoint_every=2)
    with Store(fresh_postgres_url) as store:
        calibration = capture_mlp_inputs(model, [0], [batch_for_step(train, 0, 4, seed=1)])
        factory = memory_factory("featural", store, k=8, calibration=calibration)
        student = clone_with_mlps(model, [0], factory)
        save_student(student, tokenizer, tmp_path, fresh_postgres_url)
        distiller = Distiller(student, model, train, held, config, tmp_path, tensorboard=False)
        distiller.run(stop_at=2)
        saved = read_checkpoint(tmp_path / "checkpoint.pt")
        assert committed_stamp(store, distiller.run_id) == (2, saved["token"])
        rows = store.collection("layer0").export_rows()
    with Store(fresh_postgres_url) as store:
        manifest = json.loads((tmp_path / "memstore_student.json").read_text())
        resumed = Distiller(build_student_skeleton(tmp_path, manifest, store), model, train, held,
                            config, tmp_path, tensorboard=False)  # fmt: skip
        resumed.load_checkpoint()
        assert resumed.state.step == 2 and resumed.run_id == distiller.run_id
        again = store.collection("layer0").export_rows()
        assert (again.keys == rows.keys).all() and (again.crf == rows.crf).all()
        resumed.run()
        assert committed_stamp(store, resumed.run_id)[0] == 3
