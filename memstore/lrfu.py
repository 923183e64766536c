"""LRFU (Lee et al., 2001) recency-frequency scores, as numpy references and as SQL expressions.

DESIGN §4: each hit at logical time t adds ``F(now - t) = 2**(-lam*(now - t))`` to a row's combined
recency-frequency value (CRF). We store ``crf`` *as of* ``last_tick``; on a hit at ``t``::

    crf <- 1 + 2**(-lam*(t - last_tick)) * crf ;  last_tick <- t

The score at ``now`` is ``crf * 2**(-lam*(now - last_tick))``. Its log2,
``log2(crf) - lam*(now - last_tick)``, orders rows identically and neither overflows nor underflows
at large ticks, so it is the order key used in SQL. lam = 0 gives LFU (order by hit count), lam = 1
approaches LRU (order by last tick).

Several hits of one row at the same tick (one search batch) fold into one update:
``crf <- c + 2**(-lam*(t - last_tick)) * crf``, which equals applying the single-hit rule c times.
"""

from __future__ import annotations

import math

import numpy as np
import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

_LN2 = math.log(2.0)


def _tick(value: int | ColumnElement) -> ColumnElement:
    """A tick as SQL: a bind parameter (to compile once, run often) or an integer literal."""
    return value if isinstance(value, ColumnElement) else sa.literal(int(value), sa.BigInteger)


def touched(
    crf: np.ndarray, last_tick: np.ndarray, counts: np.ndarray, tick: int, lam: float
) -> np.ndarray:
    """New crf after ``counts`` hits at ``tick`` (numpy reference of the SQL update)."""
    age = (tick - np.asarray(last_tick, np.float64)).clip(min=0.0)
    return np.asarray(counts, np.float64) + np.exp2(-lam * age) * np.asarray(crf, np.float64)


def order_key(crf: np.ndarray, last_tick: np.ndarray, now: int, lam: float) -> np.ndarray:
    """log2 of the LRFU score at ``now``; higher = keep (numpy reference of the SQL expression)."""
    return np.log2(np.asarray(crf, np.float64)) - lam * (now - np.asarray(last_tick, np.float64))


def order_key_sql(
    crf: ColumnElement, last_tick: ColumnElement, now: int | ColumnElement, lam: float
) -> ColumnElement:
    """SQL for :func:`order_key`; ``ln(x)/ln 2`` because both SQLite and PostgreSQL have ``ln``."""
    return sa.func.ln(crf) / sa.literal(_LN2) - sa.literal(float(lam)) * (_tick(now) - last_tick)


def touch_assignments(
    crf: ColumnElement,
    last_tick: ColumnElement,
    hits: ColumnElement,
    count: ColumnElement,
    tick: int | ColumnElement,
    lam: float,
) -> dict[str, ColumnElement]:
    """``UPDATE ... SET`` values for a touch; ``count`` is usually a bind parameter per row.

    Clamping the age at 0 guards rows whose last_tick is ahead of the clock (rows written by
    ``apply_changes`` with a caller's clock), so a touch never increases the decay factor above 1.
    """
    now = _tick(tick)
    age = sa.case((last_tick < now, now - last_tick), else_=sa.literal(0))
    decay = sa.func.power(sa.literal(2.0), sa.literal(-float(lam)) * age)
    return {
        "crf": count + decay * crf,
        "last_tick": sa.case((last_tick < now, now), else_=last_tick),
        "hits": hits + count,
    }
