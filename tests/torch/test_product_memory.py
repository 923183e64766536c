"""ProductKeyMemory: the read equals brute force over explicit keys, zero-effect start, sparse
gradients, LRFU per row, the collection round trip, and no (tokens x rows) allocation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from memstore.errors import InvalidInputError
from memstore_torch import (
    FeaturalMemory,
    GrownMemory,
    ProductKeyConfig,
    ProductKeyMemory,
    RowwiseAdagrad,
    flush_memory,
    memory_layers,
    split_parameters,
)

SMALL = {"n_keys": 8, "heads": 2, "k": 5, "key_dim": 6}


def small(d_model: int = 12, **options) -> ProductKeyMemory:
    return ProductKeyMemory(d_model, **{**SMALL, "value_init_std": 0.5, **options})


def explicit_read(layer: ProductKeyMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output computed the slow way: every head scores all N = n_keys**2 explicit
    keys [C1[i], C2[j]] (float64), takes the best k (score, then lower row), softmax, and sums the
    values; then the output projection. Returns (output, rows (T, heads, k))."""
    cfg = layer.config
    t, heads, dk, n = x.shape[0], cfg.heads, cfg.key_dim, cfg.n_keys
    with torch.no_grad():
        q = layer.query_norm(layer.query_proj(x).view(t, heads, dk)).double()
        sub = layer.sub_keys.double()  # (H, 2, n, dk/2)
        values = layer.memory_values.double()
        out = torch.zeros(t, values.shape[1], dtype=torch.float64)
        all_rows = torch.empty(t, heads, cfg.k, dtype=torch.int64)
        for h in range(heads):
            keys = torch.cat(
                [sub[h, 0].repeat_interleave(n, dim=0), sub[h, 1].repeat(n, 1)], dim=1
            )  # (N, dk): row i * n + j is [C1[i], C2[j]]
            scores = q[:, h] @ keys.T  # (T, N)
            for tok in range(t):
                s = scores[tok].numpy()
                rows = np.lexsort((np.arange(n * n), -s))[: cfg.k]
                w = torch.softmax(torch.from_numpy(s[rows]), 0)
                out[tok] += (w[:, None] * values[torch.from_numpy(rows)]).sum(0)
                all_rows[tok, h] = torch.from_numpy(rows)
        if layer.out_proj is not None:
            out = out @ layer.out_proj.weight.double().T
    return out, all_rows


@pytest.mark.parametrize("options", [{}, {"value_dim": 7}, {"query_norm": "none"}])
@pytest.mark.parametrize("full_search_sums", [0, 16384])  # the two routes of product_topk
@pytest.mark.parametrize("tokens", [1, 9])
def test_read_equals_brute_force_over_explicit_keys(options, full_search_sums, tokens,
                                                    monkeypatch):  # fmt: skip
    from memstore_torch import product_keys

    monkeypatch.setattr(product_keys, "FULL_SEARCH_SUMS", full_search_sums)
    layer = small(**options).eval()
    x = torch.randn(tokens, 12)
    want, want_rows = explicit_read(layer, x)
    _, rows = layer.search(x)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-6)


def test_shapes_any_leading_dims_and_batchnorm():
    layer = small(query_norm="batchnorm")
    x = torch.randn(2, 3, 4, 12)
    assert layer(x).shape == x.shape
    assert isinstance(layer.query_norm, nn.BatchNorm1d)
    empty = torch.randn(0, 12, requires_grad=True)
    small()(empty).sum().backward()  # no tokens: an empty output and gradient
    assert empty.grad.shape == (0, 12)


