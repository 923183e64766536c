"""A distillation run killed (SIGKILL) at any moment, then resumed, ends exactly where the
uninterrupted run ends: same dense weights, optimizer state, memory rows, LRFU clock and counters.

All killed runs come from one subprocess (``kill_driver.py``) that imports torch once and forks a
child per kill point, so the whole matrix costs about one extra interpreter start. Each killed
directory is then recovered in-process as a user would (``--resume``; or, when the run never
committed a checkpoint, the same command again) and compared with an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from memstore import Store
from memstore_gpt2.cli import main

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("kill_driver.py")

#: name -> (where, when, nth, min_steps, recovery, kind); runs checkpoint at steps 0, 2, 4 and 6.
KILLS = {
    "during surgery": ("save_student", "before", 1, 0, "restart", "featural"),
    "first checkpoint file in place, memory not committed": (
        "install", "after", 1, 0, "restart", "featural"),
    "between checkpoints": ("train_step", "before", 4, 0, "resume", "featural"),
    "inside the memory commit, one layer written": (
        "apply_changes", "after", 1, 4, "resume", "featural"),
    "inside the memory commit, every layer written": (
        "apply_changes", "after", 2, 4, "resume", "featural"),
    "checkpoint file written, not yet renamed": ("install", "before", 1, 4, "resume", "featural"),
    "checkpoint file renamed, memory not committed": (
        "install", "after", 1, 4, "resume", "featural"),
    "after the last checkpoint, student not saved": (
        "save_student", "before", 2, 0, "resume", "featural"),
    # associative memory inserts and evicts rows: ids, counters and the clock must replay too
    "associative: checkpoint file renamed, memory not committed": (
        "install", "after", 1, 4, "resume", "associative"),
    # extra product-key rows: their values, LRFU state and row-wise Adagrad state must replay too
    "memory rows: checkpoint file renamed, memory not committed": (
        "install", "after", 1, 4, "resume", "memory_rows"),
    "memory rows: inside the memory commit, two collections written": (
        "apply_changes", "after", 2, 4, "resume", "memory_rows"),
    # paged extra rows (--memory-budget): rows written back between checkpoints, uncommitted
    "paged memory rows: killed during a write-back between checkpoints": (
        "apply_changes", "after", 1, 3, "resume", "paged"),
    "paged memory rows: inside the memory commit": (
        "apply_changes", "after", 3, 5, "resume", "paged"),
}  # fmt: skip
COUNTERS = ("clock", "next_id", "inserts", "novel_inserts", "recombinations", "evictions")
KIND_ARGS = {
    "featural": ["--k", "16"],
    "associative": ["--kind", "associative", "--k", "4", "--heads", "2", "--capacity", "64"],
    "memory_rows": ["--k", "16", "--memory-rows", "64", "--memory-rows-heads", "2",
                    "--memory-rows-k", "4", "--memory-rows-reuse-every", "2",
                    "--memory-rows-reuse-fraction", "0.5"],
    # 2048 rows, half of them cached: one step reads at most 4 x 32 x 2 x 4 = 1024 (the need
    # distill checks up front), so the cache holds a step and still evicts and writes back
    "paged": ["--k", "16", "--memory-rows", "2048", "--memory-rows-heads", "2",
              "--memory-rows-k", "4", "--memory-rows-reuse-every", "2",
              "--memory-rows-reuse-fraction", "0.25", "--memory-rows-recombine", "0.5",
              "--memory-rows-novel", "0.02",
              "--memory-budget", "50%"],
}  # fmt: skip


def distill_args(teacher: Path, corpus: Path, out: Path, kind: str = "featural") -> list[str]:
    return ["distill", "gpt2", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out),
            *KIND_ARGS[kind], "--batch-size", "4", "--eval-blocks", "4", "--steps", "6",
            "--checkpoint-every", "2", "--json"]  # fmt: skip


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def references(tmp_path_factory, dropout_teacher_dir, corpus_dir):
    """kind -> the directory of an uninterrupted run (made on first use)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted_{kind}") / "student"
            result = run_cli(distill_args(dropout_teacher_dir, corpus_dir, out, kind))
            assert result.exit_code == 0, result.output
            made[kind] = out
        return made[kind]

    return get


