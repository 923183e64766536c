"""``memstore demo`` end to end on a little text, with tiny step counts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from memstore_gpt2.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_user_data(tmp_path, corpus_dir):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--data",
            str(corpus_dir),
            "--out",
            str(out),
            "--teacher-steps",
            "3",
            "--steps",
            "2",
            "--json",
        ],  # fmt: skip
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["teacher_ppl"] > 1 and summary["student_ppl"] > 1
    assert (out / "student" / "memory.db").is_file()
    assert (out / "teacher" / "config.json").is_file()


def test_demo_default_corpus_ships_with_python():
    from memstore_gpt2.text_data import python_docs_corpus

    texts = python_docs_corpus()
    assert len(texts) > 20 and sum(map(len, texts)) > 100_000
