"""benchmarks/paging.py --json at toy sizes (a smoke run, no timings): its keys, and that paging
changed neither the generated tokens nor the perplexity at any budget."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_scripts import load_benchmark

ISSUE_KEYS = (
    "tokens_per_s_full", "tokens_per_s_10pct", "ppl_full", "ppl_10pct", "train_step_ratio_10pct",
    "cache_hit_rate_10pct", "peak_rss_mb_10pct",
)  # fmt: skip


@pytest.fixture
def paging_benchmark(monkeypatch):
    import torch

    module = load_benchmark(monkeypatch, "paging.py", cpu_env=True)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the in-process workers set it


def test_toy_run_keys_and_identical_results(paging_benchmark, corpus_dir, tmp_path, capsys):
    texts = sorted(corpus_dir.glob("*.txt"))
    flags = [
        "--train", str(texts[0]), "--test", str(texts[1]), "--work", str(tmp_path),
        "--memory-rows", "16384", "--teacher-steps", "2", "--width", "32", "--vocab", "384",
        "--context", "8", "--batch-size", "1", "--distill-steps", "2", "--train-steps", "1", "--train-rounds", "1",
        "--test-blocks", "3", "--eval-batch", "1", "--prompt-tokens", "4", "--gen-tokens", "3",
        "--budgets", "100%,25%,10%", "--cold", "10%", "--threads", "1", "--in-process", "--json",
    ]  # fmt: skip
    assert paging_benchmark.main(flags) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ISSUE_KEYS:
        assert isinstance(out[key], float), key
    assert out["tokens_identical"] and out["ppl_identical"] and out["train_rows_identical"]
    assert out["ppl_10pct"] == out["ppl_full"]
    runs = {(r["budget"], r["os_cache"]) for r in out["runs"]}
    assert runs == {("100%", "warm"), ("25%", "warm"), ("10%", "warm"), ("10% ra", "warm"),
                    ("10%", "cold")}  # fmt: skip
    for run in out["runs"]:
        paged = run["budget"] != "100%"
        assert run["paged_layers"] == (2 if paged else 0)
        assert (run["rows_read"] > 0) == paged and 0 < run["cache_hit_rate"] <= 1
    # a budget is a share of the database's bytes: the database is 10x the 10 % budget
    assert out["db_to_budget_10pct"] == out["db_bytes"] / out["budget_bytes_10pct"]
    assert 10.0 <= out["db_to_budget_10pct"] < 10.001
    assert isinstance(out["tokens_per_s_10pct_prefetch"], float)
    assert isinstance(out["train_step_ratio_10pct_prefetch"], float)
    assert [r["budget"] for r in out["train"]["runs"]] == ["100%", "10%", "10% ra"]  # one round
    from memstore_torch import ProductKeyMemory

    assert not ProductKeyMemory.prefetch  # the in-process runs restored the default
    assert "THP_MEM_ALLOC_ENABLE=test" in out["machine"]["env"]


def test_budgets_are_shares_and_100_comes_first(paging_benchmark):
    assert paging_benchmark.parse_budgets("10%, 100%,1%") == ["100%", "10%", "1%"]
    with pytest.raises(SystemExit):
        paging_benchmark.parse_budgets("512MB")
