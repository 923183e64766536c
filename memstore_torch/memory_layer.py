"""What both memory layers share: trainable rows that live in a resident index, not in state_dict.

A layer's memory rows are ``nn.Parameter`` views of a bounded :class:`ResidentIndex`'s storage, so
any optimizer trains them (their gradient is exact and nonzero only on rows some query selected),
and the index's in-place inserts, evictions and recombinations are seen by the layer at once.
The rows are *not* in ``state_dict``: the database is their home. ``flush()`` writes what changed --
rows an optimizer moved (found by comparing with a snapshot of the last flush), inserted and
touched rows, deletions -- to the bound collection in one transaction.

Caveat of the bounded table: a delete moves the last row into the hole, and optimizer moments
(Adam's) stay with the slot, so a moved row inherits the previous occupant's moments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from memstore.errors import CollectionExistsError, InvalidInputError
from memstore.types import CollectionOptions

from .resident import ResidentHits, ResidentIndex
from .rows_source import CollectionStore, LayerCollection

#: The optimizer(s) a layer's upkeep resets row state in: one, several, or None (no state).
OptimizerArg = torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None


@dataclass
class MemoryRead:
    """What one forward of a memory layer read, recorded when ``layer.record_reads`` is True.

    It is the forward's own selection (the ids its top-k picked and the weights it gave them), not
    a re-computation that could differ: ``memstore trace`` shows it. Shapes, for an input whose
    leading shape is ``lead`` (``(B, T)`` in a language model) flattened to ``N`` positions:

    * ``ids`` (N, heads, k) int64: the row ids each position and head read (-1: no stored row,
      e.g. a pair inserted during this very forward, or padding);
    * ``weights`` (N, heads, k): the weight each of those rows' values got in the output
      (the activation of its score, or its attention weight);
    * ``scores`` (N, heads, k), where the layer has them apart from the weights (a product-key
      memory: ``q . key`` before the softmax), else None.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    lead: tuple[int, ...]
    scores: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, heads: int, lead: tuple[int, ...], device=None) -> MemoryRead:
        """The read of a layer that holds no rows: nothing selected at any position."""
        return cls(
            torch.zeros((n, heads, 0), dtype=torch.int64, device=device),
            torch.zeros((n, heads, 0), device=device),
            tuple(lead),
        )


