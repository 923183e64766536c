"""Input checks shared by every backend: each bad input gets an error that names the problem.

Everything is checked *before* any SQL runs, so a rejected call leaves the database untouched.
Collection options are checked by :class:`memstore.types.CollectionOptions` itself.
"""

from __future__ import annotations

import math
import re

import numpy as np

from memstore.errors import (
    DimensionMismatchError,
    InvalidInputError,
    InvalidNameError,
    bad_parameter,
)

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")

#: The largest integer a stored count, tick, capacity or id may take (a signed 64-bit column).
INT64_MAX = 2**63 - 1
#: The largest ``k`` a search accepts. A result is (m, k)-shaped and padded (ids -1, distances
#: +inf), so k sizes its arrays whatever the number of rows; an unbounded k would only allocate
#: padding (k = 10**9 needs gigabytes per query). 2**20 neighbours per query is far beyond any
#: kNN use and still a bounded allocation.
MAX_K = 2**20
#: The largest key_dim / value_dim a collection accepts (a vector of 256 KiB). Far beyond any
#: embedding width, and it keeps one row's blob, and a bulk statement's (memstore.backends.sqlite
#: sizes its batches by it), well inside SQLite's 1 GB value limit: a value_dim of 10**9 would be a
#: 4 GB blob per row. Backends add their own, lower, index limits (sqlite-vec 8192, pgvector 2000).
MAX_DIM = 2**16
#: The largest Euclidean norm a key or query may have: 2**62 (about 4.6e18). Then every distance
#: between two such vectors, and every float32 intermediate that sqlite-vec, pgvector or torch
#: computes on the way (|q - k|^2 <= (|q| + |k|)^2 <= 2**126, |q . k| <= 2**124, the ip index's
#: augmented coordinate), stays below float32's maximum (about 2**128): a finite input can never
#: produce an inf distance that would look like padding, or a -inf one. Checked on the way in
#: (insert, update, upserts and queries), so nothing overflowing is ever stored or searched.
MAX_NORM = 2.0**62


def check_name(name: object) -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid collection name {name!r}: it must match [A-Za-z_][A-Za-z0-9_.-]{{0,63}}"
        )
    return name


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int if it is a positive integer (bools are not), else an error naming
    the parameter ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise bad_parameter(name, f"must be a positive integer, got {value!r}")
    return check_int64(value, name)


def check_int64(value: int, what: str) -> int:
    """``value`` if it fits the database's signed 64-bit integers, else a clear error (not the
    ``OverflowError`` the driver would raise while binding it)."""
    if value > INT64_MAX:
        raise bad_parameter(what, f"must be at most 2**63 - 1 ({INT64_MAX}), got {value!r}")
    return int(value)


def check_count(value: object, what: str) -> int:
    """A non-negative integer that fits 64 bits (ticks, clocks, counters, row counts)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or value != value  # NaN
        or int(value) != value
        or value < 0
    ):
        raise bad_parameter(what, f"must be a non-negative integer, got {value!r}")
    return check_int64(int(value), what)


def check_dim(value: object, name: str) -> int:
    """A positive vector width of at most :data:`MAX_DIM` (``key_dim``, ``value_dim``)."""
    dim = check_positive_int(value, name)
    if dim > MAX_DIM:
        raise bad_parameter(
            name, f"must be at most {MAX_DIM} (2**16, memstore.validation.MAX_DIM), got {dim}"
        )
    return dim


def check_threshold(value: object, name: str, metric: str) -> float:
    """A recombination / novelty distance threshold: a finite number, and >= 0 for ``l2`` and
    ``cosine`` (whose distances are never negative, so a negative threshold could only be a
    mistake: it would merge nothing, or call every query novel). ``ip`` distances ``-(q . k)`` take
    any sign, so any finite threshold is meaningful there. NaN compares false with everything and
    would silently merge nothing; inf would merge every hit: both are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad_parameter(name, f"must be a finite number (a distance), got {value!r}")
    threshold = float(value)
    if not math.isfinite(threshold):
        raise bad_parameter(name, f"must be a finite number (a distance), got {threshold!r}")
    if metric != "ip" and threshold < 0:
        raise bad_parameter(
            name, f"must be >= 0: {metric} distances are never negative, got {threshold!r}"
        )
    return threshold