@pytest.fixture(scope="module")
def killed(tmp_path_factory, dropout_teacher_dir, corpus_dir) -> dict[str, Path]:
    """One directory per kill point, each left by a run SIGKILLed at that point."""
    root = tmp_path_factory.mktemp("killed")
    outs = {name: root / f"run{i}" for i, name in enumerate(KILLS)}
    scenarios = [
        {"where": where, "when": when, "nth": nth, "min_steps": min_steps,
         "args": distill_args(dropout_teacher_dir, corpus_dir, outs[name], kind)}
        for name, (where, when, nth, min_steps, _, kind) in KILLS.items()
    ]  # fmt: skip
    spec = root / "scenarios.json"
    spec.write_text(json.dumps(scenarios))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(DRIVER), str(spec)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout.strip().splitlines()[-1])
    assert statuses == [-9] * len(KILLS), (statuses, done.stderr[-3000:])
    return outs


def final_state(out: Path) -> dict:
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    memory = {}
    with Store(f"sqlite:///{out / 'memory.db'}", create=False) as store:
        for collection in store.list_collections():
            stats = collection.stats()
            memory[collection.name] = (
                collection.export_rows(),
                {name: stats[name] for name in COUNTERS},
            )
    return {
        "dense": torch.load(out / "dense.pt", map_location="cpu", weights_only=True),
        "checkpoint": checkpoint,
        "memory": memory,
        "summary": json.loads((out / "distill_summary.json").read_text()),
        "manifest": json.loads((out / "memstore_student.json").read_text()),
    }


def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_final_state(got: dict, want: dict) -> None:
    assert_same_tensors(got["dense"], want["dense"], "dense.pt")
    assert ("row_optimizer" in got["checkpoint"]) == ("row_optimizer" in want["checkpoint"])
    for key in ("step", "optimizer", "rng", "state", "row_optimizer"):
        if key not in want["checkpoint"]:
            continue
        if key == "state":  # wall-clock seconds differ between runs
            got["checkpoint"][key].pop("seconds"), want["checkpoint"][key].pop("seconds")
        assert_same_tensors(got["checkpoint"][key], want["checkpoint"][key], f"checkpoint.{key}")
    assert got["memory"].keys() == want["memory"].keys()
    for name, (rows, counters) in want["memory"].items():
        got_rows, got_counters = got["memory"][name]
        assert got_counters == counters, name
        for field in ("ids", "keys", "values", "crf", "last_tick", "hits", "created_tick"):
            assert np.array_equal(getattr(got_rows, field), getattr(rows, field)), (name, field)
    for key in ("teacher_ppl", "student_init_ppl", "student_ppl", "final_train_loss", "steps"):
        assert got["summary"][key] == want["summary"][key], key
    assert got["manifest"]["run"]["finished"] is True


@pytest.mark.slow
@pytest.mark.parametrize("kill", list(KILLS))
def test_killed_run_recovers_to_the_uninterrupted_state(
    kill, killed, references, dropout_teacher_dir, corpus_dir
):
    out = killed[kill]
    recovery, kind = KILLS[kill][-2:]
    args = distill_args(dropout_teacher_dir, corpus_dir, out, kind)
    manifest = json.loads((out / "memstore_student.json").read_text())
    assert manifest["run"]["finished"] is False, "a killed run's directory must say so"
    if recovery == "restart":
        refused = run_cli([*args, "--resume"])
        assert refused.exit_code == 1
        assert "without --resume to start it again" in refused.output.strip().splitlines()[-1]
        result = run_cli(args)
    else:
        result = run_cli([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_final_state(final_state(out), final_state(references(kind)))


def test_paged_run_equals_the_resident_run(tmp_path, references, dropout_teacher_dir, corpus_dir):
    """The same run with every extra row resident ends bit for bit where the paged one ends
    (rows, LRFU state, counters, optimizers, perplexities), and the paged one did page."""
    paged = references("paged")
    assert final_state(paged)["summary"]["paging"]["rows_written_back"] > 0
    with Store(f"sqlite:///{paged / 'memory.db'}", create=False) as store:
        assert sum(store.collection(f"layer{i}.extra").stats()["recombinations"] for i in (0, 1))
    out = tmp_path / "resident"
    args = distill_args(dropout_teacher_dir, corpus_dir, out, "paged")
    result = run_cli(
        args[: args.index("--memory-budget")] + args[args.index("--memory-budget") + 2 :]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["paging"]["paged_layers"] == 0
    assert_same_final_state(final_state(out), final_state(paged))


def test_two_identical_runs_are_bit_identical(
    tmp_path, references, dropout_teacher_dir, corpus_dir
):
    """The student has dropout, so this fails unless each run seeds torch's RNG from --seed."""
    out = tmp_path / "again"
    result = run_cli(distill_args(dropout_teacher_dir, corpus_dir, out))
    assert result.exit_code == 0, result.output
    assert_same_final_state(final_state(out), final_state(references("featural")))
