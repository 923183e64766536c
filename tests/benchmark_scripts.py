"""Loading a script of ``benchmarks/`` as a module, for the tests that run benchmarks tiny."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(monkeypatch: pytest.MonkeyPatch, script: str, *, cpu_env: bool = False):
    """``benchmarks/<script>`` imported as a module, its helper modules importable as when it
    runs as a script. ``cpu_env``: the CPU variables such scripts set before importing torch
    are set (to ``test``, restored after the test), so the script does not set them itself."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    if cpu_env:
        for name in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY"):
            monkeypatch.setenv(name, "test")
    name = f"{Path(script).stem}_benchmark"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_json(script: str, *args) -> tuple[dict, list[str]]:
    """``python benchmarks/<script> ARGS --json`` in its own process (offline): the JSON object it
    printed last and every line of its output; fails the test with the script's stderr when it
    exits non-zero."""
    command = [sys.executable, str(BENCHMARKS / script), *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines
