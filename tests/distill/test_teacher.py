"""Teacher loading: local directories and hub names from the local cache, never the network."""

from __future__ import annotations

import shutil

import pytest
import torch

from memstore_gpt2.errors import TeacherNotFoundError
from memstore_gpt2.teacher import load_teacher


def test_hub_name_is_found_in_the_local_cache(tmp_path, teacher_dir):
    snapshot = tmp_path / "models--tiny-gpt2" / "snapshots" / "0123abcd"
    shutil.copytree(teacher_dir, snapshot)
    (tmp_path / "models--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "models--tiny-gpt2" / "refs" / "main").write_text("0123abcd")
    model, tokenizer = load_teacher("tiny-gpt2", cache_dir=tmp_path)
    reference, _ = load_teacher(teacher_dir)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert tokenizer.eos_token_id is not None and not model.training


def test_absent_hub_name_fails_fast_naming_the_flag(tmp_path):
    with pytest.raises(TeacherNotFoundError, match="--teacher DIR"):
        load_teacher("gpt2", cache_dir=tmp_path)


def test_a_file_is_not_a_teacher(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(TeacherNotFoundError, match="is a file"):
        load_teacher(path)
