"""Row-wise Adagrad: an optimizer for huge tables trained by sparse gradients.

A product-key memory of a million rows touches a few hundred thousand of them per step. Dense Adam
would read and write every row and keep two more copies of the table (6 GiB of moments beside
3 GiB of values at 1M x 768); ``torch.optim.SparseAdam`` updates only touched rows but still keeps
two moments per *element* (O(N d) state) and allocates them on the first step; ``torch.optim.
Adagrad`` with sparse gradients keeps one accumulator per element too. Row-wise Adagrad (the
optimizer of DLRM-style embedding tables, FBGEMM's ``rowwise_adagrad``) keeps **one float per
row**: the running sum of the row's mean squared gradient. Each step, for every row ``r`` with a
gradient ``g_r``::

    state[r] += mean(g_r ** 2)
    param[r] -= lr * g_r / (sqrt(state[r]) + eps)

Rows without a gradient are not read, written or decayed. The values of a paged memory are a
cache whose rows are slots, not table rows (:class:`~memstore_torch.paged_rows.PagedRows`, on the
Parameter as ``paged_rows``): the state is then kept per *table* row and found through the cache's
slot map, so a row's accumulator survives its eviction and paging never changes an update. The benchmark in docs/layers.md (Large
memory) measures it against SparseAdam and Adagrad on the same gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memstore.errors import bad_parameter

#: Rows updated per chunk. The scaled gradient is a temporary; a few MiB at a time come from the
#: allocator's free list, while one (rows x d) temporary (0.7 GB at 230k x 768) is fresh memory
#: whose page faults measured several times the update itself on CPU.
CHUNK_ROWS = 2048


class RowwiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (dim 0) of each parameter; sparse or dense gradients.

    A sparse gradient (``torch.sparse_coo``, as :class:`~memstore_torch.ProductKeyMemory`'s values
    receive) updates only its rows; a dense one updates every row. Parameters of more than two
    dimensions are treated as ``(rows, -1)``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise bad_parameter("lr", f"must be > 0, got {lr!r}")
        if not eps >= 0:
            raise bad_parameter("eps", f"must be >= 0, got {eps!r}")
        if not initial_accumulator_value >= 0:
            raise bad_parameter(
                "initial_accumulator_value", f"must be >= 0, got {initial_accumulator_value!r}"
            )
        defaults = {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value}
        super().__init__(params, defaults)

    def _state_for(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = 0
            pager = getattr(param, "paged_rows", None)
            state["sum"] = torch.full(
                (param.shape[0] if pager is None else pager.n_rows,),
                float(group["initial_accumulator_value"]),
                dtype=torch.promote_types(param.dtype, torch.float32),  # bf16 rows: fp32 sums
                device=param.device,
            )
        return state

    @torch.no_grad()
    def reset_rows(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Forget the accumulated gradients of ``rows`` of ``param`` (back to the initial value),
        for rows given new content (``ProductKeyMemory.reuse_rows``); table rows, also when
        ``param`` is a paged cache."""
        state = self.state.get(param)
        if not state:
            return
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        state["sum"][rows.to(state["sum"].device)] = float(group["initial_accumulator_value"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self._state_for(param, group)
                state["step"] += 1
                accumulator = state["sum"]
                table = param.view(param.shape[0], -1)
                pager = getattr(param, "paged_rows", None)
                if grad.is_sparse or pager is not None:
                    if grad.is_sparse:
                        rows, g = _sparse_rows(grad)
                    else:  # a dense gradient of a cache: its occupied slots
                        rows = (pager.rows_of(torch.arange(table.shape[0])) >= 0).nonzero()[:, 0]
                        rows = rows.to(grad.device)
                        g = grad.reshape(table.shape)[rows]
                    if rows.numel() == 0:
                        continue
                    g = g.reshape(rows.shape[0], -1)
                    state_rows = rows if pager is None else pager.rows_of(rows).to(rows.device)
                    accumulator.index_add_(0, state_rows, _mean_square(g, accumulator.dtype))
                    scale = accumulator[state_rows].sqrt_().add_(eps).reciprocal_().mul_(-lr)
                    for start in range(0, rows.shape[0], CHUNK_ROWS):
                        part = slice(start, start + CHUNK_ROWS)
                        table.index_add_(0, rows[part], g[part] * scale[part, None].to(g.dtype))
                else:
                    g = grad.reshape(table.shape)
                    accumulator.add_(_mean_square(g, accumulator.dtype))
                    scale = accumulator.sqrt().add_(eps).reciprocal_().mul_(-lr)
                    for start in range(0, table.shape[0], CHUNK_ROWS):
                        part = slice(start, start + CHUNK_ROWS)
                        table[part].add_(g[part] * scale[part, None].to(g.dtype))
        return loss


def _sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, their gradients) of a sparse COO gradient.

    Autograd's accumulation drops the "coalesced" flag of a gradient that had it, and coalescing
    again sorts every value (about a second at 230k rows x 768). Indices that are strictly
    increasing are coalesced whatever the flag says, so only an accumulated gradient (two
    backward passes before a step) pays for the sort.
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _mean_square(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mean(g ** 2) per row in ``dtype`` (at least g's precision), without a temporary of g's
    size."""
    return torch.linalg.vector_norm(g, dim=1, dtype=dtype).square_().div_(g.shape[1])
