"""benchmarks/store.py --url postgresql://... runs end to end and keeps the issue's JSON keys."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
KEYS = {
    "insert_rows_per_s",
    "raw_insert_rows_per_s",
    "query_ms",
    "raw_query_ms",
    "rescore_recall_at_k",
    "rescore_speedup",
}


def test_store_benchmark_on_postgres_prints_the_json_contract(pg_url):
    tiny = ["--n", "400", "--queries", "3", "--repeats", "1", "--clusters", "20",
            "--rescore-dims", "8", "--rescore-n", "300", "--rescore-queries", "3"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "store.py"), "--url", pg_url, "--json", *tiny],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures) == KEYS
    assert figures["insert_rows_per_s"] > 0 and figures["raw_insert_rows_per_s"] > 0
    assert figures["query_ms"] > 0 and figures["raw_query_ms"] > 0
    assert 0.0 <= figures["rescore_recall_at_k"] <= 1.0


def test_store_pg_benchmark_prints_the_table(pg_url):
    tiny = ["--n", "300", "--queries", "2", "--repeats", "1", "--clusters", "10",
            "--rescore-dims", "4", "--rescore-n", "200", "--rescore-queries", "2", "--metric", "ip"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "store_pg.py"), "--url", pg_url, *tiny],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "PostgreSQL" in out and "pgvector" in out and "cores" in out  # the machine line
    assert "| insert rows/s" in out and "| 4 | rescore-bit (HNSW) |" in out
