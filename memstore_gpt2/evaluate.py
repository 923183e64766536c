"""Test perplexity of a saved model on text files: the distillation's held-out measure, on its own.

The text is tokenised and packed into blocks by :func:`~memstore_gpt2.text_data.load_blocks` and
scored by :func:`~memstore_gpt2.lm_training.perplexity`, exactly as ``memstore distill gpt2`` scores
its ``--eval-data``, so the number is comparable with a run's ``student_ppl`` (same blocks, same
batch size) and with the teacher's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore.errors import bad_parameter
from memstore_gpt2.errors import NonFiniteLossError
from memstore_gpt2.lm_training import EVAL_BATCH_SIZE, autocast, model_device, perplexity
from memstore_gpt2.text_data import default_context, load_blocks


def evaluation_blocks(
    tokenizer,
    data: Sequence[str | Path],
    n_positions: int,
    context: int | None = None,
    max_blocks: int | None = None,
) -> np.ndarray:
    """``(n_blocks, context)`` token blocks of ``data`` for a model of ``n_positions`` positions;
    ``context`` defaults as the distillation's does, ``max_blocks`` keeps the first ones."""
    context = context if context is not None else default_context(n_positions)
    if context < 2 or context > n_positions:
        raise bad_parameter(
            "context", f"must be between 2 and the model's {n_positions} positions, got {context}"
        )
    if max_blocks is not None and max_blocks < 1:
        raise bad_parameter("blocks", f"must be positive, got {max_blocks}")
    blocks = load_blocks(tokenizer, list(data), context)
    return blocks if max_blocks is None else blocks[:max_blocks]


@dataclass(frozen=True)
class Evaluation:
    """One perplexity measurement: ``tokens`` is every token fed to the model (blocks times
    block length); ``seconds`` is the wall time of the forwards alone (no loading)."""

    perplexity: float
    tokens: int
    blocks: int
    context: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def evaluate_perplexity(
    model, blocks: np.ndarray, *, batch_size: int = EVAL_BATCH_SIZE, precision: str = "fp32"
) -> Evaluation:
    """Perplexity of ``model`` over ``blocks`` (``batch_size`` blocks per forward, under
    ``precision`` as in training), timed."""
    if batch_size < 1:
        raise bad_parameter("batch_size", f"must be positive, got {batch_size}")
    started = time.perf_counter()
    with autocast(model_device(model), precision):
        value = perplexity(model, blocks, batch_size=batch_size)
    seconds = time.perf_counter() - started
    if not math.isfinite(value):
        # a NaN or infinite loss has no perplexity: exiting 0 with null would pass for a result
        raise NonFiniteLossError(
            f"the loss over the {len(blocks)} evaluation block(s) is {value}: the model's "
            "weights or memory hold NaN or infinite values"
            + (f" (or {precision} overflowed: try --precision fp32)" if precision != "fp32" else "")
            + "; there is no perplexity to report"
        )
    n_blocks, context = blocks.shape
    return Evaluation(value, int(blocks.size), int(n_blocks), int(context), seconds)
