"""memstore packs: a pack exported is one file another student's database imports (bit-identical
logits attached), a foreign or damaged file is refused in one line with nothing written, drop
removes only the pack, and list / show / diff say what packs hold."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memstore.errors import DatabaseInUseError
from memstore_gpt2.cli import main
from memstore_gpt2.errors import PackError
from memstore_gpt2.packs import manage
from memstore_gpt2.packs.learn import LearnOptions, learn_pack
from memstore_gpt2.packs.storage import read_pack
from memstore_gpt2.student import load_student

sys.path.insert(0, str(Path(__file__).parent))
from pack_helpers import TINY, copy_student, logits  # noqa: E402


@pytest.fixture(scope="module")
def learnt_dir(tmp_path_factory, base_student_dir, domain_text, other_text) -> Path:
    """The tiny student with two finished packs: "python" (domain text), "other" (other text)."""
    out = copy_student(base_student_dir, tmp_path_factory.mktemp("learnt") / "student")
    learn_pack(out, [domain_text], "python", TINY)
    learn_pack(out, [other_text], "other", LearnOptions(**{**TINY.__dict__, "seed": 1}))
    return out


@pytest.fixture
def packed(tmp_path, learnt_dir) -> Path:
    return copy_student(learnt_dir, tmp_path / "packed")


@pytest.fixture
def exported(tmp_path, packed) -> Path:
    out = tmp_path / "python.pack.db"
    manage.export_pack(packed, "python", out)
    return out


def database_content(student: Path) -> dict[str, object]:
    """Every collection's rows (as bytes) and every table's rows of the student's database: what
    a refused import must leave exactly as it was."""
    with sqlite3.connect(student / "memory.db") as conn:
        tables = [  # a vec0 virtual table is read through its shadow tables, listed too
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND sql NOT LIKE 'CREATE VIRTUAL TABLE%'"
            )
        ]
        return {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- export / import -------------------------------------------------------------------------------
def test_export_then_import_into_a_fresh_student_gives_identical_logits(
    tmp_path, packed, exported, base_student_dir
):
    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    bare = logits(fresh)
    result = run_cli("packs", "import", fresh, exported, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["pack"] == "python" and summary["rows"] > 0
    attached = logits(fresh, ("python",))
    assert torch.equal(attached, logits(packed, ("python",)))  # the same knowledge, bit for bit
    assert not torch.equal(attached, bare)
    assert torch.equal(logits(fresh), bare)  # detached: the student as it was


def test_import_as_renames_collections_and_keeps_the_logits(packed, exported):
    assert run_cli("packs", "import", packed, exported, "--as", "python2").exit_code == 0
    from memstore import Store

    with Store(f"sqlite:///{packed / 'memory.db'}", create=False) as store:
        record = read_pack(store, "python2")
        names = {c.name for c in store.list_collections()}
    assert record.collections == [f"pack.python2.layer{i}" for i in record.manifest["layers"]]
    assert all(
        config["collection"] == f"pack.python2.layer{key}"
        for key, config in record.manifest["memories"].items()
    )
    assert set(record.collections) <= names
    assert torch.equal(logits(packed, ("python2",)), logits(packed, ("python",)))


def test_import_of_an_existing_name_is_refused(packed, exported):
    before = database_content(packed)
    line = one_line_error(run_cli("packs", "import", packed, exported))
    assert "a pack named 'python' already exists" in line and "--as" in line
    assert database_content(packed) == before


def test_export_refuses_an_existing_file_and_an_unfinished_pack(tmp_path, packed, domain_text):
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"mine")
    line = one_line_error(run_cli("packs", "export", packed, "python", "--out", taken))
    assert "already exists" in line and taken.read_bytes() == b"mine"

    class Killed(Exception):
        pass

    def kill(step, steps, loss):
        if step == 3:  # step 2 was checkpointed
            raise Killed

    with pytest.raises(Killed):
        learn_pack(packed, [domain_text], "unfinished", TINY, progress=kill)
    out = tmp_path / "unfinished.db"
    line = one_line_error(run_cli("packs", "export", packed, "unfinished", "--out", out))
    assert "has not finished learning (step 2 of 6)" in line
    assert not out.exists() and list(tmp_path.glob(".unfinished.db*")) == []


def test_import_into_another_student_is_refused(tmp_path, exported, base_student_dir):
    """Same shape, other dense weights: the pack's rows were fitted to the weights it was learnt
    with, so the import is refused in one line, and nothing is written."""
    other = copy_student(base_student_dir, tmp_path / "other")
    weights = other / "dense.pt"
    state = torch.load(weights, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    torch.save(state, weights)
    before = database_content(other)
    line = one_line_error(run_cli("packs", "import", other, exported))
    assert "was learnt for another student" in line
    assert database_content(other) == before


def test_import_of_a_pack_of_other_dims_is_refused(tmp_path, exported, base_student_dir):
    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    with sqlite3.connect(exported) as conn:
        (text,) = conn.execute("SELECT manifest FROM memstore_gpt2_packs").fetchone()
        manifest = json.loads(text)
        manifest["student"]["d_model"] += 8
        conn.execute("UPDATE memstore_gpt2_packs SET manifest = ?", (json.dumps(manifest),))
    before = database_content(fresh)
    line = one_line_error(run_cli("packs", "import", fresh, exported))
    assert "does not fit this student: it was learnt for d_model" in line
    assert database_content(fresh) == before


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database at all\n" * 100)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _sql(statement: str, *params):
    def damage(path: Path) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(statement, params)

    return damage


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_garbage, "is not a pack file"),
        (_truncated, ("is not a pack file", "is damaged")),
        (_sql("DROP TABLE memstore_gpt2_packs"), "is not a pack file: it has no table"),
        (
            _sql("UPDATE memstore_gpt2_packs SET manifest = '{\"format\": 1, '"),
            "manifest is damaged",
        ),
        (_sql("UPDATE memstore_gpt2_packs SET parts = X'00112233'"), "addressing parts is damaged"),
        (_sql("DELETE FROM memstore_gpt2_packs"), "holds 0 packs"),
    ],
    ids=["garbage", "truncated", "no-table", "manifest", "parts", "empty"],
)
def test_a_damaged_pack_file_is_refused_and_nothing_is_written(
    tmp_path, exported, base_student_dir, damage, expected
):
    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    damage(exported)
    before = database_content(fresh)
    line = one_line_error(run_cli("packs", "import", fresh, exported))
    alternatives = (expected,) if isinstance(expected, str) else expected
    assert any(text in line for text in alternatives) and str(exported) in line
    assert database_content(fresh) == before


def test_a_pack_file_missing_rows_is_refused(tmp_path, exported, base_student_dir):
    with sqlite3.connect(exported) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    with pytest.raises(PackError) as info:
        # the first layer's rows gone: the file no longer holds the memory its manifest names
        from memstore import Store

        with Store(f"sqlite:///{exported}", create=False) as store:
            collection = store.collection("pack.python.layer0")
            collection.delete(collection.export_rows().ids[:5])
        manage.import_pack(fresh, exported)
    assert "\n" not in str(info.value) and str(exported) in str(info.value)
    assert "memstore_gpt2_packs" in tables


def test_an_import_that_fails_half_way_writes_nothing(
    tmp_path, exported, base_student_dir, monkeypatch
):
    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    before = database_content(fresh)

    def fail(store, record):
        raise PackError("disk on fire")

    monkeypatch.setattr(manage, "write_pack", fail)  # after the collections were written
    with pytest.raises(PackError, match="disk on fire"):
        manage.import_pack(fresh, exported)
    assert database_content(fresh) == before


def test_import_waits_for_no_training_run(tmp_path, exported, base_student_dir):
    from memstore_gpt2.db_lock import hold_database
    from memstore_gpt2.mindset.session import check_student

    fresh = copy_student(base_student_dir, tmp_path / "fresh")
    writer = hold_database(check_student(fresh), fresh, "training")
    try:
        with pytest.raises(DatabaseInUseError):
            manage.import_pack(fresh, exported)
        with pytest.raises(DatabaseInUseError):
            manage.drop_pack(fresh, "python")
    finally:
        writer.release()


# -- drop ------------------------------------------------------------------------------------------
def test_drop_removes_the_pack_and_leaves_the_student(packed):
    from memstore import Store

    url = f"sqlite:///{packed / 'memory.db'}"
    with Store(url, create=False) as store:
        own = {
            c.name: c.export_rows().values.tobytes()
            for c in store.list_collections()
            if not c.name.startswith("pack.")
        }
    bare = logits(packed)
    result = run_cli("packs", "drop", packed, "python", "--json")
    assert result.exit_code == 0, result.output
    dropped = json.loads(result.output.strip().splitlines()[-1])["dropped_collections"]
    assert dropped and all(name.startswith("pack.python.") for name in dropped)
    with Store(url, create=False) as store:
        names = {c.name for c in store.list_collections()}
        assert not any(n.startswith("pack.python.") for n in names)
        assert any(n.startswith("pack.other.") for n in names)  # the other pack stays
        assert {
            c.name: c.export_rows().values.tobytes()
            for c in store.list_collections()
            if not c.name.startswith("pack.")
        } == own
    assert [p["name"] for p in manage.list_packs(packed)] == ["other"]
    assert torch.equal(logits(packed), bare)
    line = one_line_error(run_cli("packs", "drop", packed, "python"))
    assert "no pack named 'python'" in line


def test_a_damaged_pack_is_listed_and_can_be_dropped(packed):
    with sqlite3.connect(packed / "memory.db") as conn:
        conn.execute("UPDATE memstore_gpt2_packs SET manifest = 'nope' WHERE name = 'other'")
    listed = {p["name"]: p for p in manage.list_packs(packed)}
    assert "manifest is damaged" in listed["other"]["damaged"]
    assert listed["python"]["finished"]
    result = run_cli("packs", "list", packed)
    assert result.exit_code == 0 and "damaged" in result.output
    assert run_cli("packs", "drop", packed, "other").exit_code == 0
    assert [p["name"] for p in manage.list_packs(packed)] == ["python"]


# -- list / show / diff ----------------------------------------------------------------------------
def test_list(packed):
    result = run_cli("packs", "list", packed)
    assert result.exit_code == 0, result.output
    assert "python" in result.output and "other" in result.output
    assert "finished (6/6)" in result.output
    listed = json.loads(run_cli("packs", "list", packed, "--json").output.strip().splitlines()[-1])
    assert [p["name"] for p in listed] == ["other", "python"]
    python = listed[1]
    with_pack = load_student(packed, packs=("python",))
    try:
        pack = with_pack.packs.packs[0]
        assert python["rows"] == pack.rows()
        assert python["vocabulary_rows"] == len(pack.vocabulary.token_ids)
        assert python["layers"] == pack.layers
    finally:
        with_pack.close()
    assert python["finished"] and python["step"] == python["steps"] == TINY.steps
    assert python["data_tokens"] > 0 and python["created_at"]


def test_show(packed):
    result = run_cli("packs", "show", packed, "python", "--top", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["manifest"]["name"] == "python" and report["finished"]
    assert [layer["layer"] for layer in report["layers"]] == report["manifest"]["layers"]
    for layer in report["layers"]:
        assert 0 < layer["rows_in_use"] <= layer["rows"]
        assert 0 < layer["rows_read"] <= layer["rows"]
        assert 0 < len(layer["top_rows"]) <= 3
        hits = [row["hits"] for row in layer["top_rows"]]
        assert hits == sorted(hits, reverse=True) and hits[0] > 0
        assert all(len(row["promotes"]) == 8 for row in layer["top_rows"])
    assert set(report["gate"]) == {"bias", "open_at_zero", "weight_norm"}
    tokens = report["vocabulary"]["top_tokens"]
    norms = [(t["delta_in_norm"] ** 2 + t["delta_out_norm"] ** 2) for t in tokens]
    assert tokens and norms == sorted(norms, reverse=True)
    text = run_cli("packs", "show", packed, "python")
    assert text.exit_code == 0 and "pack python: finished (6/6)" in text.output
    assert "vocabulary delta: " in text.output and "promotes" in text.output
    assert "no pack named 'nope'" in one_line_error(run_cli("packs", "show", packed, "nope"))


def test_diff(packed):
    result = run_cli("packs", "diff", packed, "python", "other", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert "separate memories" in report["note"]
    for layer in report["layers"]:
        assert layer["a"]["collection"] == f"pack.python.layer{layer['layer']}"
        assert layer["b"]["collection"] == f"pack.other.layer{layer['layer']}"
    from memstore import Store

    with Store(f"sqlite:///{packed / 'memory.db'}", create=False) as store:
        ids = {
            name: set(read_pack(store, name).parts["vocabulary.token_ids"].tolist())
            for name in ("python", "other")
        }
    vocabulary = report["vocabulary"]
    assert vocabulary["both"]["count"] == len(ids["python"] & ids["other"])
    assert vocabulary["only_a"]["count"] == len(ids["python"] - ids["other"])
    assert vocabulary["only_b"]["count"] == len(ids["other"] - ids["python"])
    assert {t["id"] for t in vocabulary["only_a"]["tokens"]} <= ids["python"] - ids["other"]
    promotes = report["promotes"]
    assert promotes["a"]["rows"] and promotes["b"]["vocabulary"]
    a_ids = {e["id"] for part in promotes["a"].values() for e in part}
    assert set(promotes["both"]) | set(promotes["only_a"]) == a_ids
    text = run_cli("packs", "diff", packed, "python", "other")
    assert text.exit_code == 0 and "A promotes through its rows" in text.output
    line = one_line_error(run_cli("packs", "diff", packed, "python", "python"))
    assert "two different packs" in line
