"""The package's lazy public names: importable on demand, torch not imported at import time."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import memstore_torch


def test_import_does_not_import_torch():
    code = "import sys, memstore_torch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(memstore_torch._EXPORTS))
def test_every_public_name_resolves(name):
    assert getattr(memstore_torch, name).__name__ == name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        memstore_torch.NoSuchLayer  # noqa: B018


def test_layer_library_imports_no_transformers():
    """The layer library works in any torch model: using every public name and module pulls in
    neither ``transformers`` nor ``tokenizers`` (the GPT-2 application lives in memstore_gpt2)."""
    code = (
        "import sys, pkgutil, importlib, memstore_torch\n"
        "for m in pkgutil.iter_modules(memstore_torch.__path__):\n"
        "    importlib.import_module('memstore_torch.' + m.name)\n"
        "for name in memstore_torch._EXPORTS: getattr(memstore_torch, name)\n"
        "bad = [m for m in ('transformers', 'tokenizers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_layers_are_found_anywhere_in_a_model(tmp_path):
    """Whole-model operations find memory layers by type, not by GPT-2 slot: a layer nested in
    an arbitrary module is flushed, and its rows are split from the dense parameters."""
    from torch import nn

    from memstore import Store
    from memstore_torch import FeaturalMemory, flush_memory, memory_layers, split_parameters

    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        inner = FeaturalMemory(8, n_rows=16, k=4, store=store, collection="deep")
        model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), inner))
        assert list(memory_layers(model)) == ["1.1"]
        dense, memory, sparse = split_parameters(model)
        assert sparse == []
        assert {id(p) for p in memory} == {id(inner.memory_keys), id(inner.memory_values)}
        assert all(id(p) not in {id(q) for q in memory} for p in dense)
        with torch.no_grad():
            inner.memory_values[:3] += 1.0  # what an optimizer step does
        report = flush_memory(model)
        assert report["1.1"]["upserts"] == 3
        stored = store.collection("deep").get(inner.index.ids[:3].numpy())
        assert np.allclose(stored.values, inner.memory_values[:3].detach().numpy())
