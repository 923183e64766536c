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


# ------------------------------------------------------------------------- upkeep
def _pk_twins():
    """Two equal product-key memories and their row optimizers, after one trained step."""
    out = []
    for _ in range(2):
        torch.manual_seed(1)
        layer = ProductKeyMemory(8, n_keys=4, heads=2, k=3, key_dim=4, value_init_std=0.1)
        opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
        layer.train()(torch.randn(6, 8)).square().mean().backward()
        opt.step()
        out.append((layer, opt))
    return out


def test_upkeep_methods_do_what_the_trainer_did_by_hand():
    """Item 18 (reshape): the trainer reached into product-key internals (``read.ids - 1``,
    ``reset_rows``); the layer's upkeep methods compute the same rows and state."""
    (a, opt_a), (b, opt_b) = _pk_twins()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    for layer in (a, b):
        layer.record_reads = True
        layer(x)
    read = b.last_read
    blanks = b.recombine_rows(read.ids - 1, read.weights, 10.0)
    opt_b.reset_rows(b.memory_values, blanks)
    assert a.recombine_last_read(10.0, opt_a) == blanks.numel() > 0
    claimed = b.insert_novel(read.ids - 1, read.scores, 0.5)
    opt_b.reset_rows(b.memory_values, claimed)
    assert a.insert_novel_last_read(0.5, [opt_a]) == claimed.numel() > 0
    cold = b.coldest_rows(4)
    cold = cold[b.row_values(cold).abs().amax(dim=1) > 0]
    b.reuse_rows(cold)
    opt_b.reset_rows(b.memory_values, cold)
    assert a.reuse_cold_rows(0.25, opt_a) == cold.numel()
    assert torch.equal(a.memory_values, b.memory_values)
    sa, sb = opt_a.state[a.memory_values]["sum"], opt_b.state[b.memory_values]["sum"]
    assert torch.equal(sa, sb) and bool((sa[cold] == 0).all())
    for field in ("_crf", "_last_tick", "_hits", "_created_tick"):
        assert torch.equal(getattr(a.index, field), getattr(b.index, field)), field


def test_upkeep_of_other_kinds_and_of_unrecorded_layers_does_nothing():
    featural = FeaturalMemory(8, n_rows=16, k=4)
    assert featural.recombine_last_read(1.0) == featural.insert_novel_last_read(0.5) == 0
    assert featural.reuse_cold_rows(0.5) == 0
    (layer, opt), _ = _pk_twins()
    assert layer.recombine_last_read(10.0, opt) == layer.insert_novel_last_read(0.5, opt) == 0


def test_upkeep_refuses_an_optimizer_that_cannot_reset_rows():
    (layer, _), _ = _pk_twins()
    sparse_adam = torch.optim.SparseAdam(layer.memory_parameters(), lr=0.1)
    with pytest.raises(InvalidInputError, match="SparseAdam cannot forget the state"):
        layer.reuse_cold_rows(0.5, sparse_adam)


def test_the_process_wide_hook_unpins_after_any_step_not_after_a_backward(tmp_path):
    """Gradient accumulation: two forwards + backwards keep their rows pinned; the step (of an
    optimizer built anywhere) releases them through the hook that PagedRows registered."""
    from memstore_torch import paged_rows

    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        layer = ProductKeyMemory(
            8, n_keys=4, heads=2, k=3, key_dim=4, store=store, collection="pk", cache_rows=14
        )
        assert paged_rows.OPTIMIZER_HOOK is not None
        opt = torch.optim.SGD(layer.memory_parameters(), lr=0.1)
        with store.transaction():
            for seed in range(2):
                x = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed))
                layer.train()(x).square().mean().backward()
            assert bool(layer.index._pinned.any())
            opt.step()
            assert not bool(layer.index._pinned.any())
