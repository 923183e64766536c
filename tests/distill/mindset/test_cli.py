"""Mindset's commands: --json as the last line, readable text, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store
from memstore_gpt2.db_lock import hold_database
from memstore_gpt2.mindset.session import check_student
from tests.distill.cli_results import last_json, only_error_line, run_cli

PROMPT = "The for statement"


def test_trace_json_and_text(featural_student_dir):
    data = last_json(
        run_cli(["trace", featural_student_dir, "--prompt", PROMPT, "--top", 3, "--json"])
    )
    assert "".join(data["tokens"]) == PROMPT
    assert set(data["layers"]) == {"layer0", "layer1"}
    for layer in data["layers"].values():
        assert len(layer["ids"]) == len(layer["weights"]) == len(data["tokens"])
        assert all(len(row) == 3 for row in layer["ids"])
    text = run_cli(["trace", featural_student_dir, "--prompt", PROMPT, "--layers", "0"]).output
    assert "layer0:" in text and "layer1:" not in text and "' for'" in text
    first = data["layers"]["layer0"]["ids"][1][0]
    assert f"layer0: {first} " in text


def test_rows_and_explain(featural_student_dir):
    rows = last_json(run_cli(["rows", featural_student_dir, "layer0", "--sort", "hits", "--limit", 3,
                       "--json"]))  # fmt: skip
    assert rows["layer"] == "layer0" and len(rows["rows"]) == 3
    hits = [r["hits"] for r in rows["rows"]]
    assert hits == sorted(hits, reverse=True)
    ids = [r["id"] for r in rows["rows"]]
    explained = last_json(run_cli(["explain", featural_student_dir, "layer0", *ids[:2], "--json"]))
    assert [r["id"] for r in explained["rows"]] == sorted(ids[:2])
    assert explained["rows"][0]["promotes"] and explained["rows"][0]["suppresses"]
    text = run_cli(["explain", featural_student_dir, "layer0", ids[0]]).output
    assert f"layer0 row {ids[0]}: LRFU score" in text and "promotes:" in text


def test_edit_dry_run_then_edit(student):
    url = check_student(student)
    with Store(url) as store:
        victim = int(store.collection("layer1").export_rows().ids[5])
    dry = last_json(run_cli(["edit", student, "layer1", "--delete", victim, "--prompt", PROMPT,
                      "--dry-run", "--json"]))  # fmt: skip
    assert dry["dry_run"] and dry["rows_after"] == dry["rows_before"] - 1
    assert dry["before"].startswith(PROMPT)
    with Store(url) as store:
        assert victim in store.collection("layer1").export_rows().ids
    text = run_cli(["edit", student, "layer1", "--scale", victim, 0.5, "--prompt", PROMPT]).output
    assert f"done: scale the values of layer1 row(s) {victim} by 0.5" in text
    assert "before: " in text and "after: " in text
    done = last_json(run_cli(["edit", student, "layer1", "--delete", victim, "--json"]))
    assert done["rows_after"] == done["rows_before"] - 1
    with Store(url) as store:
        assert victim not in store.collection("layer1").export_rows().ids


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trace", "{s}", "--prompt", ""], "--prompt is empty"),
        (["trace", "{s}", "--prompt", "x", "--layers", "layer5"], "--layers 'layer5' is not a memory layer"),
        (["trace", "{s}", "--prompt", "x", "--top", "-2"], "--top must be >= 0"),
        (["explain", "{s}", "layer9", "1"], "LAYER 'layer9' is not a memory layer"),
        (["explain", "{s}", "layer0", "1", "99999"], "no rows with ids 99999"),
        (["explain", "{s}", "layer0", "abc"], "ROW_IDS"),
        (["explain", "{s}", "layer0", str(2**70)], "out of range: row ids are 0..2**63-1"),
        (["edit", "{s}", "layer0", "--zero", "0-1000000"], "names 1,000,001 rows: at most 1,000,000"),
        (["rows", "{s}", "layer0", "--promotes", "for statement"], "--promotes 'for statement' is 5 tokens"),
        (["rows", "{s}", "nope"], "LAYER 'nope'"),
        (["edit", "{s}", "layer0"], "give exactly one of --delete IDS, --zero IDS or --scale"),
        (["edit", "{s}", "layer0", "--delete", "1", "--zero", "2"], "give exactly one of"),
        (["edit", "{s}", "layer0", "--delete", "x,y"], "--delete 'x,y': expected row ids"),
        (["edit", "{s}", "layer0", "--zero", "99999"], "no rows with ids 99999"),
        (["edit", "{s}", "layer0", "--scale", "1", "nan"], "--scale must be finite"),
        (["edit", "{s}", "layer0", "--delete", "1-128"], "--delete would delete every row"),
        (["edit", "{s}", "layer0", "--zero", "1", "--prompt", " "], "--prompt is empty"),
        (["mindset", "{s}", "--port", "70000"], "--port must be 0..65535"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(student, args, expected):
    before = _rows(student)
    line = only_error_line(run_cli([a.replace("{s}", str(student)) for a in args]))
    assert expected in line
    after = _rows(student)
    assert np.array_equal(before.ids, after.ids) and np.array_equal(before.values, after.values)


def _rows(student):
    with Store(check_student(student)) as store:
        return store.collection("layer0").export_rows()


def test_not_a_student_and_a_lost_database(tmp_path, student):
    line = only_error_line(run_cli(["trace", tmp_path / "nowhere", "--prompt", PROMPT]))
    assert "not a memstore student directory" in line
    (student / "memory.db").unlink()
    for args in (["trace", student, "--prompt", PROMPT], ["rows", student, "layer0"],
                 ["edit", student, "layer0", "--zero", "1"], ["mindset", student, "--port", 0]):  # fmt: skip
        assert "memory database" in only_error_line(
            run_cli(args)
        ) and "is missing" in only_error_line(run_cli(args))
    assert not (student / "memory.db").exists()
    other = tmp_path / "other.db"
    Store(f"sqlite:///{other}").close()
    line = only_error_line(
        run_cli(["trace", student, "--prompt", PROMPT, "--db", f"sqlite:///{other}"])
    )
    assert "has no collection 'layer0'" in line


def test_edit_while_training_holds_the_database(student):
    with hold_database(check_student(student), student, "training"):
        line = only_error_line(run_cli(["edit", student, "layer0", "--zero", "1"]))
        assert "held by a training run" in line and "wait until the run has finished" in line
        # reading goes on meanwhile
        assert run_cli(["rows", student, "layer0", "--limit", 1]).exit_code == 0


def test_the_ui_without_flask_says_which_extra(student, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "flask", None)  # as if the mindset extra were not installed
    line = only_error_line(run_cli(["mindset", student, "--port", 0]))
    assert "needs flask" in line and "memstore[mindset]" in line
