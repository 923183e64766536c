"""ProductKeyMemory records what its forward read (``record_reads`` / ``last_read``): the ids
(row + 1) and softmax weights the forward itself used, so ``memstore trace`` can show extra rows."""

from __future__ import annotations

import pytest
import torch

from memstore_torch import ProductKeyMemory, recording_reads

SMALL = {"n_keys": 8, "heads": 2, "k": 5, "key_dim": 6, "value_init_std": 0.5}


@pytest.mark.parametrize("value_dim", [None, 4])
def test_the_record_rebuilds_the_output(value_dim):
    torch.manual_seed(0)
    layer = ProductKeyMemory(12, value_dim=value_dim, **SMALL).eval()
    x = torch.randn(2, 3, 12)
    with recording_reads(layer), torch.no_grad():
        out = layer(x)
        read = layer.last_read
    assert read.lead == (2, 3)
    assert read.ids.shape == read.weights.shape == (6, 2, 5)
    assert read.ids.dtype == torch.int64
    assert bool((read.ids >= 1).all() and (read.ids <= 64).all())
    assert torch.equal(layer.index.ids[read.ids - 1], read.ids)  # stored id = row + 1
    torch.testing.assert_close(read.weights.sum(-1), torch.ones(6, 2))  # softmax per head
    # the forward's output, from the record alone: sum over heads and k of weight x value
    values = layer.memory_values.detach()
    rebuilt = (read.weights[..., None] * values[read.ids - 1]).sum((1, 2))
    if layer.out_proj is not None:
        rebuilt = layer.out_proj(rebuilt)
    torch.testing.assert_close(rebuilt, out.reshape(6, 12), atol=1e-5, rtol=0)


def test_the_record_is_the_search_the_forward_made():
    torch.manual_seed(1)
    layer = ProductKeyMemory(12, **SMALL).eval()
    x = torch.randn(7, 12)
    with recording_reads(layer), torch.no_grad():
        layer(x)
        read = layer.last_read
        scores, rows = layer.search(x)
    assert torch.equal(read.ids, rows + 1)
    torch.testing.assert_close(read.weights, torch.softmax(scores, dim=-1))


def test_nothing_is_kept_unless_asked():
    layer = ProductKeyMemory(12, **SMALL)
    layer(torch.randn(3, 12))
    assert layer.last_read is None
    with recording_reads(layer):
        layer(torch.randn(3, 12))
        assert layer.last_read is not None
    assert layer.last_read is None and not layer.record_reads
