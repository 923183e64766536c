"""benchmarks/bulk_rows.py runs at a tiny size and reports every rate it promises."""

from __future__ import annotations

import argparse

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture
def bulk_rows(monkeypatch):
    return load_benchmark(monkeypatch, "bulk_rows.py")


def test_tiny_run_reports_store_and_raw_rates(bulk_rows, tmp_path):
    args = argparse.Namespace(
        rows=300, key_dim=2, value_dim=4, indexes="exact,none", repeats=2, workdir=str(tmp_path)
    )
    result = bulk_rows.run(args)
    assert result["rows"] == 300 and "cores" in result["machine"]
    for op in ("insert", "update", "select"):
        assert result[f"raw_{op}_rows_per_s"] > 0
        for index in ("exact", "none"):
            assert result[f"store_{index}_{op}_rows_per_s"] > 0
            assert result[f"store_{index}_{op}_vs_raw"] > 0
    assert list(tmp_path.iterdir()) == []  # its databases are removed


def test_product_key_addresses_as_keys(bulk_rows):
    rows = bulk_rows.make_rows(9, 2, 3, seed=0)
    assert rows.keys.tolist() == [[i, j] for i in range(3) for j in range(3)]
    assert rows.ids.tolist() == list(range(1, 10))
