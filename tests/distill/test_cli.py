"""CLI behaviour: one-line errors with a non-zero exit, and --json as the last line of output."""

from __future__ import annotations

import json

import pytest

from tests.distill.cli_results import error_line, run_cli


def test_missing_teacher_names_the_teacher_flag(tmp_path, corpus_dir):
    result = run_cli(["distill", "gpt2", "--teacher", "no-such-model-xyz", "--data", str(corpus_dir),
                   "--out", str(tmp_path / "s")])  # fmt: skip
    line = error_line(result)
    assert "--teacher DIR" in line and "no-such-model-xyz" in line


def test_empty_data_is_a_one_line_error(tmp_path, teacher_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli(["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(empty),
                   "--out", str(tmp_path / "s")])  # fmt: skip
    assert "no text" in error_line(result)


@pytest.mark.parametrize("layers", ["7", "0,a", "2-1"])
def test_bad_layer_list_is_a_one_line_error(tmp_path, teacher_dir, corpus_dir, layers):
    result = run_cli(["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
                   "--out", str(tmp_path / "s"), "--layers", layers])  # fmt: skip
    assert "--layers" in error_line(result)
    assert not (tmp_path / "s").exists(), "a rejected run must not leave files behind"


def test_resume_without_a_run_is_a_one_line_error(tmp_path, teacher_dir, corpus_dir):
    result = run_cli(["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
                   "--out", str(tmp_path / "s"), "--resume"])  # fmt: skip
    assert "not a memstore student directory" in error_line(result)


def test_teacher_train_json_and_generate(tmp_path, corpus_dir):
    out = tmp_path / "t"
    result = run_cli(["teacher", "train", "--data", str(corpus_dir), "--out", str(out), "--steps", "3",
                   "--layers", "1", "--width", "16", "--heads", "2", "--context", "16",
                   "--vocab", "300", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["teacher_ppl"] > 1
    from memstore_gpt2.teacher import load_teacher

    model, tokenizer = load_teacher(out)
    assert model.config.n_layer == 1 and len(tokenizer) == 300
    sampled = run_cli(["generate", str(out), "--prompt", "The for", "--max-new-tokens", "5",
                    "--seed", "1"])  # fmt: skip
    assert sampled.exit_code == 0 and sampled.output.startswith("The for")


def test_teacher_train_rejects_bad_shapes(tmp_path, corpus_dir):
    result = run_cli(["teacher", "train", "--data", str(corpus_dir), "--out", str(tmp_path / "t"),
                   "--width", "30", "--heads", "4"])  # fmt: skip
    assert "divisible" in error_line(result)


def test_missing_torch_extra_is_named(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    result = run_cli(["teacher", "train", "--data", str(tmp_path), "--out", str(tmp_path / "t")])
    line = error_line(result)
    assert "tokenizers" in line and "pip install 'memstore[torch]'" in line


def test_model_commands_do_not_import_torch_at_startup():
    import subprocess
    import sys

    code = "import sys, cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "0"], "Error: --batch-size must be positive, got 0"),
        (["--steps", "-1"], "Error: --steps must be >= 0, got -1"),
        (["--alpha", "2"], "Error: --alpha must be in [0, 1], got 2.0"),
        (["--k", "0"], "Error: --k must be positive, got 0"),
    ],
)
def test_library_parameter_errors_are_spelled_as_flags(
    tmp_path, teacher_dir, corpus_dir, args, expected
):
    """The library names its parameters (``batch_size``); the CLI says the flag the user typed."""
    result = run_cli(["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
                   "--out", str(tmp_path / "s"), *args])  # fmt: skip
    assert error_line(result) == expected


def test_library_errors_name_parameters_not_flags():
    from memstore.errors import InvalidInputError
    from memstore_gpt2.trainer import DistillConfig

    with pytest.raises(InvalidInputError, match=r"^batch_size must be positive") as caught:
        DistillConfig(batch_size=0).validate()
    assert caught.value.parameter == "batch_size"
