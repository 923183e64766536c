"""A Collection: batched numpy operations on one named set of rows, each batch one transaction."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np

from memstore import catalog, lrfu
from memstore.errors import InvalidInputError, RowNotFoundError
from memstore.recombine import pairwise_distances, plan_merges, plan_novel
from memstore.schema import COUNTERS
from memstore.types import CollectionSpec, RowBlock, SearchResult
from memstore.validation import as_ids, as_matrix, check_k, check_nonzero_rows

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from memstore.store import Store


class Collection:
    """Handle on one collection; cheap to create, holds no connection."""

    def __init__(self, store: Store, spec: CollectionSpec) -> None:
        self.store = store
        self.spec = spec

    # ----------------------------------------------------------- definition
    name = property(lambda self: self.spec.name)
    key_dim = property(lambda self: self.spec.key_dim)
    value_dim = property(lambda self: self.spec.value_dim)
    metric = property(lambda self: self.spec.metric)
    lrfu_lambda = property(lambda self: self.spec.lrfu_lambda)
    capacity = property(lambda self: self.spec.capacity)
    index = property(lambda self: self.spec.index)
    oversample = property(lambda self: self.spec.oversample)

    @property
    def _backend(self):
        return self.store.backend

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Collection({s.name!r}, key_dim={s.key_dim}, value_dim={s.value_dim}, "
            f"metric={s.metric!r}, index={s.index!r})"
        )

    def __len__(self) -> int:
        with self.store.read() as conn:
            return self._backend.count_rows(conn, self.spec)

    @property
    def clock(self) -> int:
        """The current logical tick (advanced once per touching search batch or set by callers)."""
        with self.store.read() as conn:
            return catalog.state(conn, self.spec.id)["clock"]

    # ---------------------------------------------------------------- input
    def _keys(self, keys, what: str = "keys") -> np.ndarray:
        out = as_matrix(keys, self.spec.key_dim, what)
        if self.spec.metric == "cosine":
            check_nonzero_rows(out, what)
        return out

    def _values(self, values, n: int, keys: np.ndarray | None, what: str = "values") -> np.ndarray:
        if values is None:
            if keys is None:
                raise InvalidInputError(f"{what} are required")
            if self.spec.value_dim != self.spec.key_dim:
                raise InvalidInputError(
                    f"{what} are required: value_dim {self.spec.value_dim} differs from "
                    f"key_dim {self.spec.key_dim}, so keys cannot serve as values"
                )
            return keys
        out = as_matrix(values, self.spec.value_dim, what)
        if len(out) != n:
            raise InvalidInputError(f"{what} have {len(out)} rows but there are {n} keys/ids")
        return out

    # ---------------------------------------------------------------- writes
    def insert(self, keys, values=None) -> np.ndarray:
        """Insert rows; ids are assigned consecutively in row order. Returns int64 ids (n,)."""
        k = self._keys(keys)
        v = self._values(values, len(k), k)
        with self.store.write() as conn:
            state = catalog.state(conn, self.spec.id)
            ids = state["next_id"] + np.arange(len(k), dtype=np.int64)
            self._backend.insert_rows(conn, self.spec, RowBlock.fresh(ids, k, v, state["clock"]))
            catalog.set_state(
                conn, self.spec.id, next_id=int(ids[-1]) + 1, add_counters={"inserts": len(k)}
            )
        return ids

    def update(self, ids, keys=None, values=None) -> None:
        """Replace keys and/or values of existing rows (LRFU state is kept)."""
        id_arr = as_ids(ids, unique=True)
        if keys is None and values is None:
            raise InvalidInputError("update needs keys, values or both")
        k = None if keys is None else self._keys(keys)
        v = None if values is None else as_matrix(values, self.spec.value_dim, "values")
        for arr, what in ((k, "keys"), (v, "values")):
            if arr is not None and len(arr) != len(id_arr):
                raise InvalidInputError(f"{what} have {len(arr)} rows but {len(id_arr)} ids given")
        with self.store.write() as conn:
            self._require(conn, id_arr)
            self._backend.update_rows(conn, self.spec, id_arr, k, v)

    def delete(self, ids) -> int:
        """Delete rows (and their index entries); unknown ids are ignored. Returns how many."""
        id_arr = as_ids(ids)
        with self.store.write() as conn:
            return self._backend.delete_rows(conn, self.spec, id_arr)

    def _require(self, conn, ids: np.ndarray) -> RowBlock:
        rows = self._backend.fetch_rows(conn, self.spec, ids)
        if len(rows) != len(np.unique(ids)):
            missing = np.setdiff1d(ids, rows.ids)
            shown = ", ".join(str(i) for i in missing[:10].tolist())
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise RowNotFoundError(f"collection {self.name!r} has no rows with ids {shown}{more}")
        return rows

    # ----------------------------------------------------------------- reads
    def get(self, ids) -> RowBlock:
        """Rows in the order of ``ids`` (RowNotFoundError if any is missing)."""
        id_arr = as_ids(ids)
        with self.store.read() as conn:
            rows = self._require(conn, id_arr)
        return rows.take(np.searchsorted(rows.ids, id_arr))

    def export_rows(self) -> RowBlock:
        """Every row, ordered by id (bulk path for memstore_torch's resident index)."""
        with self.store.read() as conn:
            return self._backend.fetch_rows(conn, self.spec, None)

    def search(
        self,
        queries,
        k: int,
        touch: bool = True,
        *,
        tick: int | None = None,
        recombine: float | None = None,
        novel: float | None = None,
        novel_values=None,
    ) -> SearchResult:
        """k nearest rows per query; padded with id -1 / distance +inf when fewer than k rows exist.

        ``touch`` records an LRFU hit for every returned row at a new tick (clock + 1, or ``tick``)
        and counts the batch in ``stats()["searches"]``.
        ``recombine`` merges each query's hits within that distance (DESIGN §5); ``novel`` inserts
        queries whose nearest hit is farther than that (values from ``novel_values``, default the
        queries). With either, the returned result is searched again after the changes, and
        ``result.changes`` counts them. ``touch=False`` without them is a pure read.
        """
        q = self._keys(queries, "queries")
        k = check_k(k)
        if novel is not None:
            novel = float(novel)
            nv = self._values(novel_values, len(q), q, "novel_values")
        if recombine is not None:
            recombine = float(recombine)
        if tick is not None and (isinstance(tick, bool) or int(tick) != tick or tick < 0):
            raise InvalidInputError(f"tick must be a non-negative integer, got {tick!r}")
        if not touch and recombine is None and novel is None:
            with self.store.read() as conn:
                return self._backend.knn(conn, self.spec, q, k)

        with self.store.write() as conn:
            state = catalog.state(conn, self.spec.id)
            # A touching search is a new tick; recombination/novelty alone keep the clock.
            if tick is not None:
                now = int(tick)
            else:
                now = state["clock"] + 1 if touch else state["clock"]
            if now < state["clock"]:
                raise InvalidInputError(
                    f"tick {now} is before the collection's clock {state['clock']}"
                )
            result = self._backend.knn(conn, self.spec, q, k)
            if touch:
                hit = result.ids[result.ids >= 0]
                ids, counts = np.unique(hit, return_counts=True)
                self._backend.touch(conn, self.spec, ids, counts.astype(np.int64), now)
            counters = {"searches": 1} if touch else {}
            next_id = state["next_id"]
            changed = np.zeros(len(q), bool)
            if recombine is not None:
                hit = np.unique(result.ids[result.ids >= 0])
                groups = plan_merges(
                    result, self._backend.fetch_rows(conn, self.spec, hit), recombine
                )
                if groups:
                    merged = RowBlock(
                        ids=next_id + np.arange(len(groups), dtype=np.int64),
                        keys=np.stack([g.key for g in groups]),
                        values=np.stack([g.value for g in groups]),
                        crf=np.array([g.crf for g in groups], np.float64),
                        last_tick=np.array([g.last_tick for g in groups], np.int64),
                        hits=np.array([g.hits for g in groups], np.int64),
                        created_tick=np.array([g.created_tick for g in groups], np.int64),
                    )
                    gone = np.concatenate([g.ids for g in groups])
                    self._backend.delete_rows(conn, self.spec, gone)
                    self._backend.insert_rows(conn, self.spec, merged)
                    next_id += len(groups)
                    counters["recombinations"] = len(groups)
                    changed |= np.isin(result.ids, gone).any(1)
            if novel is not None:
                chosen = plan_novel(
                    q,
                    result.distances[:, 0].astype(np.float64),
                    novel,
                    lambda a, b: pairwise_distances(self.spec.metric, a, b),
                )
                if len(chosen):
                    ids = next_id + np.arange(len(chosen), dtype=np.int64)
                    self._backend.insert_rows(
                        conn, self.spec, RowBlock.fresh(ids, q[chosen], nv[chosen], now)
                    )
                    next_id += len(chosen)
                    counters["novel_inserts"] = len(chosen)
                    counters["inserts"] = len(chosen)
                    changed[:] = True  # a new row may now be the nearest of any query
            if changed.any():
                again = self._backend.knn(conn, self.spec, q[changed], k)
                for field in ("ids", "distances", "keys", "values"):
                    getattr(result, field)[changed] = getattr(again, field)
            catalog.set_state(conn, self.spec.id, clock=now, next_id=next_id, add_counters=counters)
            result.changes = {
                name: counters.get(name, 0) for name in ("recombinations", "novel_inserts")
            }
            return result

    def recombine(self, queries, threshold: float, k: int = 16) -> int:
        """Merge near-duplicates around ``queries`` without counting hits (DESIGN §3's
        ``recombine(...)``): each query's k nearest rows within ``threshold`` become one row.
        Returns how many merges were made."""
        result = self.search(queries, k, touch=False, recombine=threshold)
        return int(result.changes.get("recombinations", 0))

    # ------------------------------------------------------------------ LRFU
    def evict(
        self, capacity: int | None = None, *, min_score: float | None = None, dry_run: bool = False
    ) -> np.ndarray:
        """Delete the lowest-LRFU rows down to ``capacity`` (default: the collection's) and/or every
        row whose order key ``log2(crf) - lam*(now - last_tick)`` is below ``min_score``.

        Returns the evicted ids, lowest score first; ``dry_run`` only reports them.
        """
        if capacity is None and min_score is None:
            capacity = self.spec.capacity
            if capacity is None:
                raise InvalidInputError(
                    f"collection {self.name!r} has no capacity: give capacity or min_score"
                )
        if capacity is not None and (
            isinstance(capacity, bool)
            or not isinstance(capacity, (int, np.integer))
            or capacity < 0
        ):
            raise InvalidInputError(f"capacity must be a non-negative integer, got {capacity!r}")
        if min_score is not None:
            min_score = float(min_score)
            if np.isnan(min_score):
                raise InvalidInputError("min_score must be a number, got NaN")
        with self.store.write() as conn:
            now = catalog.state(conn, self.spec.id)["clock"]
            victims = np.empty(0, np.int64)
            if capacity is not None:
                excess = self._backend.count_rows(conn, self.spec) - int(capacity)
                if excess > 0:
                    victims = self._backend.lowest_scored(conn, self.spec, now, limit=excess)
            if min_score is not None:
                below = self._backend.lowest_scored(conn, self.spec, now, below=min_score)
                victims = np.concatenate([victims, below[~np.isin(below, victims)]])
            if not dry_run and len(victims):
                self._backend.delete_rows(conn, self.spec, victims)
                catalog.set_state(conn, self.spec.id, add_counters={"evictions": len(victims)})
        return victims

    # ------------------------------------------------------------- bulk sync
    def apply_changes(
        self,
        upserts: RowBlock | None = None,
        deletes=None,
        *,
        clock: int | None = None,
        counters: dict[str, int] | None = None,
        conn: Connection | None = None,
    ) -> None:
        """One transaction: delete ``deletes``, insert-or-replace ``upserts`` (every field kept as
        given), set the clock, add ``counters`` (keys from inserts, novel_inserts, recombinations,
        evictions, searches) to the stats. The flush path of memstore_torch.

        ``conn``: an open ``self.store.write()`` transaction to join instead of opening one, so
        that several collections (and a caller's own rows) change in one atomic commit -- e.g. a
        training checkpoint that must never leave one layer's memory newer than another's."""
        block = None if upserts is None else self._check_block(upserts)
        gone = None if deletes is None else as_ids(deletes, "deletes", allow_empty=True)
        if block is not None and gone is not None and np.isin(block.ids, gone).any():
            raise InvalidInputError("apply_changes: some ids are both upserted and deleted")
        if clock is not None and (isinstance(clock, bool) or int(clock) != clock or clock < 0):
            raise InvalidInputError(f"clock must be a non-negative integer, got {clock!r}")
        for name, amount in (counters or {}).items():
            if name not in COUNTERS:
                raise InvalidInputError(
                    f"unknown counter {name!r}: use one of {', '.join(COUNTERS)}"
                )
            if isinstance(amount, bool) or int(amount) != amount or amount < 0:
                raise InvalidInputError(f"counter {name!r} must be a non-negative integer")
        transaction = self.store.write() if conn is None else nullcontext(conn)
        with transaction as conn:
            state = catalog.state(conn, self.spec.id)
            if gone is not None and len(gone):
                self._backend.delete_rows(conn, self.spec, gone)
            next_id = state["next_id"]
            if block is not None and len(block):
                self._backend.upsert_rows(conn, self.spec, block)
                next_id = max(next_id, int(block.ids.max()) + 1)
            catalog.set_state(
                conn,
                self.spec.id,
                clock=None if clock is None else int(clock),
                next_id=next_id,
                add_counters={k: int(v) for k, v in (counters or {}).items()},
            )

    def _check_block(self, block: RowBlock) -> RowBlock:
        if not isinstance(block, RowBlock):
            raise InvalidInputError(f"upserts must be a RowBlock, got {type(block).__name__}")
        ids = as_ids(block.ids, "upserts.ids", unique=True, allow_empty=True)
        n = len(ids)
        if n == 0:
            return RowBlock.empty(self.key_dim, self.value_dim)
        keys = self._keys(block.keys, "upserts.keys")
        values = as_matrix(block.values, self.value_dim, "upserts.values")
        out = {}
        for name, dtype in (
            ("crf", np.float64),
            ("last_tick", np.int64),
            ("hits", np.int64),
            ("created_tick", np.int64),
        ):
            arr = np.asarray(getattr(block, name))
            if arr.shape != (n,):
                raise InvalidInputError(f"upserts.{name} must have shape ({n},), got {arr.shape}")
            out[name] = arr.astype(dtype)
        if len(keys) != n or len(values) != n:
            raise InvalidInputError(f"upserts keys/values must have {n} rows like upserts.ids")
        if not np.isfinite(out["crf"]).all() or (out["crf"] <= 0).any():
            raise InvalidInputError("upserts.crf must be finite and > 0")
        for name in ("last_tick", "hits", "created_tick"):
            if (out[name] < 0).any():
                raise InvalidInputError(f"upserts.{name} must be >= 0")
        return RowBlock(ids=ids, keys=keys, values=values, **out)

    def compact(self) -> None:
        """Give the space of deleted/evicted rows back to the file system (rebuild index, VACUUM)."""
        self.store._translate(self._backend.compact, self.spec)

    def peek(self, n: int = 5) -> list[dict]:
        """The ``n`` rows next in line for eviction, lowest LRFU order key first (for inspect)."""
        with self.store.read() as conn:
            now = catalog.state(conn, self.spec.id)["clock"]
            ids = self._backend.lowest_scored(conn, self.spec, now, limit=int(n))
            rows = self._backend.fetch_rows(conn, self.spec, ids)
        rows = rows.take(np.searchsorted(rows.ids, ids))
        scores = lrfu.order_key(rows.crf, rows.last_tick, now, self.spec.lrfu_lambda)
        return [
            {
                "id": int(rows.ids[i]),
                "score": float(scores[i]),
                "crf": float(rows.crf[i]),
                "hits": int(rows.hits[i]),
                "last_tick": int(rows.last_tick[i]),
                "created_tick": int(rows.created_tick[i]),
            }
            for i in range(len(rows))
        ]

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Definition, size, clock, lifetime counters and the LRFU order-key summary."""
        with self.store.read() as conn:
            state = catalog.state(conn, self.spec.id)
            rows = self._backend.count_rows(conn, self.spec)
            score = self._backend.score_summary(conn, self.spec, state["clock"])
        s = self.spec
        return {
            "name": s.name,
            "rows": rows,
            "key_dim": s.key_dim,
            "value_dim": s.value_dim,
            "metric": s.metric,
            "index": s.index,
            "oversample": s.oversample,
            "lrfu_lambda": s.lrfu_lambda,
            "capacity": s.capacity,
            "clock": state["clock"],
            "next_id": state["next_id"],
            **{name: state[name] for name in COUNTERS},
            "score": score,
        }
