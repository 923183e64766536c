"""``trace_prompt``: the rows each token read are exactly the forward pass's own selection."""

from __future__ import annotations

import pytest
import torch

from memstore.errors import InvalidInputError
from memstore_gpt2.mindset.trace import trace_prompt
from tests.distill.mindset.layer_io import layer_io

PROMPT = "The for statement is used to iterate"


def test_trace_is_the_forward_selection_and_rebuilds_each_output(mindset):
    trace = trace_prompt(mindset, PROMPT, top=0)
    caught = layer_io(mindset, PROMPT)
    assert set(trace.layers) == {"layer0", "layer1"}
    for name, layer_trace in trace.layers.items():
        layer = mindset.layer(name).layer
        keys, values = layer.index.keys.detach(), layer.index.values.detach()
        slot = {int(i): s for s, i in enumerate(layer.index.ids.tolist())}
        assert layer_trace.selected == 16
        for t, token_ids in enumerate(layer_trace.ids):
            assert len(token_ids) == 16  # every row the top-k read, each once
            rebuilt = layer.out_bias.detach().clone()
            for rid, w in zip(token_ids, layer_trace.weights[t], strict=True):
                rebuilt += w * values[slot[rid]]
            x_in, out = caught[name][0][t], caught[name][1][t]
            torch.testing.assert_close(rebuilt, out, atol=1e-4, rtol=0)
            # the same rows an independent top-k over the layer's scores picks
            scores = x_in @ keys[:, :-1].T + keys[:, -1]
            expected = set(layer.index.ids[scores.topk(16).indices].tolist())
            assert set(token_ids) == expected


def test_top_rows_are_the_largest_contributions_in_order(mindset):
    full = trace_prompt(mindset, PROMPT, top=0)
    cut = trace_prompt(mindset, PROMPT, top=3)
    for name in full.layers:
        for t in range(len(full.tokens)):
            sizes = full.layers[name].contributions[t]
            assert sizes == sorted(sizes, reverse=True)
            assert cut.layers[name].ids[t] == full.layers[name].ids[t][:3]
            # the size is |weight| x ||value||: the length of what the row added
            layer = mindset.layer(name).layer
            rid, w = full.layers[name].ids[t][0], full.layers[name].weights[t][0]
            value = layer.index.values.detach()[layer.index.slots_of([rid])][0]
            assert sizes[0] == pytest.approx(abs(w) * float(value.norm()), rel=1e-3)


def test_json_shape_and_rows_read_at_every_token(mindset):
    trace = trace_prompt(mindset, PROMPT, layers="layer1", top=4)
    data = trace.to_json()
    assert list(data["layers"]) == ["layer1"]
    assert len(data["tokens"]) == len(data["token_ids"]) == len(data["layers"]["layer1"]["ids"])
    assert "".join(data["tokens"]) == PROMPT
    layer = data["layers"]["layer1"]
    assert all(len(row) == 4 for row in layer["ids"] + layer["weights"])
    full = trace_prompt(mindset, PROMPT, layers="1", top=0).layers["layer1"]
    every = set.intersection(*(set(row) for row in full.ids))
    assert layer["every_token"] == sorted(every)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "word " * 40}, "prompt"),  # more tokens than the tiny model's 32 positions
        ({"prompt": "x", "layers": "layer7"}, "layers"),
        ({"prompt": "x", "top": -1}, "top"),
    ],
)
def test_bad_input_names_the_parameter(mindset, kwargs, parameter):
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidInputError) as info:
        trace_prompt(mindset, prompt, **kwargs)
    assert info.value.parameter == parameter


def test_associative_student_is_traced_too(associative_student_dir):
    from memstore_gpt2.mindset.session import Mindset

    with Mindset.open(associative_student_dir) as mindset:
        trace = trace_prompt(mindset, PROMPT, top=0)
        for name, layer_trace in trace.layers.items():
            stored = set(mindset.layer(name).layer.index.ids.tolist())
            assert stored, "training inserted rows"
            assert layer_trace.selected == 16 * 2  # k x heads
            for token_ids, sizes in zip(layer_trace.ids, layer_trace.contributions, strict=True):
                assert token_ids and set(token_ids) <= stored
                assert sizes == sorted(sizes, reverse=True)
