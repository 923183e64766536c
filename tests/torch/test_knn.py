"""Resident search kernels must equal brute force for every metric, backend and block size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.errors import InvalidInputError
from memstore_torch import knn

BACKENDS = ["torch"] + (["faiss"] if knn.faiss_available() else [])


def assert_same_neighbours(dist, idx, ref_dist, ref_idx, atol=1e-4):
    """Distances equal; ids equal except where two candidates tie within tolerance."""
    np.testing.assert_allclose(dist.numpy(), ref_dist.numpy(), atol=atol, rtol=1e-5)
    mismatch = idx != ref_idx
    if mismatch.any():
        # a swapped pair is only acceptable between (numerically) tied distances
        assert torch.allclose(dist[mismatch], ref_dist[mismatch], atol=atol)


@pytest.mark.parametrize("metric", knn.METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_equals_brute_force(metric, backend):
    rows = torch.randn(500, 16)
    queries = torch.randn(37, 16)
    dist, idx = knn.search(queries, rows, 7, metric, backend=backend)
    ref_dist, ref_idx = knn.brute_force(queries, rows, 7, metric)
    assert dist.shape == (37, 7) and idx.dtype == torch.int64
    assert_same_neighbours(dist, idx, ref_dist, ref_idx)


@pytest.mark.parametrize("metric", knn.METRICS)
def test_blocked_merge_equals_brute_force(metric, monkeypatch):
    """Tiny tiles force many query blocks and row blocks through the running top-k merge."""
    monkeypatch.setattr(knn, "_TILE_ELEMENTS", 64)
    rows = torch.randn(300, 8)
    queries = torch.randn(50, 8)
    monkeypatch.setattr(knn, "_ROW_BLOCK", 13)
    dist, idx = knn.search(queries, rows, 5, metric, backend="torch")
    ref_dist, ref_idx = knn.brute_force(queries, rows, 5, metric)
    assert_same_neighbours(dist, idx, ref_dist, ref_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_rows_than_k_is_padded(backend):
    rows = torch.randn(3, 4)
    dist, idx = knn.search(torch.randn(2, 4), rows, 5, "l2", backend=backend)
    assert (idx[:, 3:] == -1).all() and torch.isinf(dist[:, 3:]).all()
    assert sorted(idx[0, :3].tolist()) == [0, 1, 2]


def test_empty_rows_give_only_padding():
    dist, idx = knn.search(torch.randn(2, 4), torch.zeros(0, 4), 3, "ip")
    assert (idx == -1).all() and torch.isinf(dist).all()


def test_bad_input_is_rejected():
    with pytest.raises(InvalidInputError):
        knn.search(torch.randn(2, 4), torch.randn(5, 3), 1)
    with pytest.raises(InvalidInputError):
        knn.search(torch.randn(2, 4), torch.randn(5, 4), 0)
    with pytest.raises(InvalidInputError):
        knn.search(torch.randn(2, 4), torch.randn(5, 4), 1, "hamming")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    m=st.integers(1, 9),
    d=st.integers(1, 6),
    k=st.integers(1, 10),
    metric=st.sampled_from(knn.METRICS),
    seed=st.integers(0, 2**16),
)
def test_search_property(n, m, d, k, metric, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g)
    queries = torch.randn(m, d, generator=g)
    dist, idx = knn.search(queries, rows, k, metric, backend="torch")
    ref_dist, ref_idx = knn.brute_force(queries, rows, k, metric)
    found = idx >= 0
    assert found.sum(1).tolist() == [min(k, n)] * m
    assert torch.equal(torch.isinf(dist), ~found)
    assert_same_neighbours(dist.where(found, 0), idx, ref_dist.where(found, 0), ref_idx, atol=1e-3)
    # distances are non-decreasing along each row
    finite = dist.where(found, torch.tensor(math.inf))
    assert (finite[:, 1:] >= finite[:, :-1] - 1e-5).all()


@pytest.mark.parametrize("metric", knn.METRICS)
@pytest.mark.parametrize("group", [4, 32])
def test_grouped_tile_selection_equals_brute_force(metric, group, monkeypatch):
    """The group-maximum selection (plus the tail split when a block is not a whole number of
    groups) must return exactly the brute-force neighbours."""
    monkeypatch.setattr(knn, "_GROUP", group)
    monkeypatch.setattr(knn, "_ROW_BLOCK", 97 if group == 4 else 1000)
    rows = torch.randn(1203, 8)
    queries = torch.randn(21, 8)
    dist, idx = knn.search(queries, rows, 5, metric, backend="torch")
    ref_dist, ref_idx = knn.brute_force(queries, rows, 5, metric)
    assert_same_neighbours(dist, idx, ref_dist, ref_idx)


def test_grouped_selection_finds_neighbours_crowded_into_one_group(monkeypatch):
    """All k best rows inside one group: the k groups kept must still include it."""
    monkeypatch.setattr(knn, "_GROUP", 8)
    rows = torch.randn(640, 4) * 0.01
    rows[16:24] = torch.tensor([1.0, 0, 0, 0]) * torch.arange(1, 9)[:, None]
    dist, idx = knn.search(torch.tensor([[1.0, 0, 0, 0]]), rows, 6, "ip", backend="torch")
    assert sorted(idx[0].tolist()) == list(range(18, 24))
