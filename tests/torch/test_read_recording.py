"""Recording what a memory layer's forward read (``record_reads`` / ``recording_reads``).

The record must be the forward's own selection: rebuilding each layer's output from the recorded
ids and weights (and nothing else but the rows) gives back exactly what the forward returned.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memstore_torch import AssociativeMemory, FeaturalMemory, recording_reads, topk_memory_read
from memstore_torch.functions import make_weight_fn


def _rows_by_id(layer):
    return {int(i): s for s, i in enumerate(layer.index.ids.tolist())}


def _featural_output_from_record(layer, read) -> torch.Tensor:
    slot = _rows_by_id(layer)
    n, heads, k = read.ids.shape
    values = layer.index.values.detach()
    out = torch.zeros(n, layer.row_value_dim)
    for p in range(n):
        for h in range(heads):
            for j in range(k):
                out[p] += read.weights[p, h, j] * values[slot[int(read.ids[p, h, j])]]
    if layer.out_proj is not None:
        out = layer.out_proj(out)
    return out + layer.out_bias


@pytest.mark.parametrize(
    "options",
    [
        dict(n_rows=40, k=5, weighting="gelu"),  # top-k of 40
        dict(n_rows=12, k=12, weighting="gelu_tanh"),  # dense read: every row, no selection
        dict(n_rows=30, k=4, heads=2, key_dim=8, value_dim=6, weighting="softmax"),
    ],
)
def test_featural_record_rebuilds_the_output(options):
    layer = FeaturalMemory(8, **options).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        layer(x)
        assert layer.last_read is None  # nothing is recorded unless asked
        layer.record_reads = True
        y = layer(x)
    read = layer.last_read
    heads, k = layer.heads, min(layer.k, layer.n_rows)
    assert read.ids.shape == read.weights.shape == (6, heads, k)
    assert read.lead == (2, 3)
    assert set(read.ids.reshape(-1).tolist()) <= set(layer.index.ids.tolist())
    torch.testing.assert_close(
        _featural_output_from_record(layer, read).detach(), y.reshape(6, 8), atol=1e-5, rtol=0
    )


def test_featural_record_is_the_top_k_by_score():
    layer = FeaturalMemory(8, n_rows=40, k=5, weighting="relu").eval()
    layer.record_reads = True
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer(x)
    keys = layer.index.keys.detach()
    scores = x @ keys[:, :8].T + keys[:, 8]  # row key [k, bias] against query [x, 1]
    expected = layer.index.ids[scores.topk(5, dim=1).indices]
    assert torch.equal(layer.last_read.ids[:, 0, :], expected)
    torch.testing.assert_close(layer.last_read.weights[:, 0, :], scores.topk(5).values.relu())


def test_associative_record_rebuilds_the_output():
    layer = AssociativeMemory(8, heads=2, k=3, capacity=50, novel=None).eval()
    with torch.no_grad():
        layer.index.insert(torch.randn(20, 4), torch.randn(20, 4))
    layer.record_reads = True
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        y = layer(x)
    read = layer.last_read
    assert read.ids.shape == (5, 2, 3) and bool((read.ids >= 0).all())
    slot = _rows_by_id(layer)
    values = layer.index.values
    heads_out = torch.zeros(5, 2, 4)
    for p in range(5):
        for h in range(2):
            for j in range(3):
                heads_out[p, h] += read.weights[p, h, j] * values[slot[int(read.ids[p, h, j])]]
    rebuilt = layer.out_proj(heads_out.reshape(5, 8))
    torch.testing.assert_close(rebuilt, y.reshape(5, 8), atol=1e-5, rtol=0)


def test_recording_reads_finds_layers_anywhere_and_restores():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 8), FeaturalMemory(8, n_rows=16, k=4))
            self.top = FeaturalMemory(8, n_rows=16, k=2)

        def forward(self, x):
            return self.top(self.inner(x))

    net = Net().eval()
    with recording_reads(net) as layers, torch.no_grad():
        assert set(layers) == {"inner.1", "top"}
        net(torch.randn(3, 8))
        assert layers["inner.1"].last_read.ids.shape == (3, 1, 4)
        assert layers["top"].last_read.ids.shape == (3, 1, 2)
    assert not net.top.record_reads and net.top.last_read is None


def test_returning_weights_changes_neither_output_nor_gradients():
    torch.manual_seed(1)
    q = torch.randn(6, 5, requires_grad=True)
    keys = torch.randn(20, 5, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    values = torch.randn(20, 3, requires_grad=True)
    fn = make_weight_fn("gelu")
    grads = []
    for flag in (False, True):
        result = topk_memory_read(q, keys, bias, values, 4, fn, return_weights=flag)
        assert len(result) == (3 if flag else 2)
        out = result[0]
        if flag:
            assert not result[2].requires_grad and result[2].shape == (6, 4)
        grads.append(torch.autograd.grad(out.square().sum(), (q, keys, bias, values)))
        if flag:
            scores = torch.addmm(bias, q, keys.T).detach()
            torch.testing.assert_close(result[2], fn(scores.gather(1, result[1])))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
