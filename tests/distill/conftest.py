"""Fixtures for the distillation tests: a tiny GPT-2 teacher trained in seconds on Python's docs.

Tiny on purpose (2 blocks, width 32, 384-token BPE) so the whole directory runs in a couple of
minutes on two shared cores; the behaviour under test (surgery, KD, checkpoints) does not depend on
size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEACHER = dict(
    layers=2, width=32, heads=2, context=32, inner=128, vocab=384, steps=120,
    batch_size=8, lr=1e-2, warmup=5, dropout=0.0, seed=0,
)  # fmt: skip


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of a few help topics (text every CPython ships), one file per topic."""
    from memstore_gpt2.text_data import python_docs_corpus

    texts = python_docs_corpus()[:12]
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus_dir) -> Path:
    """A trained tiny teacher saved as a Hugging Face directory."""
    import torch

    from memstore_gpt2.teacher import TeacherSpec, train_teacher
    from memstore_gpt2.text_data import read_texts

    torch.set_flush_denormal(True)
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(read_texts(corpus_dir), out, TeacherSpec(**TINY_TEACHER), progress=False)
    return out


@pytest.fixture
def teacher(teacher_dir):
    """A fresh (model, tokenizer) per test, so tests cannot leak changes into each other."""
    from memstore_gpt2.teacher import load_teacher

    return load_teacher(teacher_dir)


@pytest.fixture(scope="session")
def blocks(teacher_dir, corpus_dir):
    """(train_blocks, eval_blocks) of 32 tokens from the corpus."""
    from memstore_gpt2.teacher import load_teacher
    from memstore_gpt2.text_data import holdout_split, load_blocks

    _, tokenizer = load_teacher(teacher_dir)
    return holdout_split(load_blocks(tokenizer, corpus_dir, 32))


@pytest.fixture(scope="session")
def dropout_teacher_dir(tmp_path_factory, teacher_dir) -> Path:
    """The tiny teacher with dropout 0.1 in its config: students cloned from it draw from torch's
    RNG every training step, which is what makes reproducibility and RNG restore testable."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("dropout_teacher") / "teacher"
    shutil.copytree(teacher_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
