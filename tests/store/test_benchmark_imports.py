"""The store benchmarks import the installed memstore, never the checkout around them.

A checkout's ``memstore/`` lacks ``memstore.migrations`` (only an install maps ``migrations/`` in),
so a benchmark that put the checkout first on ``sys.path`` failed outside an editable install with
``No module named 'memstore.migrations'``. Here the benchmarks run from a copy of ``benchmarks/``
next to a decoy ``memstore`` package that fails on import, from another working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    shutil.copytree(BENCHMARKS, root / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "memstore").mkdir()
    (root / "memstore" / "__init__.py").write_text(
        "raise ImportError('the checkout beside the benchmark was imported, not the installed memstore')\n"
    )
    (tmp_path / "elsewhere").mkdir()
    return root


def _run(checkout: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [sys.executable, "-c", "import memstore"],
        cwd=checkout.parent / "elsewhere",
        env=env,
        capture_output=True,
    )
    if found.returncode:
        pytest.skip(
            "memstore is not installed in this environment (only importable from a checkout)"
        )
    return subprocess.run(
        [sys.executable, str(checkout / "benchmarks" / script), *args],
        cwd=checkout.parent / "elsewhere",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_store_benchmark_imports_the_installed_package(checkout):
    tiny = ["--n", "300", "--queries", "2", "--repeats", "1", "--clusters", "10",
            "--rescore-dims", "8", "--rescore-n", "200", "--rescore-queries", "2"]  # fmt: skip
    out = _run(checkout, "store.py", "--json", *tiny)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["insert_rows_per_s"] > 0 and figures["query_ms"] > 0


def test_store_pg_benchmark_imports_the_installed_package(checkout):
    out = _run(checkout, "store_pg.py", "--help")
    assert out.returncode == 0, out.stderr
    assert "--url" in out.stdout
