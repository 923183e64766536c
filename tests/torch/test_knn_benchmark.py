"""benchmarks/knn.py: each column times the kernel its header names."""

from __future__ import annotations

import pytest
import torch

from memstore_torch import knn
from tests.benchmark_scripts import load_benchmark


@pytest.fixture
def knn_benchmark(monkeypatch):
    pytest.importorskip("faiss")  # the benchmark compares against FAISS's IndexFlatIP
    return load_benchmark(monkeypatch, "knn.py")


def test_torch_kernel_column_runs_the_torch_kernel(knn_benchmark, monkeypatch):
    """With FAISS installed the resident index runs FAISS's kernel; the torch-kernel column must
    still time the torch kernel (it once timed ``backend="faiss"``, so its figures were FAISS's)."""
    calls = {"torch": 0, "faiss": 0}
    real_torch, real_faiss = knn._torch_search, knn._faiss_search

    def torch_spy(*args, **kwargs):
        calls["torch"] += 1
        return real_torch(*args, **kwargs)

    def faiss_spy(*args, **kwargs):
        calls["faiss"] += 1
        return real_faiss(*args, **kwargs)

    monkeypatch.setattr(knn, "_torch_search", torch_spy)
    monkeypatch.setattr(knn, "_faiss_search", faiss_spy)
    result = knn_benchmark.run_size(300, 8, 16, 4, repeats=3, with_torch_backend=True)
    assert result["_backend"] == "faiss"  # the resident column: FAISS's kernel (faiss installed)
    assert calls["torch"] == 1 + 3  # the answer check, then one timed search per repeat
    assert calls["faiss"] == 1 + 3  # the resident index's own searches
    assert result["_torch_backend_qps"] > 0

    def no_faiss(*args, **kwargs):
        raise AssertionError("the torch-kernel column called FAISS")

    monkeypatch.setattr(knn, "_faiss_search", no_faiss)
    rows, queries = torch.randn(200, 8), torch.randn(5, 8)
    dist, idx = knn_benchmark.torch_kernel_search(queries, rows, 4)
    ref_dist, ref_idx = knn.brute_force(queries, rows, 4, "ip")
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=0)
    assert torch.equal(idx, ref_idx)
