"""A non-editable install from a wheel gives a working `memstore` in any directory: the Alembic
scripts ship inside the wheel as memstore.migrations and are found through importlib.resources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    "setup.cfg",
    "pyproject.toml",
    "README.md",
    "cli.py",
    "memstore",
    "memstore_torch",
    "memstore_gpt2",
    "migrations",
]


@pytest.mark.slow
def test_wheel_install_runs_from_another_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # build from a copy, so the checkout gets no build/ or egg-info litter
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("memstore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "memstore/migrations/env.py",
        "memstore/migrations/versions/0001_initial.py",
        "memstore/migrations/versions/0002_keys_stored_once.py",
        "memstore/migrations/script.py.mako",
        "memstore/backends/sqlite.py",
        "memstore_gpt2/cli.py",
        "memstore_gpt2/mindset/static/index.html",  # the Mindset UI's page ships in the wheel
        "memstore_gpt2/mindset/static/mindset.js",
    ):
        assert needed in names
    assert "cli.py" not in names  # no top-level `cli` module to collide with a user's own

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # Third-party dependencies come from the test venv; memstore itself only from the wheel (paths
    # listed in a .pth are appended after the venv's own site-packages, and their .pth files -- the
    # editable install's finder among them -- are not processed).
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(python), "-c", "import memstore.migrations as m; print(m.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(venv)), where

    exe = str(venv / "bin" / "memstore")
    np.save(work / "k.npy", np.eye(4, dtype=np.float32))
    subprocess.run([exe, "init", "mem.db"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(
        [exe, "import", "mem.db", "c", "--keys", "k.npy"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [exe, "query", "mem.db", "c", "--queries", "k.npy", "-k", "1", "--json"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["ids"] == [[0], [1], [2], [3]]
    out = subprocess.run(
        [exe, "upgrade", "mem.db", "--json"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["to"] == "0002_keys_stored_once"


def test_installed_command_ignores_a_users_cli_module(tmp_path):
    """A project with its own ``cli.py`` on ``sys.path`` (here via PYTHONPATH and the working
    directory) must not break the ``memstore`` console script."""
    exe = Path(sys.executable).parent / "memstore"
    if not exe.exists():
        pytest.skip("the memstore console script is not installed in this environment")
    (tmp_path / "cli.py").write_text("raise SystemExit('the user project cli.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [str(exe), "init", str(tmp_path / "m.db"), "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])
