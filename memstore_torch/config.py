"""The options of each memory layer, as one dataclass per layer (nanoGPT / Hugging Face style).

A layer is built from its config (``FeaturalMemory(FeaturalConfig(d_model=768, k=64), ...)``, or
``FeaturalMemory(768, k=64, ...)``, which builds the same config), keeps it as ``layer.config``,
and saves it as ``dataclasses.asdict(layer.config)``. So an option is declared, defaulted and
validated in one place — its field here — and read where it is used (``layer.config.<name>``;
:class:`~memstore_torch.memory_layer.MemoryLayer` also mirrors every field as ``layer.<name>``).

Configs are frozen: they are validated once, on construction, and stay valid. To change an option
that a built layer reads at every forward (``LIVE``: ``k``, ``novel``, ...) assign it on the layer
(``layer.novel = None``), which swaps in a validated copy; the others fix the layer's shapes and
buffers, so they need a new layer (``FeaturalMemory(dataclasses.replace(layer.config, ...))``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from memstore.errors import InvalidInputError, bad_parameter
from memstore.validation import check_lrfu_lambda, check_positive_int

#: What a featural layer may weight its top-k scores with (``gelu_new`` is GPT-2's name for
#: ``gelu_tanh``); see :func:`memstore_torch.functions.make_weight_fn`.
WEIGHTINGS = ("softmax", "gelu", "gelu_tanh", "gelu_new", "relu")


def _optional_positive_int(value: object, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_parameter(name, f"must be True or False, got {value!r}")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise bad_parameter(name, f"must be a number, got {value!r}")
    return float(value)


def _optional_threshold(value: object, name: str) -> float | None:
    """A distance threshold (any finite number; None switches the feature off)."""
    if value is None:
        return None
    number = _number(value, name)
    if not math.isfinite(number):
        raise bad_parameter(name, f"must be finite or None, got {value!r}")
    return number


class _LayerConfig:
    """What both layer configs share: normalising fields in place (they are frozen) and loading a
    saved dict."""

    #: Options a built layer reads at every forward, so they may change on a built layer.
    LIVE: ClassVar[frozenset[str]] = frozenset()

    def _set(self, **normalised: Any) -> None:
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]):
        """The config saved as ``asdict(config)`` (keys other than its fields are an error)."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(saved) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown {cls.__name__} option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(names))}"
            )
        return cls(**saved)


@dataclass(frozen=True)
class FeaturalConfig(_LayerConfig):
    """Options of :class:`~memstore_torch.FeaturalMemory` (see docs/layers.md)."""

    d_model: int
    #: Rows the table holds at most (the collection's capacity).
    n_rows: int = 1024
    #: Rows read per token and head.
    k: int = 32
    heads: int = 1
    #: Width of ``W_q x`` (None: no query projection, q = x; ``from_mlp`` uses that).
    key_dim: int | None = None
    #: Width of the rows' values (None: d_model and no output projection).
    value_dim: int | None = None
    weighting: str = "softmax"
    temperature: float = 1.0
    #: Rows are Parameters an optimizer trains (else read-only).
    trainable_rows: bool = True
    #: ip distance beyond which a training query becomes a new row (None: never).
    novel: float | None = None
    #: ip distance within which rows a query hits are merged (None: never).
    recombine: float | None = None
    lrfu_lambda: float = 0.5
    dropout: float = 0.0
    #: Touch / insert / recombine in eval mode too.
    update_in_eval: bool = False

    LIVE: ClassVar[frozenset[str]] = frozenset({"k", "novel", "recombine", "update_in_eval"})

    def __post_init__(self) -> None:
        for name in ("d_model", "n_rows", "k", "heads"):
            check_positive_int(getattr(self, name), name)
        key_dim = _optional_positive_int(self.key_dim, "key_dim")
        query_dim = self.d_model if key_dim is None else key_dim
        if query_dim % self.heads:
            raise bad_parameter(
                "heads", f"must divide the query width {query_dim}, got heads={self.heads}"
            )
        if self.weighting not in WEIGHTINGS:
            raise bad_parameter(
                "weighting", f"must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        temperature = _number(self.temperature, "temperature")
        if not (0 < temperature < math.inf):
            raise bad_parameter("temperature", f"must be > 0 and finite, got {self.temperature}")
        dropout = _number(self.dropout, "dropout")
        if not 0.0 <= dropout <= 1.0:
            raise bad_parameter("dropout", f"must be in [0, 1], got {self.dropout}")
        self._set(
            d_model=int(self.d_model),
            n_rows=int(self.n_rows),
            k=int(self.k),
            heads=int(self.heads),
            key_dim=key_dim,
            value_dim=_optional_positive_int(self.value_dim, "value_dim"),
            temperature=temperature,
            trainable_rows=_flag(self.trainable_rows, "trainable_rows"),
            novel=_optional_threshold(self.novel, "novel"),
            recombine=_optional_threshold(self.recombine, "recombine"),
            lrfu_lambda=check_lrfu_lambda(self.lrfu_lambda),
            dropout=dropout,
            update_in_eval=_flag(self.update_in_eval, "update_in_eval"),
        )

    @property
    def head_dim(self) -> int:
        """Query width per head (a row's key is this plus one bias coordinate)."""
        return (self.d_model if self.key_dim is None else self.key_dim) // self.heads

    @property
    def row_value_dim(self) -> int:
        """Width of a row's value."""
        return self.d_model if self.value_dim is None else self.value_dim


@dataclass(frozen=True)
class AssociativeConfig(_LayerConfig):
    """Options of :class:`~memstore_torch.AssociativeMemory` (see docs/layers.md).

    ``key_dim`` None becomes ``d_model // heads`` and ``value_dim`` None becomes ``key_dim`` on
    construction, so a saved config holds the widths the layer was built with.
    """

    d_model: int
    heads: int = 4
    #: Rows (stored or inserted this step) attended to per query and head.
    k: int = 32
    #: Per-head key width (None: d_model // heads).
    key_dim: int | None = None
    #: Per-head value width (None: key_dim).
    value_dim: int | None = None
    #: Rows the table holds at most (LRFU eviction beyond).
    capacity: int = 65536
    #: Cosine distance beyond which a key/value pair is inserted (None: never insert).
    novel: float | None = 0.05
    #: ip distance within which rows a query hits are merged (None: never).
    recombine: float | None = None
    trainable_rows: bool = True
    lrfu_lambda: float = 0.5
    #: Touch / insert / recombine in eval mode too.
    update_in_eval: bool = False
    #: Straight-through rule dQuery = dKeyReturned.
    st_query: bool = True
    #: Straight-through rules dKeyInserted = dKeyReturned, dValueInserted = dValueReturned.
    st_insert: bool = True

    LIVE: ClassVar[frozenset[str]] = frozenset(
        {"k", "novel", "recombine", "update_in_eval", "st_query", "st_insert"}
    )

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "k", "capacity"):
            check_positive_int(getattr(self, name), name)
        key_dim = _optional_positive_int(self.key_dim, "key_dim")
        if key_dim is None:
            if self.d_model % self.heads:
                raise bad_parameter(
                    "heads",
                    f"must divide d_model {self.d_model} when key_dim is None, "
                    f"got heads={self.heads}",
                )
            key_dim = self.d_model // self.heads
        value_dim = _optional_positive_int(self.value_dim, "value_dim")
        self._set(
            d_model=int(self.d_model),
            heads=int(self.heads),
            k=int(self.k),
            key_dim=int(key_dim),
            value_dim=key_dim if value_dim is None else value_dim,
            capacity=int(self.capacity),
            novel=_optional_threshold(self.novel, "novel"),
            recombine=_optional_threshold(self.recombine, "recombine"),
            trainable_rows=_flag(self.trainable_rows, "trainable_rows"),
            lrfu_lambda=check_lrfu_lambda(self.lrfu_lambda),
            update_in_eval=_flag(self.update_in_eval, "update_in_eval"),
            st_query=_flag(self.st_query, "st_query"),
            st_insert=_flag(self.st_insert, "st_insert"),
        )


