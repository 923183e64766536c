"""benchmarks/generate_cache.py --json at toy sizes (a smoke run, no target values): both loops
timed with and without the cache, their draws checked equal by the script itself."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.benchmark_scripts import BENCHMARKS, run_json


def test_toy_run_times_both_loops_both_ways(student_dir):
    result, lines = run_json("generate_cache.py", "--student", student_dir, "--tokens", 10,
                             "--blocks", 4, "--block-len", 12, "--repeats", 1)  # fmt: skip
    for loop in ("generate", "background"):
        figures = result[loop]
        assert figures["cached_s"] > 0 and figures["uncached_s"] > 0, loop
        assert figures["speedup"] == figures["uncached_s"] / figures["cached_s"]
    assert result["generate"]["cached_tokens_per_s"] == 10 / result["generate"]["cached_s"]
    assert any(line.startswith("| generate | ") for line in lines)
    assert any(line.startswith("| background | ") for line in lines)


def test_a_length_past_the_context_is_refused(student_dir):
    args = [sys.executable, str(BENCHMARKS / "generate_cache.py"), "--student", str(student_dir),
            "--tokens", "1000"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode != 0 and "context" in done.stderr