def test_zero_values_add_nothing_to_a_model():
    """Values start at zero: base + memory equals base at step 0, outputs and gradients."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12))
    grown = GrownMemory(base, ProductKeyMemory(12, **SMALL))
    x = torch.randn(5, 12)
    assert torch.equal(grown.extras[0](x), torch.zeros(5, 12))
    assert torch.equal(grown(x), base(x))
    grown(x).square().sum().backward()
    base_grads = [p.grad.clone() for p in base.parameters()]
    base.zero_grad()
    base(x).square().sum().backward()
    for got, want in zip(base_grads, [p.grad for p in base.parameters()], strict=True):
        assert torch.equal(got, want)
    # the values still learn: their gradient is the weights times the output gradient
    values_grad = grown.extras[0].memory_values.grad
    assert values_grad.is_sparse and values_grad._values().abs().sum() > 0


def test_grown_featural_memory_equals_the_featural_memory_at_start():
    torch.manual_seed(1)
    featural = FeaturalMemory(12, n_rows=32, k=4)
    grown = GrownMemory(featural, ProductKeyMemory(12, **SMALL))
    x = torch.randn(3, 4, 12)
    assert torch.equal(grown(x), featural(x))
    assert set(memory_layers(grown)) == {"base", "extras.0"}


def test_gradcheck_through_the_query_path():
    """Input -> query -> scores -> softmax weights -> values: exact gradients (float64; random
    inputs keep the selection away from ties under gradcheck's perturbations)."""
    layer = small(query_norm="none").double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_sub_keys_and_projection_get_gradients_values_a_sparse_one():
    layer = small(value_dim=7)
    x = torch.randn(6, 12)
    layer(x).square().sum().backward()
    _, rows = layer.search(x)
    grad = layer.memory_values.grad
    assert grad.is_sparse
    assert torch.equal(grad._indices()[0], torch.unique(rows))
    for p in layer.dense_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.memory_keys.grad is None  # addresses never train


def test_config_and_options():
    config = ProductKeyConfig(d_model=12, **SMALL)
    assert config.n_rows == 64 and config.row_value_dim == 12
    layer = ProductKeyMemory(config)
    assert layer.config == config and layer.n_rows == 64
    assert ProductKeyMemory(12, **SMALL).config == config
    layer.k = 3  # live
    assert layer.config.k == 3
    with pytest.raises(AttributeError):
        layer.n_keys = 4
    saved = layer.extra_config()
    assert saved["type"] == "ProductKeyMemory" and json.loads(json.dumps(saved)) == saved
    rebuilt, _ = ProductKeyMemory.split_saved_config(saved)
    assert rebuilt == dataclasses.replace(config, k=3)


@pytest.mark.parametrize(
    "options,parameter",
    [
        ({"key_dim": 5}, "key_dim"),
        ({"k": 65}, "k"),
        ({"query_norm": "rms"}, "query_norm"),
        ({"value_init_std": -1.0}, "value_init_std"),
        ({"n_keys": 0}, "n_keys"),
    ],
)
def test_bad_options_name_the_parameter(options, parameter):
    with pytest.raises(InvalidInputError) as err:
        ProductKeyConfig(d_model=12, **{**SMALL, **options})
    assert err.value.parameter == parameter


def test_training_forward_touches_every_read_once_per_tick():
    layer = small().train()
    x = torch.randn(10, 12)
    _, rows = layer.search(x)
    layer(x)
    counts = torch.bincount(rows.reshape(-1), minlength=64)
    assert layer.index.clock == 1
    assert torch.equal(layer.index.hits, counts)
    layer.eval()(x)  # eval reads do not count
    assert layer.index.clock == 1
    # the coldest rows are those never read, lowest id first
    never = (counts == 0).nonzero().reshape(-1)
    assert torch.equal(layer.coldest_rows(len(never)).sort().values, never)


def test_flush_reload_round_trip_and_lrfu_in_the_store(store):
    torch.manual_seed(2)
    layer = small(store=store, collection="pk").train()
    coll = store.collection("pk")
    assert (coll.index, coll.key_dim, coll.value_dim, len(coll)) == ("none", 2, 12, 64)
    rows0 = coll.export_rows()
    assert rows0.ids.tolist() == list(range(1, 65))
    assert rows0.keys.tolist() == [[i, j] for i in range(8) for j in range(8)]
    np.testing.assert_array_equal(rows0.values, layer.memory_values.detach().numpy())

    opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
    x = torch.randn(10, 12)
    _, rows = layer.search(x)
    layer(x).square().mean().backward()
    opt.step()
    report = layer.flush()
    assert report["upserts"] == len(torch.unique(rows))  # only the rows read were written
    stored = coll.export_rows()
    np.testing.assert_array_equal(stored.values, layer.memory_values.detach().numpy())
    np.testing.assert_array_equal(
        stored.hits, torch.bincount(rows.reshape(-1), minlength=64).numpy()
    )
    assert coll.stats()["clock"] == 1

    again = ProductKeyMemory.from_config(layer.extra_config(), store)
    again.load_state_dict(layer.state_dict())
    layer.eval(), again.eval()
    assert torch.equal(again(x), layer(x))
    assert "memory_values" not in "".join(layer.state_dict())
    assert "sub_keys" in layer.state_dict()


def test_eval_reads_with_gradient_are_flushed_too(store):
    """Training in eval mode (no LRFU touches) still writes the rows an optimizer moved."""
    layer = ProductKeyMemory(12, **SMALL, store=store, collection="pk").eval()
    opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
    x = torch.randn(4, 12)
    layer(x).sum().backward()
    opt.step()
    assert layer.flush()["upserts"] > 0
    np.testing.assert_array_equal(
        store.collection("pk").export_rows().values, layer.memory_values.detach().numpy()
    )


def test_reuse_rows_gives_cold_rows_new_content(store):
    layer = small(store=store, collection="pk").train()
    opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
    layer(torch.randn(3, 12)).sum().backward()
    opt.step()
    cold = layer.coldest_rows(4)
    layer.reuse_rows(cold)
    opt.reset_rows(layer.memory_values, cold)
    assert layer.memory_values[cold].abs().sum() == 0
    assert opt.state[layer.memory_values]["sum"][cold].abs().sum() == 0
    layer.flush()
    stats = store.collection("pk").stats()
    assert stats["evictions"] == 4 and stats["inserts"] == 64 + 4
    stored = store.collection("pk").get((cold + 1).tolist())
    assert (stored.values == 0).all() and (stored.created_tick == 1).all()


def test_a_collection_of_other_rows_is_refused(store):
    coll = store.create_collection("pk", key_dim=2, value_dim=12, index="none")
    coll.insert(np.zeros((64, 2), np.float32), np.zeros((64, 12), np.float32))  # keys not [i, j]
    with pytest.raises(InvalidInputError, match="product-key"):
        ProductKeyMemory(12, **SMALL, store=store, collection="pk")


def test_whole_model_helpers_find_the_layer_and_split_its_values(store):
    model = nn.Sequential(nn.Linear(12, 12), GrownMemory(nn.Identity(), small()))
    pk = model[1].extras[0]
    dense, memory, sparse = split_parameters(model)
    assert memory == [] and [id(p) for p in sparse] == [id(pk.memory_values)]
    assert id(pk.sub_keys) in {id(p) for p in dense}
    bound = GrownMemory(nn.Identity(), small(store=store, collection="pk"))
    assert set(flush_memory(bound)) == {"extras.0"}


def test_no_tokens_by_rows_allocation(tmp_path):
    """Forward, backward and the optimizer step of a 262,144-row memory over 256 tokens: a
    (tokens x rows) float32 tensor would be 256 MiB. Every allocation is recorded by the profiler
    (deterministic sizes, not timings): none reaches 1/32 of that, and the peak of memory held
    beyond what existed before stays under 1/16 (O(rows) bookkeeping such as LRFU hit counts,
    8 bytes a row, is allowed)."""
    torch.manual_seed(3)
    layer = ProductKeyMemory(16, n_keys=512, heads=2, k=8, key_dim=8, value_init_std=0.1)
    opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
    x = torch.randn(256, 16)
    tokens_by_rows = 256 * layer.n_rows * 4
    layer(x).square().mean().backward()  # warm-up: optimizer state, lazily built tensors
    opt.step()
    opt.zero_grad(set_to_none=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [
        e["args"]
        for e in json.loads(trace.read_text())["traceEvents"]
        if e.get("name") == "[memory]"
    ]
    assert events, "the profiler recorded no allocations"
    largest = max(e["Bytes"] for e in events)
    live = [e["Total Allocated"] for e in events]
    peak_growth = max(live) - (live[0] - events[0]["Bytes"])
    assert largest < tokens_by_rows / 32, largest
    assert peak_growth < tokens_by_rows / 16, peak_growth


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    layer = small().cuda().train()
    opt = RowwiseAdagrad(layer.memory_parameters(), lr=0.1)
    x = torch.randn(5, 12, device="cuda")
    layer(x).square().sum().backward()
    opt.step()
    cpu = small()
    cpu.load_state_dict(layer.state_dict())
    with torch.no_grad():
        cpu.memory_values.copy_(layer.memory_values.cpu())
    torch.testing.assert_close(cpu.eval()(x.cpu()), layer.eval()(x).cpu(), rtol=1e-4, atol=1e-5)
