"""Opening the model directory a user points a command at: a memstore student or a plain GPT-2.

``memstore generate`` and ``memstore evaluate`` accept both, so a student and its teacher can be
compared with the same command; only a student has a database (and rows that can page under a
memory budget). Kept apart from the commands so both share one set of error messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstore_gpt2.errors import PackError, StudentFormatError, TeacherNotFoundError
from memstore_gpt2.student import STUDENT_FILE, LoadedStudent, load_student

#: The size fields of a GPT-2 config.json, with GPT-2 small's values (what "absurd" is measured
#: against when naming the field that makes a model too large).
SIZE_FIELDS = {
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
    "n_inner": 3072,
}


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def gpt2_weight_bytes(config: dict) -> int:
    """float32 bytes of the dense weights a GPT-2 of ``config`` (config.json's fields) allocates:
    token and position embeddings, per block attention (4 d^2) and MLP (2 d inner), layer norms."""
    d, layers = config["n_embd"], config["n_layer"]
    inner = config.get("n_inner") or 4 * d
    per_block = 4 * d * d + 4 * d + 2 * d * inner + inner + d + 4 * d
    params = (config["vocab_size"] + config["n_positions"]) * d + layers * per_block + 2 * d
    return 4 * params


def check_model_size(model_dir: str | os.PathLike, limit_bytes: int | None = None) -> None:
    """Refuse a config.json whose sizes are not positive integers, or whose model would not fit
    in ``limit_bytes`` (default: this machine's RAM), in one line naming the field, before
    anything is allocated: torch would otherwise try (``n_embd`` 10**9 asks for terabytes) and
    die with an allocator traceback or the OOM killer. A missing or unreadable config.json is
    left to the loader's own message."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    if any(config.get(f) is None for f in ("n_embd", "n_layer", "vocab_size", "n_positions")):
        return  # not a GPT-2 config: the loader says so
    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is None:  # n_inner None means 4 * n_embd
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StudentFormatError(f"{path}: {field} must be a positive integer, got {value!r}")
    limit = physical_memory_bytes() if limit_bytes is None else limit_bytes
    if limit is None:
        return
    need = gpt2_weight_bytes(config)
    if need > limit:
        field = max(
            (f for f in SIZE_FIELDS if config.get(f)),
            key=lambda f: config[f] / SIZE_FIELDS[f],
        )
        raise StudentFormatError(
            f"{path}: {field} {config[field]} makes a model of {_bytes(need)} of float32 "
            f"weights, more than the {_bytes(limit)} of memory here; refusing before allocating"
        )


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


@dataclass
class OpenedModel:
    """A model and its tokenizer; ``student`` holds the open database of a memstore student
    (None for a plain GPT-2 directory). Close it when done."""

    model: Any
    tokenizer: Any
    student: LoadedStudent | None

    def close(self) -> None:
        if self.student is not None:
            self.student.close()

    def __enter__(self) -> OpenedModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_model_dir(
    path: str | os.PathLike, db: str | None = None, memory_budget=None, packs: Sequence[str] = ()
) -> OpenedModel:
    """A student directory (with its memory from ``db`` or its own database, paging under
    ``memory_budget``, ``packs`` attached), else a GPT-2 model directory (``db`` and
    ``memory_budget`` then have nothing to act on, and packs are refused: a pack is learnt for
    one student); :class:`StudentFormatError` (one line) for anything else."""
    if not Path(path).is_dir():
        raise StudentFormatError(f"no directory {str(path)!r}: give a student or model directory")
    check_model_size(path)
    if (Path(path) / STUDENT_FILE).is_file():
        loaded = load_student(path, db=db, memory_budget=memory_budget, packs=packs)
        return OpenedModel(loaded.model, loaded.tokenizer, loaded)
    if packs:
        raise PackError(
            f"{str(path)!r} is not a memstore student directory (no {STUDENT_FILE}): knowledge "
            "packs attach to the student they were learnt for"
        )
    from memstore_gpt2.teacher import load_teacher

    try:
        model, tokenizer = load_teacher(path)
    except TeacherNotFoundError:
        raise StudentFormatError(
            f"{str(path)!r} is neither a memstore student directory (no {STUDENT_FILE}) "
            "nor a GPT-2 model directory"
        ) from None
    return OpenedModel(model, tokenizer, None)
