"""Layer configs: one dataclass per memory layer, validated once, saved as asdict, loaded back
(also from the dicts earlier versions saved in student manifests)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from memstore import errors
from memstore_gpt2.student import memory_class
from memstore_torch import AssociativeConfig, AssociativeMemory, FeaturalConfig, FeaturalMemory
from memstore_torch.config import WEIGHTINGS
from memstore_torch.functions import make_weight_fn

# The "config" dicts a student manifest held before layer configs were dataclasses (same keys).
OLD_FEATURAL = """{
  "type": "FeaturalMemory", "d_model": 8, "n_rows": 16, "k": 4, "heads": 2, "key_dim": 6,
  "value_dim": 5, "weighting": "gelu_tanh", "temperature": 0.5, "trainable_rows": true,
  "novel": null, "recombine": 0.25, "collection": "layer3", "lrfu_lambda": 0.25,
  "dropout": 0.0, "update_in_eval": false
}"""
OLD_ASSOCIATIVE = """{
  "type": "AssociativeMemory", "d_model": 8, "heads": 2, "k": 3, "key_dim": 4, "value_dim": 4,
  "capacity": 32, "novel": -1.0, "recombine": null, "collection": "assoc", "trainable_rows": true,
  "lrfu_lambda": 0.5, "update_in_eval": false, "st_query": false, "st_insert": true
}"""


def _manifest_options(text: str) -> dict:
    saved = json.loads(text)
    return {k: v for k, v in saved.items() if k not in ("type", "collection")}


def test_keyword_construction_builds_the_config():
    layer = FeaturalMemory(8, n_rows=16, k=4, heads=2, novel=0.5)
    assert layer.config == FeaturalConfig(d_model=8, n_rows=16, k=4, heads=2, novel=0.5)
    same = FeaturalMemory(FeaturalConfig(d_model=8, n_rows=16, k=4, heads=2, novel=0.5))
    assert same.config == layer.config
    assert FeaturalMemory(layer.config, k=2).config.k == 2  # keywords override a config
    assert FeaturalMemory(d_model=8).config.d_model == 8
    # The attributes code reads keep working: every config field, mirrored.
    assert (layer.d_model, layer.n_rows, layer.k, layer.heads, layer.novel) == (8, 16, 4, 2, 0.5)
    assert (layer.head_dim, layer.row_value_dim, layer.dropout_p) == (4, 8, 0.0)
    assert isinstance(layer.dropout, torch.nn.Dropout)  # the submodule keeps its name
    assoc = AssociativeMemory(12, heads=3, k=2, capacity=9)
    assert assoc.config == AssociativeConfig(12, heads=3, k=2, capacity=9)
    assert (assoc.key_dim, assoc.value_dim, assoc.capacity) == (4, 4, 9)  # resolved widths
    with pytest.raises(TypeError):
        FeaturalMemory(8, n_row=16)  # a misspelt option is not silently ignored
    with pytest.raises(TypeError, match="FeaturalConfig or d_model"):
        FeaturalMemory(assoc.config)


def test_live_options_change_through_a_validated_copy_others_are_fixed():
    layer = FeaturalMemory(4, n_rows=8, k=2)
    before = layer.config
    layer.novel = -1.0
    layer.k = 3
    assert (layer.config.novel, layer.config.k) == (-1.0, 3) and before.novel is None
    with pytest.raises(errors.InvalidInputError) as caught:
        layer.k = 0
    assert caught.value.parameter == "k" and layer.k == 3
    with pytest.raises(AttributeError, match="n_rows is fixed"):
        layer.n_rows = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.config.k = 1
    assoc = AssociativeMemory(8, heads=2, k=2, capacity=16)
    assoc.st_query = False
    assert assoc.config.st_query is False


@pytest.mark.parametrize(
    "cls,options,parameter",
    [
        (FeaturalMemory, {"d_model": 0}, "d_model"),
        (FeaturalMemory, {"d_model": 6, "n_rows": -1}, "n_rows"),
        (FeaturalMemory, {"d_model": 6, "k": 2.5}, "k"),
        (FeaturalMemory, {"d_model": 6, "heads": 4}, "heads"),
        (FeaturalMemory, {"d_model": 6, "key_dim": 0}, "key_dim"),
        (FeaturalMemory, {"d_model": 6, "weighting": "sigmoid"}, "weighting"),
        (FeaturalMemory, {"d_model": 6, "temperature": 0.0}, "temperature"),
        (FeaturalMemory, {"d_model": 6, "novel": float("nan")}, "novel"),
        (FeaturalMemory, {"d_model": 6, "recombine": "near"}, "recombine"),
        (FeaturalMemory, {"d_model": 6, "lrfu_lambda": 2}, "lrfu_lambda"),
        (FeaturalMemory, {"d_model": 6, "dropout": 1.5}, "dropout"),
        (FeaturalMemory, {"d_model": 6, "trainable_rows": "yes"}, "trainable_rows"),
        (AssociativeMemory, {"d_model": 10, "heads": 3}, "heads"),
        (AssociativeMemory, {"d_model": 8, "capacity": 0}, "capacity"),
        (AssociativeMemory, {"d_model": 8, "value_dim": -2}, "value_dim"),
        (AssociativeMemory, {"d_model": 8, "st_insert": None}, "st_insert"),
    ],
)
def test_a_bad_option_names_its_parameter(cls, options, parameter):
    with pytest.raises(errors.InvalidInputError) as caught:
        cls(**options)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter} ")


def test_every_accepted_weighting_has_a_weight_function():
    for weighting in WEIGHTINGS:
        FeaturalConfig(d_model=4, weighting=weighting)
        assert callable(make_weight_fn(weighting, 1.0))


def test_saved_config_is_asdict_and_rebuilds_the_same_layer(store):
    x = torch.randn(2, 3, 8)
    layer = FeaturalMemory(
        8, n_rows=16, k=4, heads=2, key_dim=6, value_dim=5, temperature=0.5, lrfu_lambda=0.25
    )
    layer.attach(store, "f")
    saved = json.loads(json.dumps(layer.extra_config()))  # what a manifest stores
    assert saved == {
        "type": "FeaturalMemory",
        **dataclasses.asdict(layer.config),
        "collection": "f",
    }
    again = FeaturalMemory.from_config(saved, store)
    again.load_state_dict(layer.state_dict())
    assert again.config == layer.config
    torch.testing.assert_close(again.eval()(x), layer.eval()(x), atol=1e-6, rtol=0)

    assoc = AssociativeMemory(8, heads=2, k=3, capacity=32, novel=-1.0, store=store, collection="a")
    assoc.train()(torch.randn(1, 4, 8))
    assoc.flush()
    saved = json.loads(json.dumps(assoc.extra_config()))
    rebuilt = AssociativeMemory.from_config(saved, store)
    rebuilt.load_state_dict(assoc.state_dict())
    assert rebuilt.config == assoc.config and len(rebuilt.index) == len(assoc.index)
    torch.testing.assert_close(rebuilt.eval()(x), assoc.eval()(x), atol=1e-6, rtol=0)


def test_configs_saved_by_earlier_versions_still_load(store):
    x = torch.randn(2, 3, 8)
    featural = FeaturalMemory(
        FeaturalConfig.from_dict(_manifest_options(OLD_FEATURAL)),
        store=store,
        collection="layer3",
    )
    assoc = AssociativeMemory(
        AssociativeConfig.from_dict(_manifest_options(OLD_ASSOCIATIVE)),
        store=store,
        collection="assoc",
    )
    assoc.train()(torch.randn(1, 4, 8))
    assoc.flush()
    for old, layer in ((OLD_FEATURAL, featural), (OLD_ASSOCIATIVE, assoc)):
        saved = json.loads(old)
        # the way build_student_skeleton loads a manifest entry
        again = memory_class(saved["type"]).from_config(saved, store)
        assert again.collection_name == saved["collection"]
        assert dataclasses.asdict(again.config) == _manifest_options(old)
        assert again.extra_config() == saved  # and it saves the same dict again
        again.load_state_dict(layer.state_dict())
        torch.testing.assert_close(again.eval()(x), layer.eval()(x), atol=1e-6, rtol=0)


def test_a_saved_config_with_a_foreign_type_or_key_is_rejected(store):
    saved = json.loads(OLD_FEATURAL)
    with pytest.raises(errors.InvalidInputError, match="not AssociativeMemory"):
        AssociativeMemory.from_config(saved, store)
    with pytest.raises(errors.InvalidInputError, match="unknown FeaturalConfig option.*'rows'"):
        FeaturalMemory.from_config({**saved, "rows": 3}, store)


def test_a_layer_refuses_a_collection_of_another_shape_or_metric(store):
    store.create_collection("l2", key_dim=5, value_dim=8, metric="l2")
    store.create_collection("narrow", key_dim=3, value_dim=8, metric="ip")
    with pytest.raises(errors.InvalidInputError, match=r"metric l2, not ip"):
        FeaturalMemory(8, n_rows=4, heads=2, store=store, collection="l2")
    with pytest.raises(errors.DimensionMismatchError, match=r"key_dim 3, not 5"):
        FeaturalMemory(8, n_rows=4, heads=2, store=store, collection="narrow")
    # A new collection gets the layer's options, capacity and LRFU lambda included.
    layer = FeaturalMemory(8, n_rows=4, heads=2, lrfu_lambda=0.75, store=store, collection="new")
    assert layer.collection.spec.options == layer.collection_options()
    assert (layer.collection.capacity, layer.collection.lrfu_lambda) == (4, 0.75)
