"""The numpy-built binary formats round-trip exactly, and malformed streams are refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.backends.pg_codec import (
    FLOAT4_OID,
    INT8_OID,
    CodecError,
    decode_copy_rows,
    decode_vectors,
    encode_array,
    encode_copy_rows,
)
from memstore.types import RowBlock


def _block(n: int, dk: int, dv: int, seed: int) -> RowBlock:
    rng = np.random.default_rng(seed)
    return RowBlock(
        ids=rng.integers(0, 2**62, n).astype(np.int64),
        keys=rng.standard_normal((n, dk)).astype(np.float32),
        values=rng.standard_normal((n, dv)).astype(np.float32),
        crf=rng.uniform(1, 1e6, n),
        last_tick=rng.integers(0, 2**40, n).astype(np.int64),
        hits=rng.integers(0, 2**40, n).astype(np.int64),
        created_tick=rng.integers(0, 2**40, n).astype(np.int64),
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 20),
    dk=st.integers(1, 9),
    dv=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_copy_stream_round_trips_every_field_bit_exactly(n, dk, dv, seed):
    block = _block(n, dk, dv, seed)
    back = decode_copy_rows(encode_copy_rows(block), dk, dv)
    for name in ("ids", "keys", "values", "crf", "last_tick", "hits", "created_tick"):
        assert np.array_equal(getattr(back, name), getattr(block, name)), name
        assert getattr(back, name).dtype == getattr(block, name).dtype, name


def test_copy_stream_with_other_dimensions_is_refused():
    stream = encode_copy_rows(_block(3, 4, 2, 0))
    with pytest.raises(CodecError):
        decode_copy_rows(stream, 5, 2)
    with pytest.raises(CodecError):
        decode_copy_rows(stream[:-2], 4, 2)
    with pytest.raises(CodecError):
        decode_copy_rows(b"not a copy stream", 4, 2)


def test_binary_arrays_have_postgres_layout():
    payload = encode_array(np.array([1, -2], np.int64), INT8_OID)
    header = np.frombuffer(payload[:20], ">i4")
    assert header.tolist() == [1, 0, INT8_OID, 2, 1]
    assert np.frombuffer(payload[20:], [("len", ">i4"), ("v", ">i8")])["v"].tolist() == [1, -2]
    floats = encode_array(np.array([[0.5, 2.0]], np.float32), FLOAT4_OID)
    assert np.frombuffer(floats[20:], [("len", ">i4"), ("v", ">f4")])["v"].tolist() == [0.5, 2.0]


def test_vector_cells_decode_and_wrong_dimension_is_refused():
    cell = np.array([3, 0], ">u2").tobytes() + np.array([1.0, 2.0, 3.0], ">f4").tobytes()
    assert decode_vectors([cell, cell], 3).tolist() == [[1, 2, 3], [1, 2, 3]]
    assert decode_vectors([], 3).shape == (0, 3)
    with pytest.raises(CodecError):
        decode_vectors([cell], 2)
