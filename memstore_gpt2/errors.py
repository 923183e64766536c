"""Errors of the GPT-2 application (teacher, student directories, checkpoints).

They derive from :class:`memstore.errors.MemstoreError`, so the CLI's one handler reports them as one
line like every store error; they live here because the store knows nothing of teachers or students.
"""

from __future__ import annotations

from memstore.errors import DatabaseError, MemstoreError


class TeacherNotFoundError(MemstoreError, LookupError):
    """The teacher model is neither a local directory nor in the local Hugging Face cache."""


class StudentFormatError(MemstoreError):
    """A student directory or training checkpoint is missing files or was written differently."""


class DatabaseInUseError(DatabaseError):
    """Another process is writing the student's memory database (a training run, or an edit)."""
