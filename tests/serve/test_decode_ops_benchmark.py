"""benchmarks/decode_ops.py --json at toy sizes (a smoke run, no target values): both models'
per-step figures, and a student whose memory layers run more operators than the MLP they
replaced."""

from __future__ import annotations

from tests.benchmark_scripts import run_json


def test_toy_run_splits_each_models_step(student_dir, teacher_dir):
    result, lines = run_json("decode_ops.py", "--student", student_dir, "--teacher", teacher_dir,
                             "--steps", 2)  # fmt: skip
    for name in ("student", "teacher"):
        figures = result[name]
        assert figures["matmul_ms"] > 0 and figures["other_ms"] > 0, name
    assert result["student"]["ops"] > result["teacher"]["ops"]  # a search and a row read
    assert lines[0].startswith("# decoding steps of ") and lines[1].startswith("# machine: ")
    assert any(line.startswith("| student | ") for line in lines)
