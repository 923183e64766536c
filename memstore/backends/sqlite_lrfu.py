"""LRFU hits on SQLite as an append-only log, folded into the row table lazily.

Mirror of :func:`memstore.lrfu.touch` / :func:`memstore.lrfu.order_key` (the numpy reference),
tested in tests/store/test_semantics.py (effective state, peek scores, eviction order) and
tests/store/test_lrfu.py.

Updating the LRFU state of every hit row in place costs a page rewrite per hit (16 random 16 KiB
pages for a k=16 search: most of a search's write cost, and WAL checkpoints on top). Instead a
search appends ``(id, tick, count)`` to ``touches_<id>`` (one or two pages) and every reader of LRFU
state sees the *effective* values: the stored state combined with the pending hits in closed form.
With hits ``c_i`` at ticks ``t_i`` and ``T = max(last_tick, max t_i)``::

    crf_eff = crf * 2^(-lam (T - last_tick)) + sum_i c_i 2^(-lam (T - t_i)),  last_tick_eff = T

which is exactly :func:`memstore.lrfu.touch` applied hit by hit (every value decayed to the later
tick, then summed; this also covers hits older than ``last_tick``). The log is folded into
``rows_<id>`` (one UPDATE ... FROM, then emptied) when it grows past :data:`FOLD_AT` rows and before
any statement that deletes or replaces rows, so a log entry can never outlive or be applied to the
wrong row. Statements here use named parameters ``:lam`` (and ``:now``), never spliced values.
"""

from __future__ import annotations

from memstore.naming import touches_table as log_table
from memstore.types import CollectionSpec

#: Pending hits kept before they are folded into the row table.
FOLD_AT = 8192


def create_sql(spec: CollectionSpec) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {log_table(spec)} "
        "(id INTEGER NOT NULL, tick INTEGER NOT NULL, count INTEGER NOT NULL)"
    )


def pending_cte(spec: CollectionSpec) -> str:
    """``WITH g, a``: per row id, the newest pending tick ``t``, hit count ``c`` and the pending
    hits' CRF contribution ``add_crf`` as of ``t``."""
    log = log_table(spec)
    return (
        f"WITH g AS (SELECT id, max(tick) AS t, sum(count) AS c FROM {log} GROUP BY id), "
        "a AS (SELECT l.id AS id, g.t AS t, g.c AS c, "
        "sum(l.count * power(2.0, -:lam * (g.t - l.tick))) AS add_crf "
        f"FROM {log} AS l JOIN g ON g.id = l.id GROUP BY l.id) "
    )


#: Effective LRFU columns of row alias ``r`` left-joined with pending alias ``a``: mirror of
#: memstore.lrfu.touch applied to every pending hit (tested in tests/store/test_semantics.py).
EFFECTIVE_CRF = (
    "(CASE WHEN a.id IS NULL THEN r.crf "
    "WHEN a.t >= r.last_tick THEN a.add_crf + power(2.0, -:lam * (a.t - r.last_tick)) * r.crf "
    "ELSE r.crf + a.add_crf * power(2.0, -:lam * (r.last_tick - a.t)) END)"
)
EFFECTIVE_LAST_TICK = "(CASE WHEN a.id IS NULL OR a.t < r.last_tick THEN r.last_tick ELSE a.t END)"
EFFECTIVE_HITS = "(r.hits + coalesce(a.c, 0))"


def effective_rows(spec: CollectionSpec, rows_table: str) -> str:
    """A FROM clause: ``rows_<id> AS r LEFT JOIN a`` (prefix the query with :func:`pending_cte`)."""
    return f"{rows_table} AS r LEFT JOIN a ON a.id = r.id"


def order_key(now_param: str = ":now") -> str:
    """Mirror of :func:`memstore.lrfu.order_key` over the effective columns (log2 of the score at
    ``now``; tested in tests/store/test_semantics.py)."""
    return f"(ln({EFFECTIVE_CRF}) / ln(2.0) - :lam * ({now_param} - {EFFECTIVE_LAST_TICK}))"


def fold_sql(spec: CollectionSpec, rows_table: str) -> str:
    return (
        pending_cte(spec) + f"UPDATE {rows_table} AS r SET crf = {EFFECTIVE_CRF}, "
        f"last_tick = {EFFECTIVE_LAST_TICK}, hits = r.hits + a.c FROM a WHERE r.id = a.id"
    )
