"""benchmarks/layer.py --json with its scaling table, at tiny sizes (a smoke run, no timings)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture
def layer_benchmark(monkeypatch):
    return load_benchmark(monkeypatch, "layer.py", cpu_env=True)


def run(module, monkeypatch, capsys, *flags: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["layer.py", "--json", "--threads", "1", *flags])
    module.main()
    return json.loads(capsys.readouterr().out)


def test_scaling_table_keys_at_tiny_sizes(layer_benchmark, monkeypatch, capsys):
    out = run(
        layer_benchmark, monkeypatch, capsys,
        "--scale-only", "--scale-rows", "1k,16k", "--scale-dims", "32,48", "--scale-tokens", "16",
        "--scale-repeats", "1", "--scale-warmup", "0", "--pk-heads", "2", "--pk-k", "4",
        "--pk-key-dim", "8", "--recall-tokens", "4", "--optimizers", "--optim-rows", "1k",
        "--optim-dim", "16",
    )  # fmt: skip
    assert "THP_MEM_ALLOC_ENABLE=test" in out["machine"]
    # the keys are always present; the 1M sizes were not run, so they are null
    assert out["scale_time_ratio_1m_d768"] is None and out["scale_time_ratio_1m_d256"] is None
    assert out["scale_recall_at_k"] == 1.0  # the product search is exact
    table = out["scale_table"]
    assert [(r["d"], r["rows"]) for r in table] == [
        (32, 1024),
        (32, 16384),
        (48, 1024),
        (48, 16384),
    ]
    for r in table:
        assert r["time_ratio"] > 0 and r["update_ratio"] > 0
        assert r["value_bytes_per_row"] == 4 * r["d"]
        assert r["bytes_per_row"] > r["value_bytes_per_row"]
        assert 0 < r["distinct_rows_read"] <= min(r["rows"], r["reads_per_step"])
    assert set(out["optimizers"]) >= {"RowwiseAdagrad", "SparseAdam", "Adagrad"}
    rowwise, adam = out["optimizers"]["RowwiseAdagrad"], out["optimizers"]["SparseAdam"]
    assert rowwise["state_bytes"] == 1024 * 4  # one float per row
    assert adam["state_bytes"] >= 2 * 1024 * 16 * 4  # two moments per element


def test_summary_keys_come_from_the_1m_rows(layer_benchmark, monkeypatch):
    """scale_time_ratio_1m_d{256,768} are the 1M rows' ratios; recall is the lowest measured."""
    scaling = layer_benchmark.layer_scaling

    def fake_measure(d, name, args, x):
        return {"d": d, "size": name, "time_ratio": d / 1000 + len(name), "recall_at_k": 0.5}

    monkeypatch.setattr(scaling, "measure_size", fake_measure)
    args = layer_benchmark.argparse.Namespace(
        scale_dims="256,768", scale_rows="1K, 1m", scale_tokens=4, heads=1, k=1, key_dim=2,
        repeats=1,
    )  # fmt: skip
    out = scaling.scaling_table(args)
    assert out["scale_time_ratio_1m_d256"] == 0.256 + 2
    assert out["scale_time_ratio_1m_d768"] == 0.768 + 2
    assert out["scale_recall_at_k"] == 0.5 and len(out["scale_table"]) == 4
    with pytest.raises(SystemExit):
        scaling.parse_sizes("2m")
