"""Reading and packing text: the token stream every teacher/student comparison is built on."""

from __future__ import annotations

import numpy as np
import pytest

from memstore.errors import InvalidInputError
from memstore_gpt2.text_data import holdout_split, list_text_files, pack_blocks, read_texts


def test_directories_expand_to_sorted_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("see")
    (tmp_path / "skip.db").write_bytes(b"\0\1")
    names = [p.name for p in list_text_files(tmp_path)]
    assert names == ["a.md", "b.txt", "c.txt"]
    assert read_texts([tmp_path / "b.txt", tmp_path]) == ["bee", "ay", "see"]


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidInputError, match="no text"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidInputError, match="no text files"):
        read_texts(tmp_path / "d")


def test_pack_blocks_drops_only_the_ragged_tail():
    blocks = pack_blocks(np.arange(10, dtype=np.int64), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(InvalidInputError, match="fewer than one block"):
        pack_blocks(np.arange(3), 4)


def test_holdout_takes_the_end():
    blocks = np.arange(40).reshape(20, 2)
    train, held = holdout_split(blocks, 0.1)
    assert len(train) == 18 and held.tolist() == [[36, 37], [38, 39]]
    with pytest.raises(InvalidInputError):
        holdout_split(blocks[:1])


def test_tokenized_stream_separates_documents_with_eos(teacher_dir):
    from memstore_gpt2.teacher import load_teacher
    from memstore_gpt2.text_data import tokenize_texts

    _, tokenizer = load_teacher(teacher_dir)
    ids = tokenize_texts(tokenizer, ["first text", "second text"])
    assert (ids == tokenizer.eos_token_id).sum() == 2
    assert tokenizer.decode(ids[ids != tokenizer.eos_token_id]).startswith("first text")
