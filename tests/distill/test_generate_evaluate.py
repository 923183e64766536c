"""``memstore generate --json / --memory-budget`` and ``memstore evaluate``.

A tiny grown student (4096 extra product-key rows per layer, one head reading 8 rows per token)
whose extra values are overwritten with random numbers, so every row a forward reads changes the
logits: a row paged back wrongly would change the sampled tokens or the perplexity. The budgets
below leave each layer a cache of a few dozen rows: enough for one forward (this student's
queries are alike, so a 32-token forward reads at most ~60 distinct rows), far fewer than a run
reads, so rows are evicted and read again.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from memstore import Store
from tests.distill.cli_results import error_line, last_json, run_cli

EXTRA_ROWS = 4096
GENERATE_BUDGET, EVALUATE_BUDGET = "1%", "2%"  # evaluation reads whole 32-token blocks at once
GENERATE_CACHE = math.ceil(0.01 * EXTRA_ROWS)  # rows cached per paged layer: 41
EVALUATE_CACHE = math.ceil(0.02 * EXTRA_ROWS)  # 82
PAGED_LAYERS = 2
PROMPT = "The for statement"


def _distill(out, teacher_dir, corpus_dir, *extra):
    result = run_cli(["distill", "gpt2", "--teacher", teacher_dir, "--data", corpus_dir,
                   "--out", out, "--k", 16, "--batch-size", 4, "--eval-blocks", 2, "--steps", 1,
                   "--device", "cpu", "--json", *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def grown_student(tmp_path_factory, teacher_dir, corpus_dir):
    """A student with paged-capable extra rows whose values are all random (non-zero)."""
    out = _distill(tmp_path_factory.mktemp("grown") / "student", teacher_dir, corpus_dir,
                   "--memory-rows", EXTRA_ROWS, "--memory-rows-heads", 1,
                   "--memory-rows-k", 8)  # fmt: skip
    rng = np.random.default_rng(0)
    with Store(f"sqlite:///{out / 'memory.db'}", create=False) as store:
        for layer in range(PAGED_LAYERS):
            collection = store.collection(f"layer{layer}.extra")
            rows = collection.export_rows()
            assert len(rows.ids) == EXTRA_ROWS
            collection.update(rows.ids, values=rng.normal(0.0, 0.5, rows.values.shape))
    return out


@pytest.fixture(scope="module")
def plain_student(tmp_path_factory, teacher_dir, corpus_dir):
    """A student without extra rows: nothing of it can page."""
    return _distill(tmp_path_factory.mktemp("plain") / "student", teacher_dir, corpus_dir)


def _generate(student, *extra):
    return run_cli(["generate", student, "--prompt", PROMPT, "--max-new-tokens", 40, "--seed", 3,
                 "--device", "cpu", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def generations(grown_student) -> dict:
    """``generate --json`` summaries of the grown student, fully resident and under a budget."""
    return {
        "full": last_json(_generate(grown_student, "--json")),
        "paged": last_json(_generate(grown_student, "--memory-budget", GENERATE_BUDGET, "--json")),
    }


def test_generate_under_a_budget_pages_rows_and_samples_the_same_tokens(generations):
    full, paged = generations["full"], generations["paged"]
    assert paged["text"] == full["text"] and paged["tokens"] == full["tokens"] == 40
    assert full["memory_budget"] is None and paged["memory_budget"] == GENERATE_BUDGET
    assert full["rows_read"] == 0 and full["cache_hit_rate"] == 1.0
    assert full["resident_rows"] == PAGED_LAYERS * (128 + EXTRA_ROWS)  # featural + extra rows
    # rows left the cache and were read again: more reads than the caches hold
    assert paged["rows_read"] > PAGED_LAYERS * GENERATE_CACHE
    assert paged["resident_rows"] <= PAGED_LAYERS * (128 + GENERATE_CACHE)
    assert paged["paged_layers"] == PAGED_LAYERS and 0 < paged["cache_hit_rate"] < 1
    for summary in (full, paged):
        assert summary["device"] == "cpu" and summary["load_seconds"] >= 0
        assert summary["tokens_per_s"] > 0
        assert summary["text"].startswith(PROMPT)


def test_generate_without_json_prints_only_the_text(grown_student, generations):
    plain = _generate(grown_student)
    assert plain.exit_code == 0, plain.output
    assert plain.output == generations["full"]["text"] + "\n"


def test_a_budget_on_a_student_without_extra_rows_pages_nothing(plain_student):
    full = last_json(_generate(plain_student, "--json"))
    budget = last_json(_generate(plain_student, "--memory-budget", "10%", "--json"))
    assert budget["text"] == full["text"]
    assert budget["paged_layers"] == 0 and budget["rows_read"] == 0
    assert budget["resident_rows"] == full["resident_rows"] == PAGED_LAYERS * 128


def _evaluate(student, corpus_dir, *extra):
    return run_cli(["evaluate", student, "--data", corpus_dir, "--blocks", 16, "--batch-size", 1,
                 "--device", "cpu", *extra])  # fmt: skip


def test_evaluate_perplexity_is_the_distillation_measure_at_any_budget(grown_student, corpus_dir):
    from memstore_gpt2.lm_training import perplexity
    from memstore_gpt2.student import load_student
    from memstore_gpt2.text_data import load_blocks

    full = last_json(_evaluate(grown_student, corpus_dir, "--json"))
    paged = last_json(
        _evaluate(grown_student, corpus_dir, "--memory-budget", EVALUATE_BUDGET, "--json")
    )
    assert paged["perplexity"] == full["perplexity"]  # exactly: paging never changes results
    assert paged["rows_read"] > PAGED_LAYERS * EVALUATE_CACHE and full["rows_read"] == 0
    assert paged["memory_budget"] == EVALUATE_BUDGET and full["memory_budget"] is None
    assert full["blocks"] == 16 and full["context"] == 32 and full["tokens"] == 16 * 32
    assert full["tokens_per_s"] > 0 and full["seconds"] > 0

    loaded = load_student(grown_student)
    try:
        blocks = load_blocks(loaded.tokenizer, [corpus_dir], 32)[:16]
        assert perplexity(loaded.model, blocks, batch_size=1) == full["perplexity"]
    finally:
        loaded.close()


def test_evaluate_prints_one_line_and_takes_a_plain_gpt2_directory(teacher_dir, corpus_dir):
    from memstore_gpt2.lm_training import perplexity
    from memstore_gpt2.teacher import load_teacher
    from memstore_gpt2.text_data import load_blocks

    result = run_cli(["evaluate", teacher_dir, "--data", corpus_dir, "--context", 16])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("perplexity ")
    summary = last_json(run_cli(["evaluate", teacher_dir, "--data", corpus_dir, "--context", 16,
                          "--json"]))  # fmt: skip
    model, tokenizer = load_teacher(teacher_dir)
    blocks = load_blocks(tokenizer, [corpus_dir], 16)
    assert summary["perplexity"] == perplexity(model, blocks)  # default batch: 16 blocks
    assert summary["blocks"] == len(blocks) and summary["resident_rows"] == 0
    assert f"{summary['perplexity']:.4f}" in lines[0]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_malformed_budget_names_the_flag(grown_student, corpus_dir, command):
    run = _generate if command == "generate" else lambda s, *a: _evaluate(s, corpus_dir, *a)
    line = error_line(run(grown_student, "--memory-budget", "abc"))
    assert line.startswith("Error: --memory-budget must be bytes such as 512MB")
    assert "'abc'" in line


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_budget_too_small_for_one_forward_names_the_flag(grown_student, corpus_dir, command):
    run = _generate if command == "generate" else lambda s, *a: _evaluate(s, corpus_dir, *a)
    line = error_line(run(grown_student, "--memory-budget", "1B"))
    assert line.startswith("Error: --memory-budget keeps 1 rows of this memory layer")
    assert "memory_budget" not in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--blocks", "0"], "Error: --blocks must be positive, got 0"),
        (["--context", "64"], "Error: --context must be between 2 and the model's 32 positions"),
        (["--batch-size", "0"], "Error: --batch-size must be positive, got 0"),
    ],
)
def test_evaluate_errors_name_flags(teacher_dir, corpus_dir, args, expected):
    result = run_cli(["evaluate", teacher_dir, "--data", corpus_dir, *args])
    assert error_line(result).startswith(expected)
