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

The extra rows of a grown student (a product-key layer, ``layer<i>.extra``) may be millions, so
they are never read whole: a listing reads them :data:`PAGE_ROWS` at a time by id range (their
ids are ``1..n`` for ever, :func:`row_pages`) and keeps only the best ``limit`` rows so far, so
it holds one page and the rows it will show.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from memstore import lrfu
from memstore.errors import bad_parameter
from memstore.types import RowBlock
from memstore_gpt2.mindset.vocab import project_rows, token_list

SORTS = ("hits", "score", "age")
#: ``--promotes TOKEN`` matches rows with TOKEN among this many of their most promoted tokens.
PROMOTES_WITHIN = 10
#: Product-key rows read per page when listing (a page of 768-wide values is 24 MiB).
PAGE_ROWS = 8192


def row_facts(entry, ids=None):
    """(RowBlock, clock, lrfu lambda) of ``ids`` (in that order; None: every row, by id)."""
    coll = entry.collection
    block = coll.export_rows() if ids is None else coll.get(np.asarray(ids, np.int64))
    return block, int(coll.clock), float(coll.lrfu_lambda)


def row_pages(entry, page_rows: int | None = None) -> Iterator:
    """A layer's rows as RowBlocks, by id: one block for a featural or associative layer (ids
    are sparse after deletes and merges; the table is as large as the MLP it replaced), and pages
    of ``page_rows`` (default :data:`PAGE_ROWS`) ids read with ``Collection.get`` for
    product-key rows (ids ``1..n``, never
    deleted). Each page is its own read: a listing made while an edit is written may see some
    pages before it and some after."""
    coll = entry.collection
    if not entry.product_keys:
        yield coll.export_rows()
        return
    n, page_rows = len(coll), page_rows or PAGE_ROWS
    for start in range(1, n + 1, page_rows):
        yield coll.get(np.arange(start, min(start + page_rows, n + 1), dtype=np.int64))


def describe_rows(mindset, entry, block, clock: int, lam: float, top: int = 5, projection=None):
    """One dict per row of ``block``: id, LRFU facts, promoted and suppressed tokens (and, for a
    product-key row, its ``address`` ``[i, j]``)."""
    if projection is None:
        projection = project_rows(mindset.model, entry.layer, torch.from_numpy(block.values), top)
    scores = lrfu.order_key(block.crf, block.last_tick, clock, lam)
    out = []
    for i in range(len(block)):
        score = float(scores[i])
        out.append(
            {
                "id": int(block.ids[i]),
                # a product-key row's key is its fixed address [i, j]: sub-keys i and j
                **({"address": block.keys[i].astype(int).tolist()} if entry.product_keys else {}),
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
    coll = entry.collection
    clock, lam = int(coll.clock), float(coll.lrfu_lambda)
    best: tuple | None = None  # (rows, projection, sort key): the best so far, in order
    matched = total = 0
    for block in row_pages(entry):
        total += len(block)
        projection = project_rows(
            mindset.model,
            entry.layer,
            torch.from_numpy(block.values),
            max(top, PROMOTES_WITHIN),
            token_id=token_id,
        )
        positions = np.arange(len(block))
        if token_id is not None:
            positions = positions[projection.token_rank.numpy() <= PROMOTES_WITHIN]
        if token_id is not None and sort is None:
            key = projection.token_logit.numpy().astype(np.float64)
        else:
            key = _sort_key(sort or "hits", block, clock, lam)
        matched += len(positions)
        page = (block.take(positions), projection.take(positions), key[positions])
        # earlier pages hold lower ids: a stable sort of (best so far + page) breaks ties by id,
        # as one sort of every row would
        best = page if best is None else _joined(best, page)
        order = np.argsort(best[2] if ascending else -best[2], kind="stable")
        if limit:
            order = order[:limit]
        best = (best[0].take(order), best[1].take(order), best[2][order])
    kept, projection, _ = best if best is not None else (None, None, None)
    rows = [] if kept is None else describe_rows(mindset, entry, kept, clock, lam, top, projection)
    if token_id is not None:
        for i, row in enumerate(rows):
            row["token_rank"] = int(projection.token_rank[i])
            row["token_logit"] = round(float(projection.token_logit[i]), 4)
    return {
        "layer": entry.name,
        "rows": rows,
        "matched": matched,
        "total": total,
        "clock": clock,
        **({"promotes": mindset.token_text(token_id)} if token_id is not None else {}),
    }


def _sort_key(sort: str, block, clock: int, lam: float) -> np.ndarray:
    if sort == "hits":
        return block.hits.astype(np.float64)
    if sort == "score":
        return lrfu.order_key(block.crf, block.last_tick, clock, lam)
    return (clock - block.created_tick).astype(np.float64)


def _joined(a: tuple, b: tuple) -> tuple:
    """Two (rows, projection, key) selections as one, ``a`` first."""
    return (RowBlock.concat([a[0], b[0]]), a[1].joined(b[1]), np.concatenate([a[2], b[2]]))
