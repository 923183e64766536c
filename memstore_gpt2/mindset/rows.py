"""A layer's rows as the database holds them: LRFU facts and what each row promotes.

The facts come from the layer's collection (``Collection.export_rows`` / ``get``), so they are what
``memstore inspect`` and the next load see:

* ``score`` -- the LRFU order key ``log2(crf) - lambda * (clock - last_tick)`` (higher = kept
  longer; docs/design.md, LRFU), the number ``memstore prune --min-score`` compares against;
* ``hits`` -- how many times training reads selected the row;
* ``age`` -- ticks since the row was created, ``idle`` -- ticks since its last hit (one tick per
  training step).

``--promotes TOKEN`` keeps the rows that have TOKEN among their :data:`PROMOTES_WITHIN` most
promoted tokens (:mod:`memstore_gpt2.mindset.vocab`), ordered by TOKEN's logit unless another sort
is asked for: LM-Debugger's "search values by the token they promote".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from memstore import lrfu
from memstore.errors import bad_parameter
from memstore_gpt2.mindset.vocab import project_rows, token_list

SORTS = ("hits", "score", "age")
#: ``--promotes TOKEN`` matches rows with TOKEN among this many of their most promoted tokens.
PROMOTES_WITHIN = 10


def row_facts(entry, ids=None):
    """(RowBlock, clock, lrfu lambda) of ``ids`` (in that order; None: every row, by id)."""
    coll = entry.collection
    block = coll.export_rows() if ids is None else coll.get(np.asarray(ids, np.int64))
    return block, int(coll.clock), float(coll.lrfu_lambda)


def describe_rows(mindset, entry, block, clock: int, lam: float, top: int = 5, projection=None):
    """One dict per row of ``block``: id, LRFU facts, promoted and suppressed tokens."""
    if projection is None:
        projection = project_rows(mindset.model, entry.layer, torch.from_numpy(block.values), top)
    scores = lrfu.order_key(block.crf, block.last_tick, clock, lam)
    out = []
    for i in range(len(block)):
        score = float(scores[i])
        out.append(
            {
                "id": int(block.ids[i]),
                "score": round(score, 4) if math.isfinite(score) else None,
                "hits": int(block.hits[i]),
                "age": int(clock - block.created_tick[i]),
                "idle": int(clock - block.last_tick[i]),
                "value_norm": round(float(np.linalg.norm(block.values[i])), 4),
                "promotes": token_list(
                    mindset, projection.promote_ids[i, :top], projection.promote_logits[i, :top]
                ),
                "suppresses": token_list(
                    mindset, projection.suppress_ids[i, :top], projection.suppress_logits[i, :top]
                ),
            }
        )
    return out


def list_rows(
    mindset,
    layer: str,
    *,
    promotes: str | None = None,
    sort: str | None = None,
    limit: int | None = 20,
    ascending: bool = False,
    top: int = 5,
) -> dict:
    """Rows of ``layer`` sorted by ``sort`` (hits, score or age; descending unless
    ``ascending``), at most ``limit`` (None or 0: all), optionally only those that promote a
    token. Returns ``{"layer", "rows": [...], "matched", "total", "clock"}``."""
    if sort is not None and sort not in SORTS:
        raise bad_parameter("sort", f"must be one of {', '.join(SORTS)}, got {sort!r}")
    if limit is not None and limit < 0:
        raise bad_parameter("limit", f"must be >= 0, got {limit}")
    if top < 1:
        raise bad_parameter("top", f"must be >= 1, got {top}")
    entry = mindset.layer(layer)
    token_id = None if promotes is None else mindset.token_id(promotes)
    block, clock, lam = row_facts(entry)
    projection = project_rows(
        mindset.model,
        entry.layer,
        torch.from_numpy(block.values),
        max(top, PROMOTES_WITHIN),
        token_id=token_id,
    )
    keys = {
        "hits": block.hits.astype(np.float64),
        "score": lrfu.order_key(block.crf, block.last_tick, clock, lam),
        "age": (clock - block.created_tick).astype(np.float64),
    }
    positions = np.arange(len(block))
    if token_id is not None:
        positions = positions[projection.token_rank.numpy() <= PROMOTES_WITHIN]
        if sort is None:
            key = projection.token_logit.numpy()[positions]
            positions = positions[np.argsort(-key if not ascending else key, kind="stable")]
    if sort is not None or token_id is None:
        key = keys[sort or "hits"][positions]
        positions = positions[np.argsort(key if ascending else -key, kind="stable")]
    matched = len(positions)
    if limit:
        positions = positions[:limit]
    rows = describe_rows(
        mindset, entry, block.take(positions), clock, lam, top, projection.take(positions)
    )
    if token_id is not None:
        for row, pos in zip(rows, positions.tolist(), strict=True):
            row["token_rank"] = int(projection.token_rank[pos])
            row["token_logit"] = round(float(projection.token_logit[pos]), 4)
    return {
        "layer": entry.name,
        "rows": rows,
        "matched": matched,
        "total": len(block),
        "clock": clock,
        **({"promotes": mindset.token_text(token_id)} if token_id is not None else {}),
    }
