"""Fixtures for knowledge packs: a tiny grown student (the tiny teacher of tests/distill/conftest.py
distilled a few steps) and texts for a pack to learn, plus a private copy per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


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
    from memstore_gpt2.student import STUDENT_FILE, default_db_url

    out = tmp_path / "student"
    shutil.copytree(base_student_dir, out)
    manifest_path = out / STUDENT_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["db"] = default_db_url(out)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def domain_text(tmp_path_factory) -> Path:
    """Text the student never saw: help topics beyond the ones the teacher was trained on."""
    from memstore_gpt2.text_data import python_docs_corpus

    root = tmp_path_factory.mktemp("domain")
    for i, text in enumerate(python_docs_corpus()[40:46]):
        (root / f"{i}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def other_text(tmp_path_factory) -> Path:
    from memstore_gpt2.text_data import python_docs_corpus

    root = tmp_path_factory.mktemp("other")
    for i, text in enumerate(python_docs_corpus()[60:64]):
        (root / f"{i}.txt").write_text(text, encoding="utf-8")
    return root
