"""Fixtures for Mindset: tiny memory students distilled (a few steps) from the tiny teacher of
tests/distill/conftest.py, one featural, one associative and one grown (featural + product-key
extra rows, ``--memory-rows``), plus a fresh copy per editing test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _distill(out: Path, teacher_dir: Path, corpus_dir: Path, kind: str, **options) -> Path:
    from memstore_gpt2.distill import DistillJob, run_distill
    from memstore_gpt2.trainer import DistillConfig

    job = DistillJob(
        teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), kind=kind,
        k=16, init="mlp" if kind == "featural" else "random", context=32, heads=2, capacity=512,
        config=DistillConfig(steps=4, batch_size=4, warmup=1, eval_blocks=2, checkpoint_every=0),
        progress=False, **options,
    )  # fmt: skip
    run_distill(job)
    return out


def _private_copy(source: Path, out: Path) -> Path:
    """A copy of a student (its database travels with it) that leads nowhere near the original."""
    from memstore_gpt2.student import STUDENT_FILE, default_db_url

    shutil.copytree(source, out)
    manifest_path = out / STUDENT_FILE  # as if trained here: nothing may lead to the original
    manifest = json.loads(manifest_path.read_text())
    manifest["db"] = default_db_url(out)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def featural_student_dir(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """A featural student (k 16 of 128 rows per layer, 2 layers) saved with its SQLite memory."""
    return _distill(
        tmp_path_factory.mktemp("mindset") / "student", teacher_dir, corpus_dir, "featural"
    )


@pytest.fixture(scope="session")
def associative_student_dir(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    return _distill(
        tmp_path_factory.mktemp("mindset") / "assoc", teacher_dir, corpus_dir, "associative"
    )


@pytest.fixture(scope="session")
def grown_student_dir(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """A grown student: per block the featural rows (``layer<i>``, 128) and 64 product-key extra
    rows (``layer<i>.extra``: 8 ** 2, 2 heads reading 4 each), trained 4 steps."""
    return _distill(
        tmp_path_factory.mktemp("mindset") / "grown", teacher_dir, corpus_dir, "featural",
        memory_rows=64, memory_rows_heads=2, memory_rows_k=4,
    )  # fmt: skip


@pytest.fixture
def student(tmp_path, featural_student_dir) -> Path:
    """A private copy of the featural student (its database travels with it): free to edit."""
    return _private_copy(featural_student_dir, tmp_path / "student")


@pytest.fixture
def grown_student(tmp_path, grown_student_dir) -> Path:
    """A private copy of the grown student: free to edit."""
    return _private_copy(grown_student_dir, tmp_path / "grown")


@pytest.fixture
def mindset(featural_student_dir):
    """The shared featural student opened for reading (tests that edit use ``student``)."""
    from memstore_gpt2.mindset.session import Mindset

    with Mindset.open(featural_student_dir) as opened:
        yield opened
