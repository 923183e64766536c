"""FeaturalMemory: exact MLP equivalence, tail correction, store round trip, learning."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from memstore.errors import InvalidInputError
from memstore_torch import FeaturalMemory


def gpt2_mlp(d=16, n_inner=64, scale=0.3, fc_bias_mean=0.0):
    torch.manual_seed(3)
    mlp = GPT2MLP(n_inner, GPT2Config(n_embd=d, n_inner=n_inner, resid_pdrop=0.0)).eval()
    with torch.no_grad():  # GPT-2's 0.02 init makes outputs too small to compare meaningfully
        for p in mlp.parameters():
            p.normal_(0, scale)
        mlp.c_fc.bias.normal_(fc_bias_mean, 0.5)
    return mlp


def test_from_mlp_with_all_rows_equals_the_mlp():
    mlp = gpt2_mlp()
    layer = FeaturalMemory.from_mlp(mlp, k=64).eval()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), mlp(x), atol=1e-5, rtol=0)
    assert layer.weighting == "gelu_tanh" and len(layer.index) == 64
    # gradients to the input agree too
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xa).sum().backward()
    mlp(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=0)


def test_tail_correction_reduces_top_k_error():
    # Mostly negative pre-activations, as in trained GPT-2s: GELU's negative lobe makes the
    # unselected rows add up to a steady vector.
    mlp = gpt2_mlp(fc_bias_mean=-2.0)
    calib = torch.randn(2048, 16)
    x = torch.randn(512, 16)
    target = mlp(x)
    with pytest.warns(UserWarning, match="no tail correction"):
        plain = FeaturalMemory.from_mlp(mlp, k=8, calibration=None).eval()
    corrected = FeaturalMemory.from_mlp(mlp, k=8, calibration=calib).eval()
    err_plain = (plain(x) - target).square().mean()
    err_corrected = (corrected(x) - target).square().mean()
    assert err_corrected < 0.7 * err_plain
    assert corrected.out_bias.requires_grad  # the correction stays trainable


def test_rows_are_not_in_state_dict_but_train(store):
    layer = FeaturalMemory(8, n_rows=32, k=4, key_dim=6, value_dim=5, store=store, collection="f")
    sd = layer.state_dict()
    assert not any("memory" in name for name in sd)
    assert {"out_bias", "query_proj.weight", "out_proj.weight"} <= set(sd)
    assert [p.shape for p in layer.memory_parameters()] == [(32, 7), (32, 5)]
    mem = {id(p) for p in layer.memory_parameters()}
    assert not any(id(p) in mem for p in layer.dense_parameters())
    before = layer.memory_keys.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 5, 8)).square().sum().backward()
    touched = layer.memory_keys.grad.abs().sum(1) > 0
    assert 0 < touched.sum() < 32  # sparse: only selected rows get gradient
    opt.step()
    changed = (layer.memory_keys.detach() != before).any(1)
    assert torch.equal(changed, touched)
    report = layer.flush()
    assert report["upserts"] >= int(touched.sum())
    reopened = store.collection("f").get(layer.index.ids[touched].numpy())
    torch.testing.assert_close(torch.from_numpy(reopened.keys), layer.index.keys[touched].detach())


def test_train_flush_reopen_gives_the_same_outputs(db_url):
    from memstore import Store

    x = torch.randn(4, 6, 12)
    y = torch.randn(4, 6, 12)
    with Store(db_url) as store:
        layer = FeaturalMemory(12, n_rows=48, k=6, heads=2, store=store, collection="layer0")
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        for _ in range(5):
            loss = (layer(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.flush()
        config, state = layer.extra_config(), layer.state_dict()
        expected = layer.eval()(x)
    with Store(db_url) as store:
        again = FeaturalMemory.from_config(config, store)
        again.load_state_dict(state)
        torch.testing.assert_close(again.eval()(x), expected, atol=1e-6, rtol=0)
        assert again.index.clock == 5


def test_eval_does_not_touch_or_insert(store):
    layer = FeaturalMemory(8, n_rows=16, k=2, novel=-100.0, store=store, collection="e").eval()
    hits = layer.index.hits.clone()
    layer(torch.randn(2, 3, 8))
    layer.flush()
    assert torch.equal(layer.index.hits, hits) and len(layer.index) == 16
    layer.train()
    layer(torch.randn(2, 3, 8))
    assert layer.index.hits.sum() == 2 * 3 * 2


def test_novel_queries_become_rows_and_recombination_merges():
    layer = FeaturalMemory(4, n_rows=8, k=2, novel=0.5)
    layer.set_rows(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 4))
    layer.train()
    layer(torch.randn(1, 3, 4))  # ip distance -(q.k + b) = 0 <= 0.5: nothing is novel
    layer._apply_pending()
    assert len(layer.index) == 2
    layer.novel = -1.0  # now every query is farther than -1
    layer(torch.ones(1, 2, 4))
    layer._apply_pending()
    assert len(layer.index) == 4
    assert torch.equal(layer.index.keys[-1], torch.tensor([1.0, 1, 1, 1, 0]))
    assert (layer.index.values[-2:] == 0).all()

    merging = FeaturalMemory(2, n_rows=4, k=3, recombine=0.0)
    merging.set_rows(
        torch.tensor([[1.0, 0], [1.0, 0.01], [-1.0, 0]]), torch.zeros(3), torch.eye(3, 2)
    )
    merging.train()
    merging(torch.tensor([[[5.0, 0.0]]]))  # two rows score ~5 >= 0: within recombine distance
    merging._apply_pending()
    assert len(merging.index) == 2
    assert merging.index.counters["recombinations"] == 1


def test_featural_layer_learns_a_key_value_association():
    """16 random input patterns -> 16 random targets through a memory with 64 rows, k=4."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 10)
    y = torch.randn(16, 1, 10)
    layer = FeaturalMemory(10, n_rows=64, k=4, key_dim=8, value_dim=8, temperature=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    first = None
    for _ in range(300):
        loss = (layer(x) - y).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.5 and loss.item() < 0.05
    assert layer.memory_values.grad.abs().sum() > 0 and layer.memory_keys.grad.abs().sum() > 0


def test_read_only_rows_get_no_gradient_and_bad_config_is_rejected():
    layer = FeaturalMemory(6, n_rows=10, k=3, trainable_rows=False)
    layer(torch.randn(1, 2, 6)).sum().backward()
    assert layer.memory_keys.grad is None and layer.memory_parameters() == []
    with pytest.raises(InvalidInputError):
        FeaturalMemory(6, n_rows=10, k=3, heads=4)
    with pytest.raises(InvalidInputError):
        FeaturalMemory(6, weighting="sigmoid")
    with pytest.raises(InvalidInputError):
        layer(torch.randn(1, 2, 5))
    with pytest.raises(InvalidInputError):
        layer.flush()  # not bound to a store


def test_novelty_with_a_dense_read_uses_the_best_row():
    """With k >= rows every row is read; novelty must still be judged by the nearest row."""
    layer = FeaturalMemory(2, n_rows=6, k=6, novel=-1.5)
    layer.set_rows(
        torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]]), torch.zeros(3), torch.zeros(3, 2)
    )
    layer.train()
    layer(torch.tensor([[[1.0, 0.0]]]))  # best score 2 (row 3): distance -2 <= -1.5, not novel
    layer._apply_pending()
    assert len(layer.index) == 3
    layer(torch.tensor([[[-1.0, 0.0]]]))  # best score 0: distance 0 > -1.5, novel
    layer._apply_pending()
    assert len(layer.index) == 4


