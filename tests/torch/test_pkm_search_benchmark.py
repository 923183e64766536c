"""benchmarks/pkm_search.py --json at toy sizes (a smoke run, no target values): both routes
timed for every shape, and the route named is the one the limit picks."""

from __future__ import annotations

from memstore_torch.product_keys import FULL_SEARCH_SUMS
from tests.benchmark_scripts import run_json


def test_toy_run_times_both_routes():
    result, lines = run_json("pkm_search.py", "--n-keys", "8,256", "--tokens", "1,2", "--k", 4,
                             "--rounds", 2, "--calls", 2)  # fmt: skip
    assert result["limit"] == FULL_SEARCH_SUMS
    assert [(r["n_keys"], r["tokens"]) for r in result["rows"]] == [(8, 1), (8, 2), (256, 1),
                                                                    (256, 2)]  # fmt: skip
    for row in result["rows"]:
        assert row["full_us"] > 0 and row["two_stage_us"] > 0
        fits = row["tokens"] * row["n_keys"] ** 2 <= FULL_SEARCH_SUMS
        assert row["chosen"] == ("full" if fits else "two-stage")
    assert lines[0].startswith("# product-key search") and lines[1].startswith("# machine: ")
