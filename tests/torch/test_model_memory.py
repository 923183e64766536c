"""Whole-model helpers on a plain torch model (no GPT-2): the optimizer split and save/load."""

from __future__ import annotations

import torch
from torch import nn

from memstore_torch import (
    FeaturalMemory,
    ProductKeyMemory,
    RowwiseAdagrad,
    split_parameters,
)


def _optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers docs/layers.md recommends for any model with memory layers."""
    dense, memory, sparse = split_parameters(model)
    return [
        torch.optim.AdamW(
            [{"params": dense}, {"params": memory, "lr": 1e-2, "weight_decay": 0.0}], lr=1e-3
        ),
        RowwiseAdagrad(sparse, lr=1e-2),
    ]


def test_split_sends_product_key_rows_to_the_sparse_group_of_any_model():
    """Item 12: product-key values (sparse gradients) used to land in ``memory``, the AdamW
    group, and AdamW raised on their gradient at the first step."""
    torch.manual_seed(0)
    featural = FeaturalMemory(8, n_rows=16, k=4)
    pk = ProductKeyMemory(8, n_keys=4, heads=2, k=3, key_dim=4, value_init_std=0.1)
    model = nn.Sequential(nn.Linear(8, 8), featural, nn.ReLU(), pk)
    dense, memory, sparse = split_parameters(model)
    assert [id(p) for p in sparse] == [id(pk.memory_values)]
    assert {id(p) for p in memory} == {id(featural.memory_keys), id(featural.memory_values)}
    assert id(pk.sub_keys) in {id(p) for p in dense}
    optimizers = _optimizers(model)
    before = pk.memory_values.detach().clone()
    for _ in range(2):
        loss = model(torch.randn(5, 8)).square().mean()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        assert pk.memory_values.grad.is_sparse
        for opt in optimizers:
            opt.step()
    assert not torch.equal(pk.memory_values.detach(), before)
