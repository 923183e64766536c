"""Opening the model directory a user points a command at: a memstore student or a plain GPT-2.

``memstore generate`` and ``memstore evaluate`` accept both, so a student and its teacher can be
compared with the same command; only a student has a database (and rows that can page under a
memory budget). Kept apart from the commands so both share one set of error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstore_gpt2.errors import StudentFormatError, TeacherNotFoundError
from memstore_gpt2.student import STUDENT_FILE, LoadedStudent, load_student


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
    path: str | os.PathLike, db: str | None = None, memory_budget=None
) -> OpenedModel:
    """A student directory (with its memory from ``db`` or its own database, paging under
    ``memory_budget``), else a GPT-2 model directory (``db`` and ``memory_budget`` then have
    nothing to act on); :class:`StudentFormatError` (one line) for anything else."""
    if not Path(path).is_dir():
        raise StudentFormatError(f"no directory {str(path)!r}: give a student or model directory")
    if (Path(path) / STUDENT_FILE).is_file():
        loaded = load_student(path, db=db, memory_budget=memory_budget)
        return OpenedModel(loaded.model, loaded.tokenizer, loaded)
    from memstore_gpt2.teacher import load_teacher

    try:
        model, tokenizer = load_teacher(path)
    except TeacherNotFoundError:
        raise StudentFormatError(
            f"{str(path)!r} is neither a memstore student directory (no {STUDENT_FILE}) "
            "nor a GPT-2 model directory"
        ) from None
    return OpenedModel(model, tokenizer, None)
