"""PostgreSQL binary wire formats for pgvector rows, built and parsed with numpy, not per row.

PostgreSQL's binary formats are big-endian and, for our rows, fixed-size: every row of a collection
has the same key and value dimensions and no NULLs. So a whole batch is one numpy structured array:
a ``COPY ... (FORMAT BINARY)`` stream in either direction (bulk insert, bulk export) or a binary
array parameter (a batch of ids or query vectors). Python never loops over rows or floats.

pgvector's binary ``vector``: uint16 dim, uint16 unused (0), then dim float32 values.
"""

from __future__ import annotations

import numpy as np

from memstore.types import RowBlock

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = COPY_SIGNATURE + np.array([0, 0], dtype=">i4").tobytes()  # flags, extension length
_COPY_TRAILER = np.array([-1], dtype=">i2").tobytes()

#: Column order of a collection's rows table in COPY streams (pg_sql.ROW_COLUMNS uses it too).
ROW_FIELDS = ("id", "key", "value", "crf", "last_tick", "hits", "created_tick")
_SCALAR_FORMATS = {
    "id": ">i8",
    "crf": ">f8",
    "last_tick": ">i8",
    "hits": ">i8",
    "created_tick": ">i8",
}

# Built-in type oids (fixed in PostgreSQL's catalog, identical on every server).
INT8_OID, FLOAT4_OID, FLOAT8_OID = 20, 700, 701


class CodecError(ValueError):
    """A binary stream from the server does not have the layout the collection implies."""


def vector_bytes_size(dim: int) -> int:
    return 4 + 4 * dim


def row_dtype(key_dim: int, value_dim: int) -> np.dtype:
    """One COPY tuple of a rows table: field count, then (length, data) per column in ROW_FIELDS."""
    layout: list[tuple] = [("nfields", ">i2")]
    for name in ROW_FIELDS:
        layout.append((f"{name}_len", ">i4"))
        if name in ("key", "value"):
            dim = key_dim if name == "key" else value_dim
            layout += [(f"{name}_dim", ">u2"), (f"{name}_unused", ">u2"), (name, ">f4", (dim,))]
        else:
            layout.append((name, _SCALAR_FORMATS[name]))
    return np.dtype(layout)


def encode_copy_rows(rows: RowBlock) -> bytes:
    """A complete ``COPY rows_N (ROW_FIELDS) FROM STDIN (FORMAT BINARY)`` stream."""
    dk, dv = rows.keys.shape[1], rows.values.shape[1]
    out = np.empty(len(rows), dtype=row_dtype(dk, dv))
    out["nfields"] = len(ROW_FIELDS)
    for name in _SCALAR_FORMATS:
        out[f"{name}_len"] = 8
        out[name] = getattr(rows, "ids" if name == "id" else name)
    for name, dim in (("key", dk), ("value", dv)):
        out[f"{name}_len"] = vector_bytes_size(dim)
        out[f"{name}_dim"] = dim
        out[f"{name}_unused"] = 0
        out[name] = getattr(rows, name + "s")
    return _COPY_HEADER + out.tobytes() + _COPY_TRAILER


def decode_copy_rows(stream: bytes, key_dim: int, value_dim: int) -> RowBlock:
    """Parse ``COPY (SELECT ROW_FIELDS ...) TO STDOUT (FORMAT BINARY)`` output into a RowBlock."""
    if not stream.startswith(COPY_SIGNATURE):
        raise CodecError("not a PostgreSQL binary COPY stream")
    extension_len = int(np.frombuffer(stream, ">i4", count=1, offset=len(COPY_SIGNATURE) + 4)[0])
    start = len(COPY_SIGNATURE) + 8 + extension_len
    if stream[-2:] != _COPY_TRAILER:
        raise CodecError("binary COPY stream has no trailer (truncated?)")
    body = memoryview(stream)[start:-2]
    dtype = row_dtype(key_dim, value_dim)
    if len(body) % dtype.itemsize:
        raise CodecError(
            f"binary COPY body of {len(body)} bytes is not a whole number of "
            f"{dtype.itemsize}-byte rows (key_dim {key_dim}, value_dim {value_dim}, no NULLs)"
        )
    raw = np.frombuffer(body, dtype=dtype)
    if len(raw) and (
        np.any(raw["nfields"] != len(ROW_FIELDS))
        or np.any(raw["key_dim"] != key_dim)
        or np.any(raw["value_dim"] != value_dim)
    ):
        raise CodecError("stored rows do not match the collection's dimensions")
    return RowBlock(
        ids=raw["id"].astype(np.int64),
        keys=raw["key"].astype(np.float32),
        values=raw["value"].astype(np.float32),
        crf=raw["crf"].astype(np.float64),
        last_tick=raw["last_tick"].astype(np.int64),
        hits=raw["hits"].astype(np.int64),
        created_tick=raw["created_tick"].astype(np.int64),
    )


def encode_array(values: np.ndarray, element_oid: int) -> bytes:
    """A flat numpy array as PostgreSQL's binary one-dimensional array of int8/float4/float8.

    Layout: ndim, has-null flag, element oid, length, lower bound; then per element its byte
    length and big-endian bytes.
    """
    fmt = {INT8_OID: ">i8", FLOAT4_OID: ">f4", FLOAT8_OID: ">f8"}[element_oid]
    flat = np.asarray(values).reshape(-1)
    header = np.array([1, 0, element_oid, flat.size, 1], dtype=">i4").tobytes()
    elements = np.empty(flat.size, dtype=[("length", ">i4"), ("v", fmt)])
    elements["length"] = np.dtype(fmt).itemsize
    elements["v"] = flat
    return header + elements.tobytes()


def decode_vectors(cells: list[bytes] | tuple[bytes, ...], dim: int) -> np.ndarray:
    """Binary ``vector`` result cells (all of dimension ``dim``) -> (n, dim) float32."""
    if len(cells) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    dtype = np.dtype([("dim", ">u2"), ("unused", ">u2"), ("v", ">f4", (dim,))])
    joined = b"".join(cells)
    if len(joined) != dtype.itemsize * len(cells):
        raise CodecError(f"stored vectors do not have dimension {dim}")
    raw = np.frombuffer(joined, dtype=dtype)
    if np.any(raw["dim"] != dim):
        raise CodecError(f"stored vectors do not have dimension {dim}")
    return raw["v"].astype(np.float32)
