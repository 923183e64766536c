"""What a user meets running ``distill gpt2`` / ``teacher train``: a budget too small for one step
refused up front, a run that failed before its first step never blocking the same command again,
a finished directory holding only the student, progress on stderr whatever ``--json`` says, and
the interrupt checkpoint written even when the output pipe is gone (Ctrl-C on ``... | tee``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memstore.errors import InvalidInputError
from memstore_gpt2.trainer import Distiller
from tests.distill.cli_results import error_line, last_json, run_cli

REPO = Path(__file__).resolve().parents[2]
#: 1024 extra rows per layer; one training step of 4 blocks x 32 tokens x 2 heads x 4 rows may read
#: all 1024 of them (the worst case), so a 30 % budget (308 rows) can never hold one step.
PAGED = ["--k", "16", "--memory-rows", "1024", "--memory-rows-heads", "2", "--memory-rows-k", "4",
         "--batch-size", "4", "--eval-blocks", "4"]  # fmt: skip


def distill_args(teacher: Path, corpus: Path, out: Path, *extra: str) -> list:
    return ["distill", "gpt2", "--teacher", teacher, "--data", corpus, "--out", out,
            "--k", "16", "--batch-size", "4", "--eval-blocks", "4", "--steps", "3",
            "--checkpoint-every", "2", "--json", *extra]  # fmt: skip


def test_a_budget_too_small_for_one_step_is_refused_before_any_work(
    tmp_path, teacher_dir, corpus_dir
):
    out = tmp_path / "student"
    line = error_line(run_cli([*distill_args(teacher_dir, corpus_dir, out), *PAGED,
                               "--memory-budget", "30%"]))  # fmt: skip
    assert line == (
        "Error: --memory-budget 30% keeps 308 of each layer's 1024 extra rows in memory, but one "
        "step may read 1024 of them at once (4 blocks x 32 tokens x 2 --memory-rows-heads x 4 "
        "--memory-rows-k, at most every row); raise it to at least 100%, or lower --batch-size "
        "to 1 and --eval-blocks to 1"
    )
    assert not out.exists()  # refused before the directory, the database or the surgery
    # the stated need is enough: a budget covering it trains
    fitted = last_json(run_cli([*distill_args(teacher_dir, corpus_dir, out), *PAGED,
                                "--batch-size", "1", "--eval-blocks", "1",
                                "--memory-budget", "30%"]))  # fmt: skip
    assert fitted["steps"] == 3 and fitted["paging"]["paged_layers"] == 2


@pytest.mark.parametrize(
    ("flag", "value"), [("--memory-rows-heads", "0"), ("--memory-rows-k", "0"), ("--k", "0")]
)
def test_a_bad_layer_option_is_reported_under_its_flag(tmp_path, teacher_dir, corpus_dir, flag,
                                                       value):  # fmt: skip
    out = tmp_path / "student"
    args = [*distill_args(teacher_dir, corpus_dir, out), "--memory-rows", "64", flag, value]
    assert error_line(run_cli(args)) == f"Error: {flag} must be positive, got 0"
    assert not out.exists()


def test_a_run_that_failed_before_its_first_step_does_not_block_the_same_command(
    monkeypatch, tmp_path, teacher_dir, corpus_dir
):
    out = tmp_path / "student"
    args = distill_args(teacher_dir, corpus_dir, out)

    def fails(self, step):
        raise InvalidInputError("this step cannot run")

    monkeypatch.setattr(Distiller, "train_step", fails)
    assert error_line(run_cli(args)) == "Error: this step cannot run"
    assert (out / "checkpoint.pt").is_file()  # the step-0 checkpoint was committed
    monkeypatch.undo()
    assert last_json(run_cli(args))["steps"] == 3


def test_a_finished_run_leaves_no_spare_checkpoint_and_no_lock(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    last_json(run_cli(distill_args(teacher_dir, corpus_dir, out)))
    names = {p.name for p in out.iterdir()}
    assert "checkpoint.pt" in names  # what `--resume --steps N` extends the run from
    assert not names & {"checkpoint.prev.pt", "checkpoint.pt.tmp"}, names
    assert not [n for n in names if n.endswith(".writer-lock")], names
    # and the kept checkpoint still extends the run
    assert last_json(run_cli([*distill_args(teacher_dir, corpus_dir, out), "--resume",
                              "--steps", "4"]))["steps"] == 4  # fmt: skip


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def test_json_keeps_the_progress_bar_on_stderr(tmp_path, corpus_dir):
    out = tmp_path / "teacher"
    done = subprocess.run(
        [sys.executable, "-c", "from memstore_gpt2.cli import main; main()", "teacher", "train", "--data",
         str(corpus_dir), "--out", str(out), "--steps", "3", "--layers", "1", "--width", "16",
         "--heads", "2", "--context", "16", "--vocab", "300", "--batch-size", "2", "--json"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "teacher: 100%" in done.stderr and "3/3" in done.stderr, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 3, done.stdout


#: Runs ``memstore ARGS`` with SIGINT arriving while step 1 trains (Ctrl-C); argv[1] "default"
#: first restores SIGPIPE's default action, as a shell or a wrapper may hand it over (exit 141).
_INTERRUPTED_RUN = """
import os, signal, sys
if sys.argv[1] == "default":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
from memstore_gpt2.cli import main
from memstore_gpt2.trainer import Distiller
train_step = Distiller.train_step
def interrupted(self, step):
    if step == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return train_step(self, step)
Distiller.train_step = interrupted
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sigpipe", ["ignored", "default"])
def test_ctrl_c_with_the_output_pipe_gone_still_writes_the_interrupt_checkpoint(
    tmp_path, teacher_dir, corpus_dir, sigpipe
):
    out = tmp_path / "student"
    args = [str(a) for a in distill_args(teacher_dir, corpus_dir, out)]
    run = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_RUN, sigpipe, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip
    run.stdout.close()  # the reader (tee) is gone before the run writes anything
    assert run.wait(timeout=300) != 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
