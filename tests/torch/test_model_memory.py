"""Whole-model helpers on a plain torch model (no GPT-2): the optimizer split and save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from memstore import Store
from memstore.errors import InvalidInputError
from memstore_torch import (
    FeaturalMemory,
    GrownMemory,
    ProductKeyMemory,
    RowwiseAdagrad,
    load_memory_state,
    save_memory_model,
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


# ------------------------------------------------------------------------- save and load
def _model(store=None, seed: int = 0, n_rows: int = 16) -> nn.Sequential:
    """A small custom model with both memory kinds, bound to ``store`` when given."""
    torch.manual_seed(seed)
    bind = (
        (lambda name: {"store": store, "collection": name})
        if store is not None
        else (lambda name: {})
    )
    return nn.Sequential(
        nn.Linear(8, 8),
        FeaturalMemory(8, n_rows=n_rows, k=4, **bind("feat")),
        nn.ReLU(),
        GrownMemory(
            nn.Linear(8, 8),
            ProductKeyMemory(
                8, n_keys=4, heads=2, k=3, key_dim=4, value_init_std=0.1, **bind("pk")
            ),
        ),
    )


def _trained(store) -> nn.Sequential:
    model = _model(store)
    optimizers = _optimizers(model)
    for step in range(3):
        loss = model(torch.randn(6, 8, generator=torch.Generator().manual_seed(step)))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.square().mean().backward()
        for opt in optimizers:
            opt.step()
    return model


def test_save_and_load_a_memory_model_round_trips_bit_for_bit(tmp_path):
    """Item 12: a memory model other than a GPT-2 student had no save/load; ``state_dict``
    (and so ``save_pretrained``) silently drops the rows."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        model = _trained(store)
        out = save_memory_model(model, tmp_path / "saved", store)
        with torch.no_grad():
            expected = model.eval()(x)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["memory_layers.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, no pickle
    manifest = json.loads((out / "memory_layers.json").read_text())
    assert manifest["layers"]["1"]["kind"] == "FeaturalMemory"
    assert manifest["layers"]["3.extras.0"]["collection"] == "pk"
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        fresh = _model(seed=5)  # unbound, other random weights and rows
        with torch.no_grad():
            assert not torch.equal(fresh.eval()(x), expected)
        loaded = load_memory_state(fresh, out, store)
        assert set(loaded) == {"1", "3.extras.0"} and fresh[1] is loaded["1"]
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), expected)
        again = _model(seed=6)
        load_memory_state(again, out, store, cache_rows=12)  # product-key rows paged
        assert again[3].extras[0].paged
        with torch.no_grad():
            assert torch.equal(again.eval()(x), expected)


def test_state_dict_alone_loses_the_rows(tmp_path):
    """Why the manifest and the store are needed: a fresh model given only ``state_dict``
    computes something else."""
    x = torch.randn(5, 8)
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        model = _trained(store)
        fresh = _model(seed=5)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: _model(n_rows=32),
            "memory layer '1': the saved FeaturalMemory has n_rows=16, this model's has 32",
        ),
        (lambda: nn.Sequential(*list(_model())[:3]), "missing '3.extras.0'"),
        (
            lambda: nn.Sequential(
                nn.Linear(8, 8),
                ProductKeyMemory(8, n_keys=4, heads=2, k=3, key_dim=4),
                nn.ReLU(),
                _model()[3],
            ),
            "memory layer '1' is a ProductKeyMemory; the saved one is a FeaturalMemory",
        ),
        (
            lambda: nn.Sequential(nn.Linear(8, 4), *list(_model())[1:]),
            "the saved weight '0.bias' has shape (8,)",
        ),
    ],
)
def test_loading_into_a_different_model_is_refused_in_one_line(tmp_path, build, message):
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        out = save_memory_model(_trained(store), tmp_path / "saved")
        model = build()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InvalidInputError) as caught:
            load_memory_state(model, out, store)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_damaged_or_foreign_files_are_refused_in_one_line(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        out = save_memory_model(_trained(store), tmp_path / "saved")
        (out / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, never loaded
        with pytest.raises(InvalidInputError, match="not a safetensors file"):
            load_memory_state(_model(), out, store)
        (out / "memory_layers.json").write_text("{")
        with pytest.raises(InvalidInputError, match="is damaged"):
            load_memory_state(_model(), out, store)
        with pytest.raises(InvalidInputError, match="holds no saved memory model"):
            load_memory_state(_model(), tmp_path, store)


def test_saving_an_unbound_layer_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="'1' is not bound to a store"):
        save_memory_model(_model(), tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
