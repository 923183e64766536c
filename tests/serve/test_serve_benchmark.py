"""benchmarks/serve.py --json at toy sizes (a smoke run, no target values): the issue's keys, that
the figures are medians of the interleaved repeats (the ratios medians of theirs), and that the
server's greedy text is ``memstore generate``'s."""

from __future__ import annotations

import math
import re
import statistics

from tests.benchmark_scripts import run_json

ISSUE_KEYS = ("tokens_per_s_1", "tokens_per_s_2", "batching_speedup_2", "vs_hf_generate_1",
              "p99_ms_2")  # fmt: skip


def test_toy_run_keys_and_consistent_figures(student_dir, teacher_dir, tmp_path):
    result, lines = run_json("serve.py", "--student", student_dir, "--teacher", teacher_dir,
                             "--clients", "1,2", "--requests", 1, "--max-tokens", 4, "--repeats", 3,
                             "--paired-requests", 2, "--work", tmp_path)  # fmt: skip
    for key in ISSUE_KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["greedy_identical"] is True
    repeats = result["repeats"]
    assert len(repeats) == 3
    assert result["tokens_per_s_2"] == statistics.median(r["tokens_per_s_2"] for r in repeats)
    assert result["batching_speedup_2"] == statistics.median(
        r["tokens_per_s_2"] / r["unbatched_tokens_per_s_2"] for r in repeats
    )
    assert result["vs_hf_generate_1"] == statistics.median(
        r["paired_tokens_per_s_1"] / r["hf_generate_tokens_per_s"] for r in repeats
    )
    for r in repeats:  # the reference's better thread count counts
        by_threads = [v for k, v in r.items() if k.startswith("hf_generate_tokens_per_s_threads_")]
        assert by_threads and r["hf_generate_tokens_per_s"] == max(by_threads)
    # what the batched server (--max-batch 16) measured at start, read from its /metrics
    assert set(result["server_threads"]) == {"1", "4", "16"}
    assert all(t >= 1 for t in result["server_threads"].values())
    assert re.search(
        r"threads \d+ at 1 sequence, \d+ at 4 sequences, \d+ at 16 sequences,", lines[0]
    ), lines[0]
    assert lines[0].startswith("# memstore serve: ") and lines[1].startswith("# machine: ")
    assert any(line.startswith("| 2 | ") for line in lines)  # the table's 2-client row
