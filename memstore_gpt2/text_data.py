"""Reading text corpora and packing them into fixed-length token blocks.

Language-model training and perplexity evaluation both want the corpus as one long token stream cut
into ``(n_blocks, block_len)`` windows: no padding, every token predicted once. Keeping this apart
from the trainer lets the teacher trainer, the distiller and the benchmark share exactly the same
tokens, so their perplexities are comparable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from memstore.errors import InvalidInputError

# Files picked up when a directory is given; anything else (binaries, databases) is skipped.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".raw", ".tokens")


def list_text_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into a sorted, de-duplicated list of text files.

    Sorted so that the token stream, and therefore every training run, is reproducible.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            )
            if not files:
                raise InvalidInputError(
                    f"data directory {str(path)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})"
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidInputError(f"data path {str(path)!r} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def read_texts(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Read every text file under ``paths``; fails clearly when there is no text at all."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in list_text_files(paths)]
    if not any(t.strip() for t in texts):
        raise InvalidInputError(f"data {_describe(paths)} contains no text (the files are empty)")
    return texts


def python_docs_corpus() -> list[str]:
    """English prose shipped with every CPython (the ``help()`` topics), for offline demos."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def split_paragraphs(texts: Iterable[str]) -> list[str]:
    """Cut texts into paragraphs so the tokenizer can encode them in parallel batches."""
    out: list[str] = []
    for text in texts:
        out.extend(p + "\n\n" for p in text.split("\n\n") if p.strip())
    return out


def tokenize_texts(tokenizer, texts: Sequence[str], eos_between_texts: bool = True) -> np.ndarray:
    """Encode texts into one int64 token stream; documents are separated by the EOS token.

    ``tokenizer`` is a Hugging Face tokenizer (fast or slow); paragraphs are encoded in batches
    because one giant string makes byte-level BPE quadratic-ish and single-threaded.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces: list[np.ndarray] = []
    for text in texts:
        paragraphs = split_paragraphs([text])
        if not paragraphs:
            continue
        encoded = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, dtype=np.int64))
        if eos_between_texts and eos is not None:
            pieces.append(np.asarray([eos], dtype=np.int64))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(pieces)


def pack_blocks(tokens: np.ndarray, block_len: int) -> np.ndarray:
    """Cut a token stream into ``(n_blocks, block_len)`` windows, dropping the ragged tail."""
    if block_len < 2:
        raise InvalidInputError(f"block length must be at least 2 tokens, got {block_len}")
    n_blocks = len(tokens) // block_len
    if n_blocks == 0:
        raise InvalidInputError(
            f"the data has {len(tokens)} tokens, fewer than one block of {block_len}; "
            "give more text or a shorter --context"
        )
    return tokens[: n_blocks * block_len].reshape(n_blocks, block_len)


#: Longest block a run uses by default: ``--context`` defaults to min(model positions, this).
MAX_DEFAULT_CONTEXT = 128


def default_context(n_positions: int) -> int:
    """The block length of a model with ``n_positions`` positions when none is given: the same
    for distillation and evaluation, so their perplexities compare."""
    return min(n_positions, MAX_DEFAULT_CONTEXT)


def load_blocks(tokenizer, paths, block_len: int) -> np.ndarray:
    """Files/directories -> packed ``(n_blocks, block_len)`` int64 token blocks."""
    return pack_blocks(tokenize_texts(tokenizer, read_texts(paths)), block_len)


def holdout_split(blocks: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split blocks into (train, held-out), taking the held-out slice from the end.

    Used when no ``--eval-data`` is given; the end of the corpus rather than random blocks, so
    neighbouring (overlapping-in-topic) windows do not leak into evaluation.
    """
    if len(blocks) < 2:
        raise InvalidInputError(
            f"need at least 2 blocks of text to hold one out for evaluation, got {len(blocks)}"
        )
    n_eval = max(1, int(round(len(blocks) * fraction)))
    return blocks[:-n_eval], blocks[-n_eval:]


def _describe(paths) -> str:
    if isinstance(paths, (str, Path)):
        return repr(str(paths))
    return ", ".join(repr(str(p)) for p in paths)
