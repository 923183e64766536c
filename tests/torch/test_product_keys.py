"""Product-key top-k equals brute force over all N = n1 * n2 implicit keys, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.errors import InvalidInputError
from memstore_torch import product_keys
from memstore_torch.product_keys import best_first, candidate_pairs, product_topk


@pytest.fixture(autouse=True, params=["full-search", "two-stage"])
def search_route(request, monkeypatch):
    """Every test under both routes for equal halves: all n^2 sums at once (small calls) and
    the two-stage candidate search (larger ones), by moving the limit between them."""
    if request.param == "two-stage":
        monkeypatch.setattr(product_keys, "FULL_SEARCH_SUMS", 0)
    return request.param


def brute_force(s1: np.ndarray, s2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sum s1[i] + s2[j] (row i * n2 + j), ordered by higher score, then lower row."""
    m, n1 = s1.shape
    n2 = s2.shape[1]
    full = (s1[:, :, None] + s2[:, None, :]).reshape(m, n1 * n2)  # the N explicit keys' scores
    rows = np.arange(n1 * n2)
    out_rows = np.stack([np.lexsort((rows, -full[r]))[:k] for r in range(m)])
    return np.take_along_axis(full, out_rows, 1), out_rows


def check(s1: np.ndarray, s2: np.ndarray, k: int) -> None:
    scores, rows = product_topk(torch.from_numpy(s1), torch.from_numpy(s2), k)
    want_scores, want_rows = brute_force(s1, s2, k)
    np.testing.assert_array_equal(rows.numpy(), want_rows)
    np.testing.assert_array_equal(scores.numpy(), want_scores)


@pytest.mark.parametrize(
    "n1,n2,k", [(16, 16, 8), (32, 32, 32), (7, 13, 5), (3, 40, 12), (5, 5, 25)]
)
def test_real_valued_scores_equal_brute_force(n1, n2, k):
    g = torch.Generator().manual_seed(n1 * 100 + n2)
    s1 = torch.randn(64, n1, generator=g, dtype=torch.float64).numpy()
    s2 = torch.randn(64, n2, generator=g, dtype=torch.float64).numpy()
    check(s1, s2, k)


@pytest.mark.parametrize("n1,n2,k", [(16, 16, 8), (8, 8, 32), (4, 9, 36), (10, 3, 1)])
def test_ties_go_to_the_lower_row_number(n1, n2, k):
    """Small integer scores: sums are exact in float32 and ties are everywhere, including at the
    k-th place, so a tie-order that differs from brute force would show."""
    rng = np.random.default_rng(n1 + n2 + k)
    s1 = rng.integers(-2, 3, (200, n1)).astype(np.float32)
    s2 = rng.integers(-2, 3, (200, n2)).astype(np.float32)
    check(s1, s2, k)


def test_all_equal_scores_give_the_first_rows():
    scores, rows = product_topk(torch.zeros(3, 10), torch.zeros(3, 10), 12)
    assert rows.tolist() == [list(range(12))] * 3
    assert scores.abs().sum() == 0


@settings(max_examples=150, deadline=None)
@given(
    n1=st.integers(1, 9),
    n2=st.integers(1, 9),
    data=st.data(),
)
def test_property_equals_brute_force(n1, n2, data):
    k = data.draw(st.integers(1, n1 * n2))
    m = data.draw(st.integers(1, 4))
    values = st.integers(-3, 3)
    s1 = np.array(data.draw(st.lists(values, min_size=m * n1, max_size=m * n1)), np.float32)
    s2 = np.array(data.draw(st.lists(values, min_size=m * n2, max_size=m * n2)), np.float32)
    check(s1.reshape(m, n1), s2.reshape(m, n2), k)


def test_candidate_pairs_are_the_rank_pairs_with_product_at_most_k():
    a, b = candidate_pairs(32, 32, 32)
    assert len(a) == 119  # sum over a of floor(32 / a)
    assert bool(((a + 1) * (b + 1) <= 32).all())
    a, b = candidate_pairs(3, 5, 100)  # all pairs when k >= k1 * k2
    assert len(a) == 15


def test_best_first_orders_ties_by_id():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert best_first(scores, 3).tolist() == [[1, 2, 4]]
    ids = torch.tensor([[10, 50, 40, 0, 30]])
    assert best_first(scores, 3, ids).tolist() == [[4, 2, 1]]  # ids 30, 40, 50
    assert best_first(scores, 5, ids).tolist() == [[4, 2, 1, 3, 0]]


def test_gradients_reach_the_selected_halves():
    """Each returned score is s1[i] + s2[j]: gradcheck with well-separated scores (so the
    selection does not change under gradcheck's perturbations)."""
    g = torch.Generator().manual_seed(3)
    s1 = (torch.randperm(12, generator=g).double().reshape(2, 6)).requires_grad_(True)
    s2 = (torch.randperm(14, generator=g).double().reshape(2, 7) * 0.37).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: product_topk(a, b, 5)[0], (s1, s2))
    scores, rows = product_topk(s1, s2, 5)
    scores.sum().backward()
    # every selected (i, j) adds one to s1[i] and one to s2[j]
    want1 = torch.zeros_like(s1)
    want2 = torch.zeros_like(s2)
    for r in range(2):
        for row in rows[r].tolist():
            want1[r, row // 7] += 1
            want2[r, row % 7] += 1
    assert torch.equal(s1.grad, want1)
    assert torch.equal(s2.grad, want2)


def test_gradients_reach_the_selected_halves_of_equal_size():
    g = torch.Generator().manual_seed(4)
    s1 = torch.randperm(14, generator=g).double().reshape(2, 7).requires_grad_(True)
    s2 = (torch.randperm(14, generator=g).double().reshape(2, 7) * 0.37).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: product_topk(a, b, 5)[0], (s1, s2))
    with torch.no_grad():  # the search without a graph gives the same answer
        plain = product_topk(s1.detach(), s2.detach(), 5)
    graphed = product_topk(s1, s2, 5)
    assert torch.equal(plain[1], graphed[1]) and torch.equal(plain[0], graphed[0].detach())


@pytest.mark.parametrize(
    "s1,s2,k",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), 0),
        (torch.zeros(2, 3), torch.zeros(2, 3), 10),
        (torch.zeros(2, 3), torch.zeros(3, 3), 1),
        (torch.zeros(6), torch.zeros(6), 1),
    ],
)
def test_bad_arguments(s1, s2, k):
    with pytest.raises(InvalidInputError):
        product_topk(s1, s2, k)


def test_stacked_halves_search_equals_brute_force():
    """The stacked form a layer uses: every sum ordered by higher score, then lower row."""
    from memstore_torch.product_keys import product_topk_stacked

    g = torch.Generator().manual_seed(5)
    s1 = torch.randint(0, 4, (6, 9), generator=g).float()  # many ties
    s2 = torch.randint(0, 4, (6, 9), generator=g).float()
    sums = (s1[:, :, None] + s2[:, None, :]).reshape(6, 81)
    for k in (1, 7, 81):
        scores, rows = product_topk_stacked(torch.stack([s1, s2], dim=1), k)
        for r in range(6):
            order = sorted(range(81), key=lambda j: (-float(sums[r, j]), j))[:k]
            assert rows[r].tolist() == order
            assert scores[r].tolist() == sums[r, order].tolist()
    with pytest.raises(InvalidInputError, match="halves must be"):
        product_topk_stacked(torch.zeros(3, 4), 2)