class MemoryLayer(nn.Module):
    """Base of every memory layer: owns ``self.index``, the two row Parameters and ``self.config``.

    Whole-model code (:mod:`memstore_torch.model_memory`) finds memory layers by this type, so a
    subclass placed anywhere in any model is flushed, checkpointed and counted.

    A subclass names its frozen config dataclass in ``config_class``; each field of it is then
    readable as ``layer.<field>`` too (settable when the config lists it in ``LIVE``), so adding an
    option to the config is all it takes to have it everywhere.
    """

    #: Row Parameters kept out of ``state_dict`` (the database is their home).
    ROW_PARAMETER_NAMES = ("memory_keys", "memory_values")

    #: The layer's config dataclass (see :mod:`memstore_torch.config`).
    config_class: ClassVar[type]
    #: Config fields not mirrored as ``layer.<field>`` because the name is taken (a submodule).
    unmirrored_options: ClassVar[tuple[str, ...]] = ()

    index: ResidentIndex
    config: Any
    #: When True, each forward leaves what it read in :attr:`last_read` (a :class:`MemoryRead`);
    #: off by default because it keeps a copy of the selection. See
    #: :func:`memstore_torch.model_memory.recording_reads`.
    record_reads: bool = False
    last_read: MemoryRead | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        if config_class is None:
            return
        for f in dataclasses.fields(config_class):
            if f.name in cls.unmirrored_options or hasattr(cls, f.name):
                continue
            setattr(cls, f.name, _ConfigOption(f.name, f.name in config_class.LIVE))

    @classmethod
    def make_config(cls, config: Any, options: dict[str, Any]) -> Any:
        """The layer's config from a config object, or a ``d_model`` (or nothing), plus keyword
        options overriding / filling its fields (validated by the config class)."""
        config_class = cls.config_class
        if isinstance(config, config_class):
            return dataclasses.replace(config, **options) if options else config
        if dataclasses.is_dataclass(config) or isinstance(config, Mapping):
            raise TypeError(
                f"{cls.__name__} takes a {config_class.__name__} or d_model, "
                f"got {type(config).__name__} (a saved dict goes to from_config)"
            )
        return config_class(**options) if config is None else config_class(config, **options)

    def extra_config(self) -> dict[str, Any]:
        """What a saved model records to rebuild this layer (:meth:`from_config`): the config's
        fields, the layer ``type`` and its ``collection``."""
        return {
            "type": type(self).__name__,
            **dataclasses.asdict(self.config),
            "collection": self.collection_name,
        }

    @classmethod
    def split_saved_config(cls, saved: Mapping[str, Any]) -> tuple[Any, str | None]:
        """``(config, collection name)`` from a dict :meth:`extra_config` wrote (also the one
        earlier versions wrote: the same keys)."""
        saved = dict(saved)
        kind = saved.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise InvalidInputError(f"config is for {kind}, not {cls.__name__}")
        collection = saved.pop("collection", None)
        return cls.config_class.from_dict(saved), collection

    @classmethod
    def from_config(cls, saved: Mapping[str, Any], store: CollectionStore) -> MemoryLayer:
        """Rebuild the layer that :meth:`extra_config` described, bound to its collection in
        ``store`` with the rows loaded from there."""
        config, collection = cls.split_saved_config(saved)
        return cls(config, store=store, collection=collection)

    def collection_options(self) -> CollectionOptions:
        """The options of the collection this layer's rows live in."""
        raise NotImplementedError

    def _init_memory(
        self,
        index: ResidentIndex,
        store: CollectionStore | None = None,
        collection: str | None = None,
    ) -> None:
        self.index = index
        self.collection_name = collection
        self._store = store
        self._collection: LayerCollection | None = None
        # Row-moving changes (novel inserts, recombinations) decided in a forward are applied at
        # the next forward or flush: the backward pass still needs the rows as they were read.
        self._pending: list[tuple[str, tuple]] = []
        self._adopt_storage()
        self._register_state_dict_hook(_drop_memory_rows)
        self.register_load_state_dict_post_hook(_forgive_missing_memory_rows)

    def _adopt_storage(self) -> None:
        """Expose the index storage as Parameters (sharing memory, no copy)."""
        keys = nn.Parameter(self.index.key_storage, requires_grad=self.trainable_rows)
        values = nn.Parameter(self.index.value_storage, requires_grad=self.trainable_rows)
        self.index.key_storage, self.index.value_storage = keys, values
        self.memory_keys, self.memory_values = keys, values
        self._snapshot()

    def _snapshot(self) -> None:
        """Remember row contents as of the last flush, to find rows an optimizer changed."""
        n = self.index.n
        self._flushed_keys = self.index.keys.detach().clone() if self.trainable_rows else None
        self._flushed_values = self.index.values.detach().clone() if self.trainable_rows else None
        self._flushed_n = n
        self._flushed_version = self.index.storage_version

    def _mark_optimizer_changes(self) -> None:
        if not self.trainable_rows or self._flushed_keys is None:
            return
        n = min(self.index.n, self._flushed_n)
        if n == 0:
            return
        changed = (self.index.keys[:n] != self._flushed_keys[:n]).any(1) | (
            self.index.values[:n] != self._flushed_values[:n]
        ).any(1)
        # Rows moved by deletes since the snapshot are already dirty (delete moves dirty flags).
        slots = changed.nonzero().reshape(-1)
        if slots.numel():
            self.index.mark_rows_changed(slots)

    # -------------------------------------------------------------- store binding
    @property
    def collection(self) -> LayerCollection | None:
        """The bound ``memstore.Collection`` (None when the layer is not bound to a store)."""
        return self._collection

    def _collection_for(self, store: CollectionStore, name: str) -> LayerCollection:
        """The layer's collection in ``store``: made with :meth:`collection_options` when missing.

        An existing one must have the layer's key/value widths and metric (else
        ``DimensionMismatchError`` / ``InvalidInputError``); its capacity and LRFU lambda are
        kept (``from_mlp`` may refill a collection first made for another size).
        """
        options = self.collection_options()
        if not store.has_collection(name):
            try:
                return store.create_collection(name, options)
            except CollectionExistsError:
                pass  # another process made it meanwhile: check it as any existing one
        return store.get_or_create_collection(
            name, key_dim=options.key_dim, value_dim=options.value_dim, metric=options.metric
        )

    def _bind(self) -> None:
        """Bind to ``self._store``/``self.collection_name``; load rows if the collection has any.

        Returns with ``self._loaded`` True when rows came from the store.
        """
        self._loaded = False
        if self._store is None:
            return
        if not self.collection_name:
            raise InvalidInputError("a memory layer bound to a store needs a collection name")
        coll = self._collection_for(self._store, self.collection_name)
        self._collection = coll
        if coll.max_id() is not None:  # not len(): counting a million rows reads them all
            self.index.load_collection(coll)
            self._snapshot()
            self._loaded = True

    def _queue_insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._pending.append(("insert", (keys, values)))

    def _queue_recombine(
        self, queries: torch.Tensor, distances: torch.Tensor, ids: torch.Tensor
    ) -> None:
        self._pending.append(("recombine", (queries, distances, ids)))

    @torch.no_grad()
    def _apply_pending(self) -> None:
        """Apply queued novel inserts and recombinations, in the order they were decided."""
        while self._pending:
            kind, payload = self._pending.pop(0)
            if kind == "insert":
                keys, values = payload
                self.index.insert(keys, values)
                self.index.count("novel_inserts", keys.shape[0])
                continue
            queries, dist, ids = payload
            # Rows evicted or merged since the search are dropped from the hits (id -1 pads too).
            alive = torch.isin(ids, self.index.ids) & (ids >= 0)
            slots = torch.full_like(ids, -1)
            if bool(alive.any()):
                slots[alive] = self.index.slots_of(ids[alive])
            d = torch.where(alive, dist, torch.full_like(dist, math.inf))
            self.index.recombine(queries, ResidentHits(d, slots, ids), self.recombine)

    def flush(self) -> dict[str, int]:
        """Write every changed row to the bound collection in one transaction."""
        self._apply_pending()
        if self._collection is None:
            raise InvalidInputError(
                "this memory layer is not bound to a store; pass store= and collection="
            )
        self._mark_optimizer_changes()
        report = self.index.flush(self._collection)
        self._snapshot()
        return report

    def refresh_rows(self, ids=None) -> int:
        """Read rows ``ids`` (every row when None) of the bound collection again, after another
        process changed them in the database (an edit reaching a running server); returns the
        rows read or dropped from a cache. Between forwards only: the stored rows replace the
        layer's copy, changes not flushed included."""
        if self._collection is None:
            raise InvalidInputError(
                "this memory layer is not bound to a store; pass store= and collection="
            )
        count = self.index.refresh(self._collection, ids)
        self._snapshot()
        return count

    # -------------------------------------------------------------- parameter groups
    def memory_parameters(self) -> list[nn.Parameter]:
        """Row Parameters (empty when rows are read-only); give them their own learning rate."""
        if not self.trainable_rows:
            return []
        return [self.memory_keys, self.memory_values]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The row Parameters whose gradient is a sparse tensor (none here: the rows are read by
        a gather, whose gradient is dense). They need an optimizer that accepts sparse gradients
        (:class:`~memstore_torch.optim.RowwiseAdagrad`); ``split_parameters`` keeps them apart."""
        return []

    # -------------------------------------------------------------- upkeep between steps
    # A training loop calls these after an optimizer step (``optimizer``: the one holding the
    # rows, whose per-row state restarts for rows given new content). Layers whose novelty and
    # recombination happen inside their own forward (featural, associative) do nothing here.
    def recombine_last_read(self, threshold: float, optimizer: OptimizerArg = None) -> int:
        """Merge near-duplicate rows that :attr:`last_read` read together; returns the rows
        merged away (0 for a kind that recombines in its forward)."""
        return 0

    def insert_novel_last_read(self, share: float, optimizer: OptimizerArg = None) -> int:
        """Let the weakest-matched reads of :attr:`last_read` claim rows; returns the rows
        claimed (0 for a kind that inserts in its forward)."""
        return 0

    def reuse_cold_rows(self, fraction: float, optimizer: OptimizerArg = None) -> int:
        """Hand the coldest ``fraction`` of rows that hold content back as blank rows; returns
        the rows reused (0 for a kind whose table evicts on insert)."""
        return 0

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other trainable Parameter (projections, biases)."""
        memory = {id(p) for p in (self.memory_keys, self.memory_values)}
        return [p for p in self.parameters() if id(p) not in memory and p.requires_grad]

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.index.key_storage, self.index.value_storage = self.memory_keys, self.memory_values
        self.index.relocate(self.memory_keys.device)
        return result


