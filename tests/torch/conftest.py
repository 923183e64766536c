"""Fixtures for memstore_torch tests: tiny dims, one thread, a fresh SQLite store per test."""

from __future__ import annotations

import pytest
import torch

from memstore import Store


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'mem.db'}")
    yield s
    s.close()


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'mem.db'}"
