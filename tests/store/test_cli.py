"""The store commands of the ``memstore`` CLI, through Click's runner and once as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from memstore import Store
from memstore_gpt2.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def arrays(tmp_path, rng):
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    values = rng.standard_normal((300, 3)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    paths = {}
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    return paths, keys, values, queries


def run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_init_import_query_inspect(runner, tmp_path, arrays, brute_force):
    paths, keys, values, queries = arrays
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert run(runner, "init", url).exit_code == 0
    out = run(
        runner,
        "import",
        url,
        "facts",
        "--keys",
        paths["keys"],
        "--values",
        paths["values"],
        "--metric",
        "ip",
        "--json",
    )
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info == {
        "collection": "facts",
        "created": True,
        "inserted": 300,
        "first_id": 0,
        "last_id": 299,
        "rows": 300,
    }
    again = json.loads(
        run(
            runner,
            "import",
            url,
            "facts",
            "--keys",
            paths["keys"],
            "--values",
            paths["values"],
            "--json",
        ).output
    )
    assert (again["created"], again["first_id"], again["rows"]) == (False, 300, 600)

    out = run(runner, "query", url, "facts", "--queries", paths["queries"], "-k", "5", "--json")
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output)
    assert set(answer) == {"ids", "distances"}
    ref = brute_force("ip", queries, np.concatenate([keys, keys]))  # the file was imported twice
    np.testing.assert_allclose(answer["distances"], np.sort(ref, 1)[:, :5], atol=1e-4)
    assert np.array(answer["ids"]).shape == (4, 5)

    text = run(runner, "query", url, "facts", "--queries", paths["queries"], "-k", "2").output
    assert text.startswith("query 0:")

    overview = json.loads(run(runner, "inspect", url, "--json").output)
    assert overview["collections"][0]["name"] == "facts" and overview["size_bytes"] > 0
    detail = json.loads(run(runner, "inspect", url, "facts", "--json").output)
    for key, want in (
        ("name", "facts"),
        ("rows", 600),
        ("key_dim", 8),
        ("value_dim", 3),
        ("metric", "ip"),
        ("index", "exact"),
    ):
        assert detail[key] == want
    assert detail["searches"] == 2 and len(detail["sample"]) == 5
    human = run(runner, "inspect", url, "facts").output
    assert "facts: 600 rows" in human and "next to evict" in human


def test_prune_really_shrinks_the_file(runner, tmp_path, rng, index_consistent):
    path = tmp_path / "p.db"
    keys = rng.standard_normal((20000, 32)).astype(np.float32)
    with Store(f"sqlite:///{path}") as store:
        store.create_collection("big", key_dim=32).insert(keys)
    size_before = path.stat().st_size
    dry = json.loads(
        run(runner, "prune", path, "big", "--capacity", 2000, "--dry-run", "--json").output
    )
    assert dry["evicted"] == 18000 and dry["rows_after"] == 20000
    out = run(runner, "prune", path, "big", "--capacity", 2000, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["evicted"] == 18000 and report["rows_after"] == 2000
    assert path.stat().st_size < 0.25 * size_before
    assert report["size_after"] < 0.25 * report["size_before"]
    with Store(f"sqlite:///{path}") as store:
        coll = store.collection("big")
        assert len(coll) == 2000 and index_consistent(coll)
        res = coll.search(
            keys[-5:], 1, touch=False
        )  # the newest ids survived (same score, later id)
        assert res.ids[:, 0].tolist() == list(range(19995, 20000))
    by_score = json.loads(run(runner, "prune", path, "big", "--min-score", "1e9", "--json").output)
    assert by_score["rows_after"] == 0


def test_upgrade_command(runner, tmp_path):
    url = f"sqlite:///{tmp_path / 'u.db'}"
    run(runner, "init", url)
    out = run(runner, "upgrade", url, "--json")
    assert json.loads(out.output) == {
        "url": url,
        "from": "0002_keys_stored_once",
        "to": "0002_keys_stored_once",
    }


@pytest.mark.parametrize(
    "args,fragment",
    [
        (
            ["query", "{db}", "facts", "--queries", "{queries}", "-k", "0"],
            "k must be a positive integer",
        ),
        (
            ["query", "{db}", "facts", "--queries", "{queries}", "-k", str(2**20 + 1)],
            "-k must be at most 1048576",
        ),
        (
            ["query", "{db}", "facts", "--queries", "{queries}", "-k", str(2**64)],
            "-k must be at most 1048576",
        ),
        (["import", "{db}", "big", "--keys", "{keys}", "--capacity", str(2**64)], "capacity"),
        (["import", "{db}", "big", "--keys", "{keys}", "--oversample", str(2**63)], "oversample"),
        (["inspect", "{db}", "facts", "--rows", str(2**64)], "--rows must be at most 2**63 - 1"),
        (["import", "{db}", "facts", "--keys", "{keys}", "--capacity", "7"], "--capacity"),
        (
            ["query", "{db}", "nope", "--queries", "{queries}", "-k", "1"],
            "no collection named 'nope'",
        ),
        (["query", "{db}", "facts", "--queries", "{values}", "-k", "1"], "dimension 3"),
        (["query", "{db}", "facts", "--queries", "{missing}", "-k", "1"], "not found"),
        (["import", "{db}", "bad name!", "--keys", "{keys}"], "invalid collection name"),
        (
            ["import", "{db}", "facts", "--keys", "{keys}", "--metric", "l2"],
            "exists with --metric ip",
        ),
        (["import", "{db}", "new", "--keys", "{ints}"], "floating-point"),
        (["inspect", "{absent}"], "no database file"),
        (["inspect", "{text}"], "not a database"),
        (["prune", "{db}", "facts"], "exactly one of"),
        (
            ["import", "{db}", "fresh", "--keys", "{keys}", "--values", "{short}"],
            "rows but there are",
        ),
        (["import", "{db}", "fresh", "--keys", "{nan}"], "NaN"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(runner, tmp_path, arrays, args, fragment):
    paths, _, _, _ = arrays
    db = tmp_path / "m.db"
    run(
        runner,
        "import",
        db,
        "facts",
        "--keys",
        paths["keys"],
        "--values",
        paths["values"],
        "--metric",
        "ip",
    )
    np.save(tmp_path / "ints.npy", np.ones((2, 8), np.int64))
    (tmp_path / "text.txt").write_text("hello " * 1000)
    np.save(tmp_path / "short.npy", np.ones((5, 3), np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 8), np.nan, np.float32))
    fill = {
        "db": db,
        "queries": paths["queries"],
        "values": paths["values"],
        "keys": paths["keys"],
        "missing": tmp_path / "missing.npy",
        "ints": tmp_path / "ints.npy",
        "absent": tmp_path / "absent.db",
        "short": tmp_path / "short.npy",
        "nan": tmp_path / "nan.npy",
        "text": tmp_path / "text.txt",
    }
    before = Store(f"sqlite:///{db}").collection("facts").export_rows()
    out = runner.invoke(main, [a.format(**fill) for a in args])
    assert out.exit_code != 0
    assert fragment in out.output and "Traceback" not in out.output
    error_lines = [line for line in out.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    with Store(f"sqlite:///{db}") as store:
        assert store.list_collections()[0].name == "facts" and len(store.list_collections()) == 1
        after = store.collection("facts").export_rows()
    np.testing.assert_array_equal(before.ids, after.ids)
    assert not (tmp_path / "absent.db").exists()


def test_store_commands_do_not_import_torch():
    code = "import sys, cli; cli.main(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip().endswith("False")


def test_real_process_on_path(tmp_path, arrays):
    """`memstore` as installed in the venv, run from an unrelated directory."""
    paths, _, _, _ = arrays
    exe = shutil.which("memstore") or str(Path(sys.executable).with_name("memstore"))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    db = workdir / "x.db"
    subprocess.run([exe, "init", str(db)], cwd=workdir, check=True, env=env, capture_output=True)
    subprocess.run(
        [exe, "import", str(db), "c", "--keys", str(paths["keys"])],
        cwd=workdir,
        check=True,
        env=env,
        capture_output=True,
    )
    out = subprocess.run(
        [exe, "query", str(db), "c", "--queries", str(paths["queries"]), "-k", "3", "--json"],
        cwd=workdir,
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert np.array(json.loads(out.stdout)["ids"]).shape == (4, 3)
    bad = subprocess.run(
        [exe, "query", str(db), "c", "--queries", str(paths["queries"]), "-k", "-1"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 1
        and bad.stderr.strip().startswith("Error:")
        and "Traceback" not in bad.stderr
    )
