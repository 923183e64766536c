"""Reads without an autograd graph (decoding, evaluation) give what the training reads give."""

from __future__ import annotations

import pytest
import torch

from memstore_torch import FeaturalMemory, ProductKeyMemory
from memstore_torch.functions import TopKMemoryRead, make_weight_fn, topk_memory_read
from memstore_torch.graphless import needs_graph, weighted_bag
from memstore_torch.product_keys import candidate_pairs
from memstore_torch.sparse_rows import SparseRowRead, sparse_row_read


def read_inputs(n_queries=6, n_rows=40, dk=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_queries, dk, generator=g), torch.randn(n_rows, dk, generator=g),
            torch.randn(n_rows, generator=g), torch.randn(n_rows, dv, generator=g))  # fmt: skip


def test_needs_graph_only_with_grad_mode_and_a_tensor_that_wants_one():
    a, b = torch.ones(2), torch.ones(2, requires_grad=True)
    assert needs_graph(a, b) and not needs_graph(a)
    with torch.no_grad():
        assert not needs_graph(a, b)


@pytest.mark.parametrize("k", [5, 40, 60])  # a selection, every row, more than every row
@pytest.mark.parametrize("weighting", ["gelu_tanh", "softmax"])
def test_topk_read_without_graph_equals_the_function(k, weighting):
    q, keys, bias, values = read_inputs()
    fn = make_weight_fn(weighting)
    expected = TopKMemoryRead.apply(q, keys, bias, values, k, fn, True)
    with torch.no_grad():
        out, idx, weights = topk_memory_read(q, keys, bias, values, k, fn, return_weights=True)
    torch.testing.assert_close(out, expected[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, expected[1])
    assert torch.equal(weights, expected[2])


def test_topk_read_without_graph_runs_in_the_autocast_dtype():
    q, keys, bias, values = read_inputs()
    fn = make_weight_fn("gelu_tanh")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = topk_memory_read(q, keys, bias, values.requires_grad_(), 5, fn)
        with torch.no_grad():
            out, _ = topk_memory_read(q, keys, bias, values, 5, fn)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_weighted_bag_equals_the_functional_embedding_bag():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(50, 7, generator=g)
    rows = torch.randint(0, 50, (4, 6), generator=g)
    weights = torch.rand(4, 6, generator=g)
    expected = torch.nn.functional.embedding_bag(rows, values, per_sample_weights=weights,
                                                 mode="sum")  # fmt: skip
    assert torch.equal(weighted_bag(rows, values, weights), expected)
    assert torch.equal(sparse_row_read(weights, rows, values), expected)  # no graph wanted
    values.requires_grad_()
    assert torch.equal(SparseRowRead.apply(weights, rows, values).detach(), expected)


def test_candidate_pairs_are_made_once_per_shape_and_device():
    first = candidate_pairs(32, 32, 32)
    assert candidate_pairs(32, 32, 32, "cpu")[0] is first[0]
    assert candidate_pairs(16, 32, 32)[0] is not first[0]


@pytest.mark.parametrize("layer_kind", ["featural", "product"])
def test_a_layer_reads_the_same_under_no_grad_as_with_a_graph(layer_kind):
    torch.manual_seed(0)
    if layer_kind == "featural":
        layer = FeaturalMemory(16, n_rows=64, k=8, weighting="gelu_tanh", dropout=0.0)
    else:
        layer = ProductKeyMemory(16, n_keys=8, k=6, heads=2, key_dim=8, value_init_std=0.5)
    layer.eval()
    x = torch.randn(3, 5, 16)
    with_graph = layer(x)
    assert with_graph.requires_grad
    with torch.no_grad():
        without = layer(x)
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-6, atol=1e-6)
