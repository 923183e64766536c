"""Errors of the GPT-2 application (teacher, student directories, checkpoints).

They derive from :class:`memstore.errors.MemstoreError`, so the CLI's one handler reports them as one
line like every store error; they live here because the store knows nothing of teachers or students.
"""

from __future__ import annotations

from memstore.errors import DatabaseInUseError, MemstoreError


class TeacherNotFoundError(MemstoreError, LookupError):
    """The teacher model is neither a local directory nor in the local Hugging Face cache."""


class StudentFormatError(MemstoreError):
    """A student directory or training checkpoint is missing files or was written differently."""


class RunInterrupted(MemstoreError):
    """A training run stopped on SIGINT/SIGTERM after saving a checkpoint; resuming continues it.

    ``exit_code`` is the shell's convention for death by that signal (128 + its number), so a
    scheduler still sees the run as interrupted rather than finished.
    """

    def __init__(self, signal_name: str, signum: int, step: int, steps: int) -> None:
        super().__init__(
            f"interrupted by {signal_name} at step {step} of {steps}; a checkpoint was saved"
        )
        self.signal_name, self.step, self.steps = signal_name, step, steps
        self.exit_code = 128 + signum


class PackError(MemstoreError):
    """A knowledge pack is missing, already exists, is damaged, or does not fit the student."""


class NonFiniteLossError(MemstoreError, ArithmeticError):
    """A model's loss came out NaN or infinite, so it has no perplexity to report."""


__all__ = [
    "NonFiniteLossError",
    "PackError",
    "DatabaseInUseError",  # lives in memstore.errors: the store's commands raise it too
    "RunInterrupted",
    "StudentFormatError",
    "TeacherNotFoundError",
]