#: How a product-key memory normalises its queries (see :class:`ProductKeyConfig`).
QUERY_NORMS = ("layernorm", "batchnorm", "none")


@dataclass(frozen=True)
class ProductKeyConfig(_LayerConfig):
    """Options of :class:`~memstore_torch.ProductKeyMemory` (see docs/layers.md, Large memory).

    The table has ``n_keys ** 2`` value rows; each head scores ``2 * n_keys`` sub-keys per token
    and reads its ``k`` best rows.
    """

    d_model: int
    #: Sub-keys per half and head: the table holds n_keys ** 2 rows.
    n_keys: int = 1024
    heads: int = 4
    #: Rows read per token and head.
    k: int = 32
    #: Query width per head, split into two halves of key_dim // 2 (even).
    key_dim: int = 256
    #: Width of a value row (None: d_model, and no output projection).
    value_dim: int | None = None
    #: "layernorm" (per head, default), "batchnorm" (Lample et al.) or "none".
    query_norm: str = "layernorm"
    #: Standard deviation of the initial values; 0 (default): every row starts at zero, so the
    #: layer adds nothing to a model until it is trained.
    value_init_std: float = 0.0
    #: Values are a Parameter trained by sparse gradients (else read-only).
    trainable_rows: bool = True
    lrfu_lambda: float = 0.5
    #: Touch rows (LRFU) in eval mode too.
    update_in_eval: bool = False

    LIVE: ClassVar[frozenset[str]] = frozenset({"k", "update_in_eval"})

    def __post_init__(self) -> None:
        for name in ("d_model", "n_keys", "heads", "k", "key_dim"):
            check_positive_int(getattr(self, name), name)
        if self.key_dim % 2:
            raise bad_parameter("key_dim", f"must be even (two halves), got {self.key_dim}")
        if self.k > self.n_keys**2:
            raise bad_parameter(
                "k", f"must be at most n_keys ** 2 = {self.n_keys**2}, got {self.k}"
            )
        if self.query_norm not in QUERY_NORMS:
            raise bad_parameter(
                "query_norm",
                f"must be one of {', '.join(QUERY_NORMS)}, got {self.query_norm!r}",
            )
        std = _number(self.value_init_std, "value_init_std")
        if not 0.0 <= std < math.inf:
            raise bad_parameter("value_init_std", f"must be >= 0 and finite, got {std}")
        self._set(
            d_model=int(self.d_model),
            n_keys=int(self.n_keys),
            heads=int(self.heads),
            k=int(self.k),
            key_dim=int(self.key_dim),
            value_dim=_optional_positive_int(self.value_dim, "value_dim"),
            value_init_std=std,
            trainable_rows=_flag(self.trainable_rows, "trainable_rows"),
            lrfu_lambda=check_lrfu_lambda(self.lrfu_lambda),
            update_in_eval=_flag(self.update_in_eval, "update_in_eval"),
        )

    @property
    def n_rows(self) -> int:
        """Rows of the value table: ``n_keys ** 2``."""
        return self.n_keys**2

    @property
    def row_value_dim(self) -> int:
        """Width of a row's value."""
        return self.d_model if self.value_dim is None else self.value_dim