def reset_optimizer_rows(optimizer: OptimizerArg, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Forget the per-row optimizer state of table ``rows`` of ``param`` (rows given new
    content), in every optimizer of ``optimizer`` (one, several or None) that holds ``param``.

    Such an optimizer must have ``reset_rows(param, rows)``
    (:class:`~memstore_torch.optim.RowwiseAdagrad`); one without it would carry the old
    content's state into the new one, and is refused."""
    if optimizer is None or rows.numel() == 0:
        return
    for opt in [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer:
        if not any(p is param for group in opt.param_groups for p in group["params"]):
            continue
        reset = getattr(opt, "reset_rows", None)
        if reset is None:
            raise InvalidInputError(
                f"{type(opt).__name__} cannot forget the state of reused memory rows (it has no "
                "reset_rows); train product-key values with RowwiseAdagrad"
            )
        reset(param, rows)


class _ConfigOption:
    """``layer.<name>`` reads ``layer.config.<name>``; assigning it (only for the config's ``LIVE``
    options) swaps in a validated copy of the config."""

    def __init__(self, name: str, live: bool) -> None:
        self.name, self.live = name, live
        self.__doc__ = f"``config.{name}`` of this layer."

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        return getattr(layer.config, self.name)

    def __set__(self, layer: Any, value: Any) -> None:
        if not self.live:
            raise AttributeError(
                f"{self.name} is fixed when a {type(layer).__name__} is built; build a new layer "
                f"from dataclasses.replace(layer.config, {self.name}=...)"
            )
        layer.config = dataclasses.replace(layer.config, **{self.name: value})


def _drop_memory_rows(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in MemoryLayer.ROW_PARAMETER_NAMES:
        state_dict.pop(prefix + name, None)


def _forgive_missing_memory_rows(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        if key.rsplit(".", 1)[-1] in MemoryLayer.ROW_PARAMETER_NAMES:
            missing.remove(key)
