"""A Collection: batched numpy operations on one named set of rows, each batch one transaction."""

from __future__ import annotations

import numpy as np

from memstore import catalog, lrfu
from memstore.distances import pairwise_distances
from memstore.errors import CorruptDataError, InvalidInputError, RowNotFoundError
from memstore.recombine import merged_rows, plan_merges, plan_novel
from memstore.schema import COUNTERS
from memstore.transactions import TransactionHost
from memstore.types import CollectionSpec, RowBlock, SearchResult
from memstore.validation import (
    INT64_MAX,
    as_ids,
    as_matrix,
    check_count,
    check_int64,
    check_k,
    check_nonzero_rows,
    check_norms,
    check_threshold,
)


class Collection:
    """Handle on one collection; cheap to create, holds no connection.

    ``store`` is the :class:`memstore.Store` it belongs to; the collection only needs its
    transactions and backend (:class:`memstore.transactions.TransactionHost`).
    """

    def __init__(self, store: TransactionHost, spec: CollectionSpec) -> None:
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

    def max_id(self) -> int | None:
        """The largest stored id (None when empty): one index lookup, so the cheap way to ask
        whether a large collection holds rows (``len`` counts them all)."""
        with self.store.read() as conn:
            return self._backend.max_id(conn, self.spec)

    @property
    def clock(self) -> int:
        """The current logical tick (advanced once per touching search batch or set by callers)."""
        with self.store.read() as conn:
            return catalog.state(conn, self.spec.id)["clock"]

    # ---------------------------------------------------------------- input
    def _keys(self, keys, what: str = "keys") -> np.ndarray:
        out = as_matrix(keys, self.spec.key_dim, what)
        check_norms(out, what)
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
            if state["next_id"] > INT64_MAX - len(k):
                raise InvalidInputError(f"collection {self.name!r} has run out of 64-bit ids")
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
        try:
            with self.store.read() as conn:
                rows = self._require(conn, id_arr)
        except CorruptDataError as exc:  # the backend's decode: say which collection
            raise CorruptDataError(f"collection {self.name!r}: {exc}") from None
        return self._finite(rows).take(np.searchsorted(rows.ids, id_arr))

    def get_existing(self, ids) -> RowBlock:
        """The rows among ``ids`` that exist, ordered by id (missing ids are left out, not an
        error): how a reader holding a copy learns which of some changed rows were deleted."""
        id_arr = as_ids(ids, allow_empty=True)
        try:
            with self.store.read() as conn:
                rows = self._backend.fetch_rows(conn, self.spec, id_arr)
        except CorruptDataError as exc:  # the backend's decode: say which collection
            raise CorruptDataError(f"collection {self.name!r}: {exc}") from None
        return self._finite(rows)

    def export_rows(self) -> RowBlock:
        """Every row, ordered by id (bulk path for memstore_torch's resident index)."""
        try:
            with self.store.read() as conn:
                rows = self._backend.fetch_rows(conn, self.spec, None)
        except CorruptDataError as exc:  # the backend's decode: say which collection
            raise CorruptDataError(f"collection {self.name!r}: {exc}") from None
        return self._finite(rows)

    def _finite(self, rows: RowBlock) -> RowBlock:
        """``rows``, or :class:`CorruptDataError` naming the rows whose keys or values are NaN or
        infinite. The store never writes such values (input is checked), so they mean a damaged
        or tampered file; handing them on would make every model forward that reads one NaN
        (a perplexity of null, a crash in sampling). One pass over the data, on reads of rows
        only (``get``, ``export_rows``: what resident loads and paged reads use)."""
        bad = ~(np.isfinite(rows.values).all(axis=1) & np.isfinite(rows.keys).all(axis=1))
        if bad.any():
            ids = rows.ids[bad].tolist()
            shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
            raise CorruptDataError(
                f"collection {self.name!r} holds NaN or infinite values in {len(ids)} row(s) "
                f"(id {shown}): the database is damaged (memstore never writes such values); "
                "delete those rows or restore the file"
            )
        return rows

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
        ``recombine`` merges each query's hits within that distance (:mod:`memstore.recombine`:
        the nearest hit keeps its id, crf is decayed to the newest member's tick, then summed);
        ``novel`` inserts queries whose nearest hit is farther than that (values from
        ``novel_values``, default the queries). With either, every query the changes can affect
        is searched again, so the returned result reflects them, and ``result.changes`` counts
        them. ``touch=False`` without them is a pure read.

        ``queries`` is (m, key_dim); a 1-D array of length key_dim is one query, answered as a
        batch of one (every result array keeps its leading axis of length 1, as for ``q[None]``),
        and ``novel_values`` may then be 1-D too.
        """
        one = _is_single_row(queries)
        q = self._keys(np.asarray(queries)[None] if one else queries, "queries")
        k = check_k(k)
        if novel is not None:
            novel = check_threshold(novel, "novel", self.spec.metric)
            if one and novel_values is not None and _is_single_row(novel_values):
                novel_values = np.asarray(novel_values)[None]
            nv = self._values(novel_values, len(q), q, "novel_values")
        if recombine is not None:
            recombine = check_threshold(recombine, "recombine", self.spec.metric)
        if tick is not None:
            tick = check_count(tick, "tick")
        if not touch and recombine is None and novel is None:
            with self.store.read() as conn:
                return self._knn(conn, q, k)

        with self.store.write() as conn:
            state = catalog.state(conn, self.spec.id)
            # A touching search is a new tick; recombination/novelty alone keep the clock.
            if tick is not None:
                now = int(tick)
            else:
                now = state["clock"] + 1 if touch else state["clock"]
                if now > INT64_MAX:
                    raise InvalidInputError(
                        f"collection {self.name!r}'s clock is at 2**63 - 1 and cannot advance"
                    )
            if now < state["clock"]:
                raise InvalidInputError(
                    f"tick {now} is before the collection's clock {state['clock']}"
                )
            result = self._knn(conn, q, k)
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
                    result,
                    self._backend.fetch_rows(conn, self.spec, hit),
                    recombine,
                    self.spec.lrfu_lambda,
                )
                if groups:
                    # Each merged row replaces its members under the keeper's id: delete every
                    # member, insert the merged rows (the same end state as an upsert of the
                    # keepers plus deletes, which is how a resident-index merge is flushed).
                    merged = merged_rows(groups)
                    members = np.concatenate([g.ids for g in groups])
                    self._backend.delete_rows(conn, self.spec, members)
                    self._backend.insert_rows(conn, self.spec, merged)
                    counters["recombinations"] = len(groups)
                    changed |= np.isin(result.ids, members).any(1)
                    # A merged key is a weighted mean, so it can come nearer to a query that hit
                    # none of its members than that query's k-th hit: search those again too.
                    kth = result.distances[:, -1].astype(np.float64)
                    closer = pairwise_distances(self.spec.metric, q, merged.keys) <= kth[:, None]
                    changed |= closer.any(1)
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
                again = self._knn(conn, q[changed], k)
                for field in ("ids", "distances", "keys", "values"):
                    getattr(result, field)[changed] = getattr(again, field)
            catalog.set_state(conn, self.spec.id, clock=now, next_id=next_id, add_counters=counters)
            result.changes = {
                name: counters.get(name, 0) for name in ("recombinations", "novel_inserts")
            }
            return result

    def _knn(self, conn, queries: np.ndarray, k: int) -> SearchResult:
        """The backend's kNN. Its distances are always finite: keys and queries are bounded by
        :data:`memstore.validation.MAX_NORM` on the way in, so no distance can overflow float32."""
        return self._backend.knn(conn, self.spec, queries, k)

    def recombine(self, queries, threshold: float, k: int = 16) -> int:
        """Merge near-duplicates around ``queries`` without counting hits: each query's k nearest
        rows within ``threshold`` become one row (:mod:`memstore.recombine`), which keeps the id of
        the member nearest to the query.
        Returns how many merges were made."""
        threshold = check_threshold(threshold, "threshold", self.spec.metric)
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
        if capacity is not None:
            check_int64(capacity, "capacity")
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
    ) -> None:
        """One transaction: delete ``deletes``, insert-or-replace ``upserts`` (every field kept as
        given), set the clock, add ``counters`` (keys from inserts, novel_inserts, recombinations,
        evictions, searches) to the stats. The flush path of memstore_torch."""
        block = None if upserts is None else self._check_block(upserts)
        gone = None if deletes is None else as_ids(deletes, "deletes", allow_empty=True)
        if block is not None and gone is not None and np.isin(block.ids, gone).any():
            raise InvalidInputError("apply_changes: some ids are both upserted and deleted")
        if clock is not None:
            clock = check_count(clock, "clock")
        for name, amount in (counters or {}).items():
            if name not in COUNTERS:
                raise InvalidInputError(
                    f"unknown counter {name!r}: use one of {', '.join(COUNTERS)}"
                )
            if isinstance(amount, bool) or int(amount) != amount or amount < 0:
                raise InvalidInputError(f"counter {name!r} must be a non-negative integer")
            check_int64(int(amount), f"counters[{name!r}]")
        if block is not None and len(block) and int(block.ids.max()) >= INT64_MAX:
            raise InvalidInputError(f"upserts.ids must be below 2**63 - 1 ({INT64_MAX})")
        with self.store.write() as conn:
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
        self.store.maintenance(self._backend.compact, self.spec)

    def peek(self, n: int = 5) -> list[dict]:
        """The ``n`` rows next in line for eviction, lowest LRFU order key first (for inspect)."""
        n = check_count(n, "n")
        with self.store.read() as conn:
            now = catalog.state(conn, self.spec.id)["clock"]
            ids = self._backend.lowest_scored(conn, self.spec, now, limit=n)
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


def _is_single_row(array: object) -> bool:
    """Whether ``array`` is one vector (1-D) rather than a batch: :meth:`Collection.search` then
    answers it as a batch of one."""
    if not isinstance(array, (np.ndarray, list, tuple)):
        return False
    try:
        return np.ndim(array) == 1
    except ValueError:  # a ragged list: as_matrix says what is wrong with it
        return False
