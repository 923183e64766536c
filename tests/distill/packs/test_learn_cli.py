"""``memstore learn`` and ``--pack`` from the command line: a pack is learnt, attached, composed and
refused as users meet it; a learn killed with SIGKILL resumes to the pack an uninterrupted run
writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from memstore_gpt2.cli import main  # noqa: F401 - the CLI must import with packs registered

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_results import error_line, last_json, run_cli  # noqa: E402

DRIVER = Path(__file__).with_name("learn_kill_driver.py")
REPO = Path(__file__).resolve().parents[3]
LEARN = ["--steps", "6", "--rows", "64", "--batch-size", "4", "--context", "32",
         "--vocab-rows", "64", "--checkpoint-every", "2"]  # fmt: skip


def learn(student: Path, text: Path, pack: str, *extra) -> dict:
    return last_json(
        run_cli(["learn", student, "--data", text, "--pack", pack, *LEARN, *extra, "--json"])
    )


def evaluate(student: Path, text: Path, *packs: str) -> float:
    args = ["evaluate", student, "--data", text, "--json"]
    for pack in packs:
        args += ["--pack", pack]
    return last_json(run_cli(args))["perplexity"]


def test_learn_then_evaluate_and_generate_with_the_pack(student, domain_text, other_text):
    summary = learn(student, domain_text, "docs")
    assert summary["pack"] == "docs" and summary["steps"] == 6 and summary["layers"] == [0, 1]
    bare = evaluate(student, domain_text)
    assert evaluate(student, domain_text, "docs") != bare
    assert evaluate(student, domain_text) == bare  # detached again: the student's own figure
    out = last_json(run_cli(["generate", student, "--prompt", "The", "--max-new-tokens", "4",
                             "--temperature", "0", "--pack", "docs", "--json"]))  # fmt: skip
    assert out["packs"] == ["docs"]
    learn(student, other_text, "other")
    both = evaluate(student, domain_text, "docs", "other")
    assert both > 0 and both != evaluate(student, domain_text, "docs")  # composed: both act


def test_pack_refusals_are_one_line(student, domain_text, teacher_dir):
    line = error_line(run_cli(["evaluate", student, "--data", domain_text, "--pack", "nope"]))
    assert "no pack named 'nope'" in line
    line = error_line(run_cli(["evaluate", teacher_dir, "--data", domain_text, "--pack", "x"]))
    assert "not a memstore student directory" in line
    line = error_line(run_cli(["learn", student, "--data", domain_text, "--pack", "bad name"]))
    assert "invalid pack name" in line
    line = error_line(run_cli(["learn", student, "--data", domain_text, "--pack", "p",
                               "--layers", "7"]))  # fmt: skip
    assert "--layers" in line and "do not exist" in line


def test_a_pack_of_another_student_or_damaged_is_refused(tmp_path, student, domain_text):
    learn(student, domain_text, "docs")
    other = tmp_path / "other"
    shutil.copytree(student, other)
    state = torch.load(other / "dense.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0  # another student: same shapes, other weights
    torch.save(state, other / "dense.pt")
    line = error_line(run_cli(["evaluate", other, "--data", domain_text, "--pack", "docs"]))
    assert "learnt for another student" in line
    engine = sa.create_engine(f"sqlite:///{student / 'memory.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memstore_gpt2_packs SET parts = X'00ff00'"))
    engine.dispose()
    line = error_line(run_cli(["evaluate", student, "--data", domain_text, "--pack", "docs"]))
    assert "pack 'docs'" in line and "damaged" in line


def _pack_rows(student: Path, name: str) -> dict[str, bytes]:
    from memstore import Store
    from memstore_gpt2.packs.storage import read_pack

    with Store(f"sqlite:///{student / 'memory.db'}", create=False) as store:
        record = read_pack(store, name)
        out = {k: v.numpy().tobytes() for k, v in record.parts.items()}
        for collection in record.collections:
            rows = store.collection(collection).export_rows()
            out[collection] = b"".join(
                f.tobytes() for f in (rows.ids, rows.values, rows.crf, rows.hits, rows.last_tick)
            )
        return out


@pytest.mark.parametrize("where,nth", [("checkpoint", 3), ("step", 5)])
def test_learn_killed_then_resumed_equals_uninterrupted(tmp_path, student, domain_text, where, nth):
    twin = tmp_path / "twin"
    shutil.copytree(student, twin)
    learn(student, domain_text, "docs")
    args = ["learn", str(twin), "--data", str(domain_text), "--pack", "docs", *LEARN]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, str(DRIVER), where, str(nth), "--", *args],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    resumed = last_json(run_cli([*args, "--resume", "--json"]))
    assert resumed["steps"] == 6 and resumed["steps_this_run"] < 6
    assert _pack_rows(twin, "docs") == _pack_rows(student, "docs")
