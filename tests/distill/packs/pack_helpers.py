"""What the pack tests share: tiny learn options, a private copy of a student, a tiny pack
learnt on help topics, its logits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from memstore_gpt2.packs.learn import LearnOptions
from memstore_gpt2.student import STUDENT_FILE, default_db_url, load_student

#: Small and fast: a few steps, few rows; enough for a pack to change what the student says.
TINY = LearnOptions(
    steps=6, rows=64, k=4, key_dim=16, batch_size=4, background_blocks=8, background_batch=2,
    checkpoint_every=2, warmup=1, vocab_rows=64, block_len=32,
)  # fmt: skip
PROMPT = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12]])


def copy_student(source: Path, out: Path) -> Path:
    """A private copy of a student directory whose manifest names its own database."""
    shutil.copytree(source, out)
    manifest_path = out / STUDENT_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["db"] = default_db_url(out)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def logits(student: Path, packs=()) -> torch.Tensor:
    """The student's logits on PROMPT with ``packs`` attached."""
    loaded = load_student(student, packs=packs)
    try:
        with torch.no_grad():
            return loaded.model(input_ids=PROMPT).logits.clone()
    finally:
        loaded.close()


def learn_tiny_pack(student: Path, name: str, first_topic: int, seed: int = 0) -> None:
    """A tiny pack ``name`` learnt on four help topics from ``first_topic``."""
    from memstore_gpt2.packs.learn import learn_pack
    from memstore_gpt2.text_data import python_docs_corpus

    text = student.parent / f"{name}-{first_topic}-{seed}.txt"
    text.write_text("\n\n".join(python_docs_corpus()[first_topic : first_topic + 4]),
                    encoding="utf-8")  # fmt: skip
    learn_pack(student, text, name, dataclasses.replace(TINY, seed=seed))
