"""--memory-budget: bytes or a share of rows, turned into cache rows per paged table."""

from __future__ import annotations

import pytest

from memstore.errors import InvalidInputError
from memstore_torch import MemoryBudget, PagedRows


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("512MB", MemoryBudget(bytes=512 * 10**6)),
        ("1.5GiB", MemoryBudget(bytes=int(1.5 * 2**30))),
        ("4096", MemoryBudget(bytes=4096)),
        ("300b", MemoryBudget(bytes=300)),
        (" 10% ", MemoryBudget(share=0.1)),
        ("100%", MemoryBudget(share=1.0)),
    ],
)
def test_budgets_parse(text, want):
    assert MemoryBudget.parse(text) == want


@pytest.mark.parametrize("text", ["abc", "10 apples", "0%", "150%", "-5MB", "0", ""])
def test_bad_budgets_name_the_parameter(text):
    with pytest.raises(InvalidInputError) as info:
        MemoryBudget.parse(text)
    assert info.value.parameter == "memory_budget"


def test_a_share_applies_to_each_table_and_all_rows_means_no_cache():
    tables = [(1000, 100), (10, 100)]
    assert MemoryBudget(share=0.1).cache_rows(tables) == [100, 1]
    assert MemoryBudget(share=1.0).cache_rows(tables) == [None, None]


def test_bytes_are_split_in_proportion_to_the_tables():
    row = PagedRows.bytes_per_slot(2, 128)
    assert row == 128 * 4 + 2 * 4 + 58
    tables = [(1000, row), (3000, row)]
    rows = MemoryBudget(bytes=400 * row).cache_rows(tables)
    assert rows == [100, 300]
    assert MemoryBudget(bytes=4000 * row).cache_rows(tables) == [None, None]  # everything fits
    assert MemoryBudget(bytes=1).cache_rows(tables) == [1, 1]  # at least one row each