def test_from_mlp_into_an_existing_collection_replaces_its_rows(store):
    small = gpt2_mlp(d=8, n_inner=24)
    FeaturalMemory.from_mlp(small, k=24, store=store, collection="layer1")
    other = gpt2_mlp(d=8, n_inner=16, scale=0.1)
    layer = FeaturalMemory.from_mlp(other, k=16, store=store, collection="layer1")
    stored = store.collection("layer1").export_rows()
    assert len(stored) == 16
    order = torch.from_numpy(stored.ids).argsort()
    keys = torch.from_numpy(stored.keys)[order]
    torch.testing.assert_close(keys[:, :8], other.c_fc.weight.detach().T)
    torch.testing.assert_close(keys[:, 8], other.c_fc.bias.detach())
    again = FeaturalMemory.from_config(layer.extra_config(), store)
    again.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(again.eval()(x), other(x), atol=1e-5, rtol=0)


def test_reduced_precision_activations_and_converted_layers():
    mlp = gpt2_mlp()
    layer = FeaturalMemory.from_mlp(mlp, k=64).eval()
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out.float(), mlp(x), atol=0.1, rtol=0.05)
    double = FeaturalMemory.from_mlp(mlp, k=64).double().eval()
    torch.testing.assert_close(double(x.double()), mlp.double()(x.double()), atol=1e-9, rtol=0)


def test_from_mlp_keeps_the_mode_of_the_mlp_it_replaces():
    """Swapped into an eval-mode model, the layer must already be in eval mode: in training mode
    its dropout and LRFU bookkeeping change the model's output until ``.eval()`` is called."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_inner=64,
        vocab_size=50,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()  # resid_pdrop 0.1: dropout matters in training mode
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        block = model.transformer.h[0]
        block.mlp = FeaturalMemory.from_mlp(block.mlp, k=64)  # k = n_inner: the same function
        assert not block.mlp.training
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    assert FeaturalMemory.from_mlp(gpt2_mlp().train(), k=64).training
