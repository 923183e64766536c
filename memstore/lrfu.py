"""LRFU (Lee et al., 2001) recency-frequency state: the numpy reference, and its SQL expressions.

Definition (``docs/store.md``, Semantics): every reference of a row at logical tick ``t`` (its
insertion, each search hit) contributes ``F(now - t) = 2**(-lam*(now - t))`` to the row's score::

    score(now) = sum over references t of 2**(-lam*(now - t))

A row stores its combined recency-frequency value ``crf = score(last_tick)`` *as of* ``last_tick``
(the newest reference), so ``score(now) = crf * 2**(-lam*(now - last_tick))``. Two such values
taken at different ticks cannot be added as they are; both are first decayed to the later tick.
Everything below is that one rule, :func:`combined`, applied to different pairs:

* a **touch** (``c`` hits at ``t``) combines the row with ``(c, t)``. For ``t >= last_tick`` this is
  the familiar ``crf <- c + 2**(-lam*(t - last_tick)) * crf; last_tick <- t``, and ``c`` hits in one
  batch equal c successive single hits. A hit older than ``last_tick`` (a row written ahead of the
  clock by ``apply_changes``) is decayed to ``last_tick`` instead, which is exact and never scales
  ``crf`` up;
* a **merge** (recombination, :mod:`memstore.recombine`) combines the members' values at the newest
  member's ``last_tick`` (:func:`merged`);
* the **order key** is ``log2(score(now)) = log2(crf) - lam*(now - last_tick)``, which orders rows
  like the score and neither overflows nor underflows at large ticks; **eviction** goes by ascending
  key, ties broken by older ``last_tick``, then lower id (:func:`eviction_order`).

lam = 0 gives LFU (order by reference count), lam = 1 approaches LRU (order by last tick).

The numpy functions here are the single definition. Mirrors, each tested against them:

* SQL via SQLAlchemy: :func:`touch_assignments`, :func:`order_key_sql` (compiled by the PostgreSQL
  backend, :mod:`memstore.backends.pg_sql`);
* SQLite's append-only touch log folded in closed form (:mod:`memstore.backends.sqlite_lrfu`);
* ``memstore_torch.ResidentIndex`` (``touch_counts``, ``lrfu_scores``, ``evict``, ``recombine``);

tested in ``tests/store/test_semantics.py`` (both SQL backends, through the Collection API) and
``tests/torch/test_semantics_mirrors.py``.
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


# ----------------------------------------------------------------------------- numpy reference
def decayed(crf, last_tick, to_tick, lam: float) -> np.ndarray:
    """``crf`` (as of ``last_tick``) as of the later tick ``to_tick``: ``crf * 2**(-lam*age)``."""
    age = np.asarray(to_tick, np.float64) - np.asarray(last_tick, np.float64)
    return np.exp2(-lam * age) * np.asarray(crf, np.float64)


def combined(crf_a, tick_a, crf_b, tick_b, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Two crf values (each as of its own tick) as one: ``(decayed a + decayed b, later tick)``."""
    tick = np.maximum(np.asarray(tick_a, np.int64), np.asarray(tick_b, np.int64))
    return decayed(crf_a, tick_a, tick, lam) + decayed(crf_b, tick_b, tick, lam), tick


def touch(
    crf, last_tick, hits, counts, tick: int, lam: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New ``(crf, last_tick, hits)`` after ``counts[i]`` hits of row i at ``tick``.

    Rows with ``counts == 0`` are returned unchanged (not merely score-equivalent), as every
    backend leaves rows a search did not hit alone.
    """
    crf = np.asarray(crf, np.float64)
    last_tick = np.asarray(last_tick, np.int64)
    counts = np.asarray(counts, np.int64)
    new_crf, new_tick = combined(crf, last_tick, counts.astype(np.float64), tick, lam)
    hit = counts > 0
    return (
        np.where(hit, new_crf, crf),
        np.where(hit, new_tick, last_tick),
        np.asarray(hits, np.int64) + counts,
    )


def touched(crf, last_tick, counts, tick: int, lam: float) -> np.ndarray:
    """The new ``crf`` of :func:`touch` (for callers that track ``last_tick`` themselves)."""
    return touch(crf, last_tick, np.zeros_like(np.asarray(counts, np.int64)), counts, tick, lam)[0]


def merged(crf, last_tick, hits, created_tick, lam: float) -> tuple[float, int, int, int]:
    """LRFU fields ``(crf, last_tick, hits, created_tick)`` of the row that replaces a merge group.

    Each member's crf is decayed to the group's newest ``last_tick`` and summed (the merged row has
    every reference of every member); ``hits`` are summed, ``created_tick`` is the oldest.
    """
    newest = int(np.max(last_tick))
    return (
        float(decayed(crf, last_tick, newest, lam).sum()),
        newest,
        int(np.sum(hits)),
        int(np.min(created_tick)),
    )


def order_key(crf, last_tick, now: int, lam: float) -> np.ndarray:
    """log2 of the LRFU score at ``now``; higher = keep."""
    return np.log2(np.asarray(crf, np.float64)) - lam * (now - np.asarray(last_tick, np.float64))


def eviction_order(ids, crf, last_tick, now: int, lam: float) -> np.ndarray:
    """``ids`` in eviction order: ascending :func:`order_key`, then older ``last_tick``, then id."""
    ids = np.asarray(ids, np.int64)
    key = order_key(crf, last_tick, now, lam)
    return ids[np.lexsort((ids, np.asarray(last_tick, np.int64), key))]


# ------------------------------------------------------------------------ SQL mirrors
def order_key_sql(
    crf: ColumnElement, last_tick: ColumnElement, now: int | ColumnElement, lam: float
) -> ColumnElement:
    """Mirror of :func:`order_key` in SQL (tested in tests/store/test_semantics.py).

    ``ln(x)/ln 2`` because both SQLite and PostgreSQL have ``ln``."""
    return sa.func.ln(crf) / sa.literal(_LN2) - sa.literal(float(lam)) * (_tick(now) - last_tick)


def touch_assignments(
    crf: ColumnElement,
    last_tick: ColumnElement,
    hits: ColumnElement,
    count: ColumnElement,
    tick: int | ColumnElement,
    lam: float,
) -> dict[str, ColumnElement]:
    """Mirror of :func:`touch` as ``UPDATE ... SET`` values (tested in
    tests/store/test_semantics.py).

    ``count`` is usually a bind parameter or joined column per row (only hit rows are updated).
    The stored crf is decayed by the age of the row at ``tick`` and the hits by the age of ``tick``
    at the row's ``last_tick``; at most one of the two ages is positive, so no factor exceeds 1.
    """
    now = _tick(tick)
    zero = sa.literal(0)
    row_age = sa.case((last_tick < now, now - last_tick), else_=zero)
    hit_age = sa.case((last_tick > now, last_tick - now), else_=zero)
    two = sa.literal(2.0)
    minus_lam = sa.literal(-float(lam))
    return {
        "crf": count * sa.func.power(two, minus_lam * hit_age)
        + sa.func.power(two, minus_lam * row_age) * crf,
        "last_tick": sa.case((last_tick < now, now), else_=last_tick),
        "hits": hits + count,
    }
