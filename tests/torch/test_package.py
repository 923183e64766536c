"""The package's lazy public names: importable on demand, torch not imported at import time."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
