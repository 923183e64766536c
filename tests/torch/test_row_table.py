"""RowTable: the resident and the paged table of a product-key memory share one protocol."""

from __future__ import annotations

import inspect

import pytest
import torch

from memstore import Store
from memstore_torch import ProductKeyMemory
from memstore_torch.paged_rows import PagedRows
from memstore_torch.row_table import ResidentRows, RowTable, fetched_chunks

CONFIG = {"n_keys": 8, "heads": 2, "k": 4, "key_dim": 8}


def _members(protocol: type) -> set[str]:
    own = {name for name in vars(protocol) if not name.startswith("_")}
    return own | set(protocol.__annotations__)


@pytest.mark.parametrize("table", [ResidentRows, PagedRows])
def test_both_tables_implement_every_member_of_the_protocol(table):
    """ProductKeyMemory calls only RowTable members: a table lacking one would break it."""
    paged = PagedRows(None, 64, 16, key_dim=2, value_dim=4, lrfu_lambda=0.5)
    resident = ResidentRows(64, key_dim=2, value_dim=4, lrfu_lambda=0.5)
    instance = resident if table is ResidentRows else paged
    for name in _members(RowTable):
        assert hasattr(instance, name), f"{table.__name__} lacks {name}"
        wanted = getattr(RowTable, name, None)
        if inspect.isfunction(wanted):
            theirs = inspect.signature(getattr(table, name)).parameters
            for param in list(inspect.signature(wanted).parameters)[1:]:
                assert param in theirs, f"{table.__name__}.{name} lacks {param}"


def test_resident_rows_are_their_own_slots_in_one_chunk():
    table = ResidentRows(64, key_dim=2, value_dim=4, lrfu_lambda=0.5)
    rows = torch.tensor([5, 3, 5, 60])
    assert table.fetch(rows) is rows
    chunks = list(fetched_chunks(table, rows))
    assert len(chunks) == 1 and torch.equal(chunks[0][0], rows) and torch.equal(chunks[0][1], rows)
    assert table.prefetch(rows) is None


def test_paged_chunks_fit_half_the_cache(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        layer = ProductKeyMemory(12, store=store, collection="pk", cache_rows=10, **CONFIG)
        rows = torch.arange(0, 64, 3)
        sizes = []
        for chunk, slots in fetched_chunks(layer.index, rows):
            assert torch.equal(layer.index.rows_of(slots), chunk)  # read in, where it says
            sizes.append(chunk.numel())
        assert sizes == [5, 5, 5, 5, 2]
