"""benchmarks/decode_ops.py --json at toy sizes (a smoke run, no target values): both models'
per-step figures, and a student whose memory layers run more operators than the MLP they
replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.benchmark_scripts import BENCHMARKS


def test_toy_run_splits_each_models_step(student_dir, teacher_dir):
    args = [sys.executable, str(BENCHMARKS / "decode_ops.py"), "--student", str(student_dir),
            "--teacher", str(teacher_dir), "--steps", "2", "--json"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for name in ("student", "teacher"):
        figures = result[name]
        assert figures["matmul_ms"] > 0 and figures["other_ms"] > 0, name
    assert result["student"]["ops"] > result["teacher"]["ops"]  # a search and a row read
    assert lines[0].startswith("# decoding steps of ") and lines[1].startswith("# machine: ")
    assert any(line.startswith("| student | ") for line in lines)
