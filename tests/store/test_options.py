"""CollectionOptions: the one list of collection options (defaults, validation), and its users:
Store.create_collection / get_or_create_collection, the catalog, the CLI's ``import``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from memstore import CollectionOptions, CollectionSpec, errors
from memstore.cli_store import import_command
from memstore_gpt2.cli import main


def test_defaults_and_normalisation():
    options = CollectionOptions(key_dim=np.int64(4))
    assert options == CollectionOptions(
        key_dim=4,
        value_dim=4,  # None means key_dim
        metric="l2",
        lrfu_lambda=0.5,
        capacity=None,
        index="exact",
        oversample=8,
    )
    assert type(options.key_dim) is int and type(options.lrfu_lambda) is float
    assert CollectionOptions(key_dim=4, lrfu_lambda=1).lrfu_lambda == 1.0
    assert CollectionOptions.defaults() == {
        "value_dim": None,
        "metric": "l2",
        "lrfu_lambda": 0.5,
        "capacity": None,
        "index": "exact",
        "oversample": 8,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.metric = "ip"  # validated once, so it must not change afterwards


@pytest.mark.parametrize(
    "options,parameter",
    [
        ({"key_dim": 0}, "key_dim"),
        ({"key_dim": True}, "key_dim"),
        ({"key_dim": 4.0}, "key_dim"),
        ({"key_dim": 4, "value_dim": -1}, "value_dim"),
        ({"key_dim": 4, "lrfu_lambda": 1.5}, "lrfu_lambda"),
        ({"key_dim": 4, "lrfu_lambda": float("nan")}, "lrfu_lambda"),
        ({"key_dim": 4, "lrfu_lambda": "half"}, "lrfu_lambda"),
        ({"key_dim": 4, "capacity": 0}, "capacity"),
        ({"key_dim": 4, "oversample": 0}, "oversample"),
    ],
)
def test_a_bad_option_names_its_parameter(options, parameter):
    with pytest.raises(errors.InvalidInputError) as caught:
        CollectionOptions(**options)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter} ")


def test_unknown_metric_and_index_keep_their_messages():
    with pytest.raises(errors.InvalidInputError, match="unknown metric 'dot': use one of l2"):
        CollectionOptions(key_dim=4, metric="dot")
    with pytest.raises(errors.InvalidInputError, match="unknown index 'annoy'"):
        CollectionOptions(key_dim=4, index="annoy")


def test_a_spec_is_identity_plus_options(store):
    options = CollectionOptions(key_dim=6, value_dim=2, metric="ip", capacity=9, oversample=3)
    coll = store.create_collection("c", options)
    assert isinstance(coll.spec, CollectionSpec) and coll.spec.name == "c"
    assert coll.spec.options == options
    assert store.collection("c").spec == coll.spec  # read back from the catalog
    with pytest.raises(TypeError, match="not both"):
        store.create_collection("d", options, key_dim=6)


def test_get_or_create_rejects_options_that_differ_from_the_stored_ones(store):
    store.create_collection("c", key_dim=4, value_dim=2, metric="ip", capacity=10)
    same = store.get_or_create_collection("c", key_dim=4, value_dim=2, metric="ip")
    assert same.spec.capacity == 10  # options not given are not compared
    assert store.get_or_create_collection("c").key_dim == 4
    assert store.get_or_create_collection("c", key_dim=4).value_dim == 2  # value_dim not given
    with pytest.raises(errors.DimensionMismatchError, match=r"value_dim 2, not 4"):
        store.get_or_create_collection("c", key_dim=4, value_dim=None)  # None means key_dim
    with pytest.raises(errors.DimensionMismatchError, match=r"key_dim 4, not 5"):
        store.get_or_create_collection("c", key_dim=5, value_dim=2)
    with pytest.raises(errors.InvalidInputError, match=r"metric ip, not l2") as info:
        store.get_or_create_collection("c", key_dim=4, value_dim=2, metric="l2")
    assert not isinstance(info.value, errors.DimensionMismatchError)
    with pytest.raises(errors.InvalidInputError, match=r"capacity 10, not 20"):
        store.get_or_create_collection("c", capacity=20)
    with pytest.raises(errors.InvalidInputError, match="oversample"):
        store.get_or_create_collection("c", oversample=0)  # validated though it exists
    # An options object gives every option: all of them are compared.
    stored = store.collection("c").spec.options
    assert store.get_or_create_collection("c", stored).spec.options == stored
    with pytest.raises(errors.InvalidInputError, match="lrfu_lambda 0.5, not 0.25"):
        store.get_or_create_collection("c", dataclasses.replace(stored, lrfu_lambda=0.25))
    assert len(store.list_collections()) == 1


def test_cli_import_defaults_are_the_dataclass_defaults():
    defaults = CollectionOptions.defaults()
    cli = {p.name: p.default for p in import_command.params if p.name in defaults}
    # Every option a new collection takes from the command line (value_dim comes from the file).
    assert set(cli) == set(defaults) - {"value_dim"}
    assert cli == {name: defaults[name] for name in cli}


def test_cli_import_creates_with_the_flags_and_speaks_flags_in_errors(tmp_path):
    keys = tmp_path / "keys.npy"
    np.save(keys, np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    db = tmp_path / "cli.db"
    runner = CliRunner()
    bad = runner.invoke(main, ["import", str(db), "c", "--keys", str(keys), "--oversample", "0"])
    assert bad.exit_code == 1 and "Error: --oversample must be a positive integer" in bad.output
    ok = runner.invoke(
        main, ["import", str(db), "c", "--keys", str(keys), "--metric", "ip", "--capacity", "7"]
    )
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(main, ["import", str(db), "c", "--keys", str(keys), "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["rows"] == 10  # defaults not "given"
    info = json.loads(runner.invoke(main, ["inspect", str(db), "c", "--json"]).output)
    assert (info["metric"], info["capacity"], info["index"], info["oversample"]) == (
        "ip",
        7,
        "exact",
        8,
    )
