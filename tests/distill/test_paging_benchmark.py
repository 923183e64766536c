"""benchmarks/paging.py --json at toy sizes (a smoke run, no timings): its keys, and that paging
changed neither the generated tokens nor the perplexity at any budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

#: The checkout these tests run from (what this process imports memstore from).
CHECKOUT = str(Path(__file__).resolve().parents[2])

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


@pytest.fixture(scope="module")
def paging_work(tmp_path_factory) -> Path:
    """One --work for the toy runs of this module: the teacher and student, built by the first
    run, are reused by the next (same recipe), so the second toy run costs its measurements only."""
    return tmp_path_factory.mktemp("paging") / "work"


def test_toy_run_keys_and_identical_results(paging_benchmark, corpus_dir, paging_work, capsys):
    texts = sorted(corpus_dir.glob("*.txt"))
    flags = [
        "--train", str(texts[0]), "--test", str(texts[1]), "--work", str(paging_work),
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


def test_workers_run_from_anywhere(paging_benchmark, corpus_dir, paging_work, monkeypatch, capsys):
    """One real worker process, started from a directory that is not the checkout, with a
    relative --work: the workers used to run in the checkout (cwd and PYTHONPATH), looked for
    ``runs/paging`` there, and the run ended in a traceback with no JSON line."""
    texts = sorted(corpus_dir.glob("*.txt"))
    elsewhere = paging_work.parent
    monkeypatch.chdir(elsewhere)
    # the worker imports what this process imports, whichever way memstore is installed
    monkeypatch.setenv("PYTHONPATH", CHECKOUT)
    flags = [
        "--train", str(texts[0]), "--test", str(texts[1]), "--work", "work",
        "--memory-rows", "16384", "--teacher-steps", "2", "--width", "32", "--vocab", "384",
        "--context", "8", "--batch-size", "1", "--distill-steps", "2", "--train-steps", "0",
        "--test-blocks", "2", "--eval-batch", "1", "--prompt-tokens", "4", "--gen-tokens", "2",
        "--budgets", "100%", "--cold", "", "--rounds", "1", "--threads", "1", "--json",
    ]  # fmt: skip
    assert paging_benchmark.main(flags) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["budget"] for r in out["runs"]] == ["100%"] and out["ppl_identical"]
    assert (elsewhere / "work" / "student").is_dir()  # --work is relative to where it ran


def test_a_failed_run_ends_with_an_error_json_line(paging_benchmark, corpus_dir, tmp_path, capsys):
    texts = sorted(corpus_dir.glob("*.txt"))
    missing = tmp_path / "missing.txt"
    flags = ["--train", str(missing), "--test", str(texts[1]), "--work", str(tmp_path), "--json"]
    assert paging_benchmark.main(flags) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "error": f"--train {missing}: no such file"
    }
    assert "Traceback" not in captured.err and "no such file" in captured.err
    bad_budget = ["--train", str(texts[0]), "--test", str(texts[1]), "--budgets", "5GB", "--json"]
    assert paging_benchmark.main([*bad_budget, "--work", str(tmp_path)]) == 1
    assert "is not a share" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


def test_a_failing_worker_is_one_line_naming_it(paging_benchmark, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", CHECKOUT)
    spec = {"task": "no such task", "budget": "10%"}  # fails before importing torch: cheap
    with pytest.raises(paging_benchmark.BenchmarkError) as failed:
        paging_benchmark.run_worker(spec)
    message = str(failed.value)  # the worker's traceback went to stderr, above this line
    assert (
        message == "the no such task worker at 10% failed (exit status 1): KeyError: 'no such task'"
    )


def test_a_worker_importing_other_code_is_refused(paging_benchmark, tmp_path, monkeypatch):
    """A worker that would import another memstore_gpt2 than the benchmark (a checkout shadowing
    an install, or the reverse) stops before measuring anything."""
    other = tmp_path / "other" / "memstore_gpt2"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other.parent))
    with pytest.raises(paging_benchmark.BenchmarkError, match="would measure different code"):
        paging_benchmark.run_worker({"task": "eval", "budget": "100%"})
