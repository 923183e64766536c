"""Bad input around a student's database: one line, nothing written, never a traceback.

Each test is a fault found by adversarial use (issue 18, items 1-5): a store command writing
under a training run, a prune of a product-key table, an edit whose result overflows, NaN or
wrongly sized values in the database, a damaged file under a memory budget, an absurd config.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memstore import Store
from memstore.errors import InvalidInputError
from memstore_gpt2.mindset.edit import run_edit
from memstore_gpt2.mindset.session import check_student
from tests.distill.cli_results import error_line, last_json, run_cli

PROMPT = "The for statement"


def _rows(student, layer="layer0"):
    with Store(check_student(student)) as store:
        return store.collection(layer).export_rows()


def _db_file(student) -> str:
    return check_student(student)[len("sqlite:///") :]


# ------------------------------------------------------------------ 1: the writer lock
_HOLDER = textwrap.dedent(
    """
    import sys
    from memstore_gpt2.db_lock import hold_database
    writer = hold_database(sys.argv[1], sys.argv[2], "training")
    print("held", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def training_run(student):
    """A process holding the student's database as a training run does, until the test ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, check_student(student), str(student)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_prune_import_and_upgrade_refuse_while_a_run_trains(student, training_run, tmp_path):
    db = _db_file(student)
    before = _rows(student)
    line = error_line(run_cli(["prune", db, "layer0", "--capacity", 100]))
    assert f"training run (pid {training_run.pid}) of {student}" in line
    assert "a prune now would be overwritten by its next checkpoint" in line
    np.save(tmp_path / "k.npy", np.ones((2, before.keys.shape[1]), np.float32))
    line = error_line(run_cli(["import", db, "layer0", "--keys", tmp_path / "k.npy"]))
    assert f"pid {training_run.pid}" in line and "an import now" in line
    assert "training run" in error_line(run_cli(["upgrade", db]))
    after = _rows(student)
    assert np.array_equal(after.ids, before.ids) and len(after) == 128
    # a dry run writes nothing, so it may look while the run trains
    dry = last_json(run_cli(["prune", db, "layer0", "--capacity", 100, "--dry-run", "--json"]))
    assert dry["rows_after"] == 128


def test_prune_takes_the_lock_and_leaves_no_lock_file_of_its_own(tmp_path):
    from memstore.writer_lock import LOCK_SUFFIX

    db = tmp_path / "plain.db"
    with Store(f"sqlite:///{db}") as store:
        store.create_collection("facts", key_dim=4).insert(np.eye(4, dtype=np.float32))
    assert last_json(run_cli(["prune", db, "facts", "--capacity", 2, "--json"]))["rows_after"] == 2
    assert not (tmp_path / f"plain.db{LOCK_SUFFIX}").exists()


def test_a_run_cannot_start_while_prune_holds_the_database(student):
    from memstore.errors import DatabaseInUseError
    from memstore.writer_lock import hold_database_file
    from memstore_gpt2.db_lock import hold_database

    with hold_database_file(check_student(student), "prune"):
        with pytest.raises(DatabaseInUseError, match="held by memstore prune"):
            hold_database(check_student(student), student, "training")


# ------------------------------------------------------------------ 2: product-key tables
def test_prune_refuses_a_product_key_table(grown_student):
    db = _db_file(grown_student)
    before = _rows(grown_student, "layer0.extra")
    line = error_line(run_cli(["prune", db, "layer0.extra", "--capacity", 60]))
    assert "layer0.extra is a product-key table: its row ids are addresses" in line
    assert "cannot be pruned" in line
    assert len(_rows(grown_student, "layer0.extra")) == len(before) == 64
    # the featural rows of the same student prune as before
    assert last_json(run_cli(["prune", db, "layer0", "--capacity", 120, "--json"]))["evicted"] == 8


def test_a_plain_two_dimensional_collection_still_prunes(tmp_path):
    db = tmp_path / "plain.db"
    with Store(f"sqlite:///{db}") as store:
        coll = store.create_collection("pts", key_dim=2, index="none", capacity=4)
        coll.insert(np.asarray([[5, 5], [6, 6], [7, 7], [8, 8]], np.float32))
    assert last_json(run_cli(["prune", db, "pts", "--capacity", 2, "--json"]))["rows_after"] == 2


# ------------------------------------------------------------------ 3: overflowing edits
def test_a_scale_that_overflows_is_refused_before_writing(student, grown_student):
    row = int(_rows(student).ids[0])
    largest = float(np.abs(_rows(student).values[0]).max())
    run_edit(str(student), "layer0", "scale", [row], factor=10 / largest)  # |value| up to 10
    before = _rows(student)
    with pytest.raises(InvalidInputError, match=r"factor 1e\+38 would make .* non-finite"):
        run_edit(str(student), "layer0", "scale", [row], factor=1e38)
    with pytest.raises(InvalidInputError, match="non-finite"):
        run_edit(str(student), "layer0", "scale", [row], factor=1e38, dry_run=True)
    assert np.array_equal(_rows(student).values, before.values)
    extra = _rows(grown_student, "layer0.extra")
    row = int(extra.ids[np.argmax(np.abs(extra.values).max(axis=1))])
    factor = 1e39 / float(np.abs(extra.values).max())  # finite here, beyond float32
    with pytest.raises(InvalidInputError, match="non-finite"):
        run_edit(str(grown_student), "layer0.extra", "scale", [row], factor=factor)
    assert np.isfinite(_rows(grown_student, "layer0.extra").values).all()


def test_the_edit_command_says_it_in_one_line(student):
    row = int(_rows(student).ids[0])
    factor = 1e39 / float(np.abs(_rows(student).values[0]).max())
    result = run_cli(["edit", student, "layer0", "--scale", row, repr(factor)])
    assert "non-finite" in error_line(result) and "Traceback" not in result.output


# ------------------------------------------------------------------ 4 and 5: damaged rows
def _table(student, layer: str = "layer0") -> str:
    from memstore.naming import rows_table

    with Store(check_student(student)) as store:
        return rows_table(store.collection(layer).spec)


def _tamper(student, sql: str, *params, layer: str = "layer0") -> None:
    """Run ``sql`` on the SQLite file behind the store's back (``{table}``: the layer's rows)."""
    table = _table(student, layer)
    with sqlite3.connect(_db_file(student)) as conn:
        conn.execute(sql.format(table=table), params)


def _nan_row(student) -> int:
    """Row id whose value becomes NaN in the first row table (``layer0``'s rows)."""
    block = _rows(student)
    row = int(block.ids[3])
    bad = block.values[3].copy()
    bad[0] = np.nan
    _tamper(student, "UPDATE {table} SET value = ? WHERE id = ?", bad.tobytes(), row)
    return row


def test_nan_values_are_refused_at_load_naming_the_rows(student, corpus_dir):
    row = _nan_row(student)
    for args in (
        ["evaluate", student, "--data", corpus_dir, "--json"],
        ["generate", student, "--prompt", PROMPT, "--max-new-tokens", 3],
    ):
        result = run_cli(args)
        line = error_line(result)
        assert "NaN or infinite" in line and "'layer0'" in line and f"id {row}" in line, line
        assert "Traceback" not in result.output


def test_nan_values_are_refused_when_paged_rows_are_read(grown_student, corpus_dir):
    block = _rows(grown_student, "layer0.extra")
    values = block.values.copy()
    values[:, 0] = np.nan
    table = _table(grown_student, "layer0.extra")
    with sqlite3.connect(_db_file(grown_student)) as conn:
        conn.executemany(
            f"UPDATE {table} SET value = ? WHERE id = ?",
            [(v.tobytes(), int(i)) for v, i in zip(values, block.ids, strict=True)],
        )
    result = run_cli(
        ["evaluate", grown_student, "--data", corpus_dir, "--memory-budget", "80%", "--json"]
    )
    line = error_line(result)
    assert "'layer0.extra'" in line and "NaN or infinite" in line, line


def test_evaluate_never_reports_a_null_perplexity():
    import torch

    from memstore_gpt2.errors import NonFiniteLossError
    from memstore_gpt2.evaluate import evaluate_perplexity

    class NanModel(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            logits = torch.full((*input_ids.shape, 8), float("nan"))
            return type("Out", (), {"logits": logits})()

    model = NanModel()
    model.anchor = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(NonFiniteLossError, match="no perplexity to report"):
        evaluate_perplexity(model, np.zeros((2, 4), np.int64))


def test_value_blobs_of_the_wrong_length_are_one_line(student, corpus_dir):
    from memstore.errors import CorruptDataError

    row = int(_rows(student).ids[0])
    _tamper(student, "UPDATE {table} SET value = ? WHERE id = ?", b"\0\0\0\0", row)
    with pytest.raises(CorruptDataError, match="layer0.*4 bytes where 32 float32"):
        _rows(student)
    result = run_cli(["generate", student, "--prompt", PROMPT, "--max-new-tokens", 3])
    assert "4 bytes" in error_line(result) and "Traceback" not in result.output


def test_a_corrupted_database_under_a_budget_is_one_line(grown_student):
    """The pages holding the product-key rows damaged: under a budget those rows page in from
    the file (the deterministic check of the raw paged read is in tests/store/test_damaged_file.py)."""
    from pathlib import Path

    path = Path(_db_file(grown_student))
    rows = _rows(grown_student, "layer0.extra")
    with sqlite3.connect(path) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    data = bytearray(path.read_bytes())
    for page in {data.find(v.tobytes()) // size for v in rows.values} - {0}:
        data[page * size : (page + 1) * size] = b"\xa5" * size
    path.write_bytes(bytes(data))
    args = ["generate", grown_student, "--prompt", PROMPT, "--max-new-tokens", 3]
    result = run_cli([*args, "--memory-budget", "80%"])
    assert "Traceback" not in result.output
    assert "malformed" in error_line(result)


def test_an_absurd_config_is_refused_before_allocating(student, corpus_dir):
    config_path = student / "config.json"
    config = json.loads(config_path.read_text())
    config["n_embd"] = 10**9
    config_path.write_text(json.dumps(config))
    for args in (
        ["generate", student, "--prompt", PROMPT],
        ["evaluate", student, "--data", corpus_dir],
        ["trace", student, "--prompt", PROMPT],
    ):
        line = error_line(run_cli(args))
        assert "n_embd 1000000000 makes a model of" in line and "refusing before" in line, line
    config["n_embd"] = -3
    config_path.write_text(json.dumps(config))
    assert "n_embd must be a positive integer" in error_line(run_cli(args))
