"""The sparse row read (exact gradients, sparse over the rows read) and row-wise Adagrad."""

from __future__ import annotations

import pytest
import torch

from memstore.errors import InvalidInputError
from memstore_torch import RowwiseAdagrad, sparse_row_read
from memstore_torch.optim import CHUNK_ROWS


def reference_read(weights, rows, values):
    """The same read through a dense gather: (B, P, d) rows, weighted and summed."""
    return (weights[..., None] * values[rows]).sum(1)


def test_forward_and_gradients_equal_the_dense_gather():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(50, 6, generator=g, dtype=torch.float64)
    rows = torch.randint(0, 50, (7, 9), generator=g)  # repeats within and across tokens
    weights = torch.rand(7, 9, generator=g, dtype=torch.float64)
    grad_out = torch.randn(7, 6, generator=g, dtype=torch.float64)

    v1, w1 = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = sparse_row_read(w1, rows, v1)
    out.backward(grad_out)
    v2, w2 = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    ref = reference_read(w2, rows, v2)
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert v1.grad.is_sparse
    torch.testing.assert_close(v1.grad.to_dense(), v2.grad)
    # one gradient row per distinct row read, in increasing order
    rows_with_grad = v1.grad._indices()[0]
    assert torch.equal(rows_with_grad, torch.unique(rows))
    assert v1.grad._values().shape == (len(torch.unique(rows)), 6)


def test_gradcheck_weights():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(20, 3, generator=g, dtype=torch.float64)
    rows = torch.randint(0, 20, (4, 5), generator=g)
    weights = torch.rand(4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: sparse_row_read(w, rows, values), (weights,))


def dense_rowwise_adagrad(table, state, grad_rows, grads, lr, eps):
    """The reference, one touched row at a time."""
    for r, g in zip(grad_rows.tolist(), grads, strict=True):
        state[r] += (g * g).mean()
        table[r] -= lr * g / (state[r].sqrt() + eps)


def test_rowwise_adagrad_updates_touched_rows_like_the_reference():
    g = torch.Generator().manual_seed(3)
    table = torch.nn.Parameter(torch.randn(40, 5, generator=g, dtype=torch.float64))
    ref_table = table.detach().clone()
    ref_state = torch.zeros(40, dtype=torch.float64)
    opt = RowwiseAdagrad([table], lr=0.1, eps=1e-8)
    for step in range(4):
        rows = torch.randint(0, 40, (6, 3), generator=g)
        weights = torch.rand(6, 3, generator=g, dtype=torch.float64)
        grad_out = torch.randn(6, 5, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        sparse_row_read(weights, rows, table).backward(grad_out)
        touched = torch.unique(rows)
        dense = table.grad.to_dense()
        untouched_before = table.detach()[~torch.isin(torch.arange(40), touched)].clone()
        opt.step()
        dense_rowwise_adagrad(ref_table, ref_state, touched, dense[touched], 0.1, 1e-8)
        torch.testing.assert_close(table.detach(), ref_table)
        assert torch.equal(
            table.detach()[~torch.isin(torch.arange(40), touched)], untouched_before
        ), f"step {step}: an untouched row moved"
    state = opt.state[table]["sum"]
    assert state.shape == (40,)  # one float per row, not per element
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-6, atol=1e-7)


def test_accumulated_sparse_gradients_are_summed_per_row():
    """Two backward passes before a step: the accumulated gradient repeats rows (uncoalesced)."""
    table = torch.nn.Parameter(torch.zeros(10, 2))
    ref = torch.zeros(10, 2)
    rows = torch.tensor([[1, 3], [3, 5]])
    weights = torch.ones(2, 2)
    grad_out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for _ in range(2):
        sparse_row_read(weights, rows, table).backward(grad_out)
    assert not table.grad.is_coalesced()
    dense = table.grad.to_dense()
    RowwiseAdagrad([table], lr=1.0, eps=0.0).step()
    dense_rowwise_adagrad(ref, torch.zeros(10), torch.tensor([1, 3, 5]), dense[[1, 3, 5]], 1.0, 0)
    torch.testing.assert_close(table.detach(), ref)


def test_dense_gradients_update_every_row_and_chunks_cover_all_rows():
    n = CHUNK_ROWS + 37  # more rows than one chunk
    table = torch.nn.Parameter(torch.randn(n, 3, dtype=torch.float64))
    ref = table.detach().clone()
    table.grad = torch.randn(n, 3, dtype=torch.float64)
    RowwiseAdagrad([table], lr=0.5).step()
    dense_rowwise_adagrad(ref, torch.zeros(n, dtype=torch.float64), torch.arange(n), table.grad,
                          0.5, 1e-10)  # fmt: skip
    torch.testing.assert_close(table.detach(), ref)


def test_rows_with_many_gradient_rows_span_chunks():
    n = 3 * CHUNK_ROWS
    table = torch.nn.Parameter(torch.zeros(n, 2))
    rows = torch.arange(n).reshape(-1, 2)
    sparse_row_read(torch.ones(rows.shape), rows, table).backward(torch.ones(rows.shape[0], 2))
    RowwiseAdagrad([table], lr=0.1, eps=0.0).step()
    assert torch.allclose(table.detach(), torch.full((n, 2), -0.1))  # g / sqrt(g^2) = 1


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": -1.0}, {"eps": -1.0}, {"initial_accumulator_value": -1.0}]
)
def test_bad_optimizer_options(kwargs):
    with pytest.raises(InvalidInputError):
        RowwiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