def check_norms(arr: np.ndarray, what: str) -> None:
    """Refuse rows of a float32 (n, d) array whose norm exceeds :data:`MAX_NORM` (see there)."""
    if arr.size == 0:
        return
    # Fast path: max|x| * sqrt(d) bounds every row's norm; exact float64 norms only if it fails.
    if float(np.abs(arr).max()) * math.sqrt(arr.shape[1]) <= MAX_NORM:
        return
    norms = np.sqrt(np.einsum("ij,ij->i", arr.astype(np.float64), arr.astype(np.float64)))
    too_long = norms > MAX_NORM
    if too_long.any():
        row = int(np.argmax(too_long))
        raise InvalidInputError(
            f"{what} row {row} has norm {norms[row]:.3g}, above the limit 2**62 (4.6e+18, "
            "memstore.validation.MAX_NORM) that keeps every distance finite in float32; "
            "scale the vectors down"
        )


def check_lrfu_lambda(value: object, name: str = "lrfu_lambda") -> float:
    """An LRFU lambda as a float in [0, 1] (0 = LFU, 1 orders like LRU)."""
    try:
        lam = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_parameter(name, f"must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= lam <= 1.0) or math.isnan(lam):
        raise bad_parameter(name, f"must be in [0, 1], got {value!r}")
    return lam


def as_matrix(array: object, dim: int, what: str, *, allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 (n, dim) copy of ``array``, or a clear error.

    Accepts any floating dtype (float64 is narrowed; values that overflow float32 are rejected as
    inf). Rejects integer/bool/object arrays, non-2-D arrays, empty batches, NaN and inf.
    """
    arr = np.asarray(array)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"{what} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (rows, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise InvalidInputError(f"{what} is an empty batch (0 rows)")
    if arr.shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} have dimension {arr.shape[1]} but the collection expects {dim}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0][0])
        raise InvalidInputError(f"{what} contain NaN or inf (first at row {bad})")
    return out


def as_ids(
    ids: object, what: str = "ids", *, unique: bool = False, allow_empty: bool = False
) -> np.ndarray:
    """A 1-D int64 copy of ``ids`` (ints >= 0), or a clear error."""
    largest = _largest_python_int(ids)
    if largest is not None and largest > INT64_MAX:  # numpy would make it a float or an object
        raise bad_parameter(what, f"must be at most 2**63 - 1 ({INT64_MAX}), got {largest}")
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInputError(f"{what} must be a 1-D array of integers, got shape {arr.shape}")
    if arr.size == 0:
        if not allow_empty:
            raise InvalidInputError(f"{what} is an empty batch (0 ids)")
        return np.empty(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > INT64_MAX:  # would wrap round to a negative id
        raise bad_parameter(what, f"must be at most 2**63 - 1 ({INT64_MAX}), got {int(arr.max())}")
    out = arr.astype(np.int64)
    if (out < 0).any():
        raise InvalidInputError(f"{what} must be >= 0, got {int(out.min())}")
    if unique and np.unique(out).size != out.size:
        raise InvalidInputError(f"{what} contain duplicates")
    return out


def _largest_python_int(ids: object) -> int | None:
    """The largest Python int in a flat list, tuple or object array (None if there is none)."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind != "O" or ids.ndim != 1:
            return None
    elif isinstance(ids, int) and not isinstance(ids, bool):
        return ids
    elif not isinstance(ids, (list, tuple)):
        return None
    ints = [x for x in ids if isinstance(x, int) and not isinstance(x, bool)]
    return max(ints) if ints else None


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise bad_parameter("k", f"must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise bad_parameter(
            "k", f"must be at most {MAX_K} (2**20, memstore.validation.MAX_K), got {k!r}"
        )
    return int(k)


def check_nonzero_rows(arr: np.ndarray, what: str) -> None:
    """Cosine distance is undefined for a zero vector."""
    zero = ~(arr != 0).any(axis=1)  # not a norm: that overflows float32 for huge finite rows
    if zero.any():
        raise InvalidInputError(
            f"{what} contain a zero vector (row {int(np.argmax(zero))}); "
            "cosine distance is undefined for it"
        )
