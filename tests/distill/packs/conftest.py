"""Fixtures for knowledge packs: a tiny grown student (the tiny teacher of tests/distill/conftest.py
distilled a few steps) and texts for a pack to learn, plus a private copy per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pack_helpers import copy_student  # noqa: E402


@pytest.fixture(scope="session")
def base_student_dir(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.trainer import DistillConfig

    out = tmp_path_factory.mktemp("packs") / "student"
    job = DistillJob(
        teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), kind="featural",
        k=16, init="mlp", context=32, memory_rows=64, memory_rows_heads=1, memory_rows_k=4,
        config=DistillConfig(steps=4, batch_size=4, warmup=1, eval_blocks=2, checkpoint_every=0),
        progress=False,
    )  # fmt: skip
    run_distill(job)
    return out


@pytest.fixture
def student(tmp_path, base_student_dir) -> Path:
    """A private copy of the student (its database travels with it): free to learn packs into."""
    return copy_student(base_student_dir, tmp_path / "student")


def _topics(tmp_path_factory, name: str, first: int, last: int) -> Path:
    """A directory of Python help topics ``first:last`` (beyond the teacher's training topics)."""
    from memstore_gpt2.text_data import python_docs_corpus

    root = tmp_path_factory.mktemp(name)
    for i, text in enumerate(python_docs_corpus()[first:last]):
        (root / f"{i}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def domain_text(tmp_path_factory) -> Path:
    """Text the student never saw: help topics beyond the ones the teacher was trained on."""
    return _topics(tmp_path_factory, "domain", 40, 46)


@pytest.fixture(scope="session")
def other_text(tmp_path_factory) -> Path:
    return _topics(tmp_path_factory, "other", 60, 64)
