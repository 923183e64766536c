"""Fixtures for the serving tests: the distillation tests' tiny teacher, distilled in one step
into a student with extra product-key rows whose values are random, so every row a token reads
changes the logits (a wrongly cached or paged row would change the tokens)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.distill.conftest import corpus_dir, teacher_dir  # noqa: F401 - fixtures reused

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXTRA_ROWS = 1024


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, teacher_dir, corpus_dir):  # noqa: F811 - fixture arguments
    """A finished tiny student directory (2 blocks, width 32, context 32) with its SQLite memory."""
    from memstore import Store
    from tests.distill.cli_results import run_cli

    out = tmp_path_factory.mktemp("serve") / "student"
    result = run_cli(["distill", "gpt2", "--teacher", teacher_dir, "--data", corpus_dir,
                      "--out", out, "--k", 16, "--batch-size", 4, "--eval-blocks", 2,
                      "--steps", 1, "--device", "cpu", "--memory-rows", EXTRA_ROWS,
                      "--memory-rows-k", 8, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    with Store(f"sqlite:///{out / 'memory.db'}", create=False) as store:
        for layer in range(2):
            collection = store.collection(f"layer{layer}.extra")
            rows = collection.export_rows()
            collection.update(rows.ids, values=rng.normal(0.0, 0.5, rows.values.shape))
    return out


@pytest.fixture(scope="module")
def student(student_dir):
    """The loaded student (model in eval mode, tokenizer), closed after the module."""
    from memstore_gpt2.student import load_student

    loaded = load_student(student_dir)
    yield loaded
    loaded.close()
