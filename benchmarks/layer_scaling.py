"""The scaling table of benchmarks/layer.py: ProductKeyMemory from 1k to 1M rows vs the dense MLP.

For each width d and table size, in one process and interleaved (so load hits both alike):

* **forward + backward** of ``ProductKeyMemory(d, n_keys, heads, k, key_dim)`` (training mode, so
  its LRFU touches count; gradients to the input and every parameter, the values' sparse) against
  a GPT-2 MLP of ``n_inner = 4 d`` (the MLP it would replace);
* **the whole update**: the same plus the optimizer steps -- RowwiseAdagrad on the values and
  AdamW on the memory's dense weights, against AdamW on the MLP;
* **bytes per row** resident in memory (values, the index's per-row bookkeeping, the optimizer's
  per-row state, the sub-keys), **distinct rows read** in the step (what the update touches), and
  **recall@k** of the product search against brute force over the explicit keys of head 0.

Sizes are ``n_keys ** 2`` rows: 1k = 32^2, 16k = 128^2, 262k = 512^2, 1m = 1024^2. Each size is
built, measured and freed before the next (1M x 768 floats of values is 3 GiB).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from memstore_torch import ProductKeyMemory, RowwiseAdagrad
from memstore_torch.resident import ResidentIndex

#: Table sizes by name -> n_keys (rows = n_keys ** 2).
SIZES = {"1k": 32, "16k": 128, "262k": 512, "1m": 1024}


def parse_sizes(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}: choose from {', '.join(SIZES)}")
    return names


def dense_mlp(d: int) -> torch.nn.Module:
    cfg = GPT2Config(n_embd=d, n_inner=4 * d, resid_pdrop=0.0)
    return GPT2MLP(4 * d, cfg).train()


def one_step(module: torch.nn.Module, x: torch.Tensor, optimizers=()) -> tuple[float, float]:
    """Seconds of (forward + backward, the whole update including the optimizer steps)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    module(xg).square().mean().backward()
    t1 = time.perf_counter()
    for opt in optimizers:
        opt.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def resident_bytes(layer: ProductKeyMemory, optimizer: RowwiseAdagrad) -> int:
    """Bytes the memory holds in RAM: the index's row tensors (values, [i, j] keys, ids, LRFU
    state, flags), the optimizer's per-row state and the sub-keys."""
    index = layer.index
    total = sum(getattr(index, name).nbytes for name in ResidentIndex._ROW_TENSORS)
    total += sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return total + layer.sub_keys.nbytes


@torch.no_grad()
def recall_at_k(layer: ProductKeyMemory, x: torch.Tensor) -> float:
    """Share of head 0's product top-k found by brute force over the N explicit keys
    ``[C1[i], C2[j]]`` (scored as single float64 dot products, in blocks of sub-keys ``i``)."""
    cfg = layer.config
    n, k = cfg.n_keys, min(cfg.k, cfg.n_rows)
    q = layer.queries(x)[:, 0].double()  # (t, dk)
    c1, c2 = layer.sub_keys[0, 0].double(), layer.sub_keys[0, 1].double()
    best_s = torch.full((q.shape[0], 0), 0.0, dtype=torch.float64)
    best_r = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    block = max(1, 16_384 // n)
    for i0 in range(0, n, block):
        i = torch.arange(i0, min(n, i0 + block))
        keys = torch.cat([c1[i].repeat_interleave(n, 0), c2.repeat(len(i), 1)], dim=1)
        s = q @ keys.T  # (t, len(i) * n)
        rows = (i[:, None] * n + torch.arange(n)[None]).reshape(-1).expand(q.shape[0], -1)
        best_s = torch.cat([best_s, s], 1)
        best_r = torch.cat([best_r, rows], 1)
        top = best_s.topk(min(k, best_s.shape[1]), dim=1).indices
        best_s, best_r = best_s.gather(1, top), best_r.gather(1, top)
    _, found = layer.search(x)
    found = found[:, 0]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, best_r, strict=True))
    return hits / found.numel()


def measure_size(d: int, name: str, args, x: torch.Tensor) -> dict:
    n_keys = SIZES[name]
    torch.manual_seed(0)
    mlp = dense_mlp(d)
    mlp_opt = torch.optim.AdamW(mlp.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    layer = ProductKeyMemory(
        d, n_keys=n_keys, heads=args.heads, k=args.k, key_dim=args.key_dim
    ).train()
    build_s = time.perf_counter() - t0
    row_opt = RowwiseAdagrad(layer.memory_parameters(), lr=1e-2)
    dense_opt = torch.optim.AdamW(layer.dense_parameters(), lr=1e-4)
    pk_opts = (row_opt, dense_opt)
    for _ in range(args.warmup):
        one_step(mlp, x, (mlp_opt,))
        one_step(layer, x, pk_opts)
    times = {"mlp": [], "mlp_update": [], "mem": [], "mem_update": []}
    for _ in range(args.repeats):
        fb, whole = one_step(mlp, x, (mlp_opt,))
        times["mlp"].append(fb)
        times["mlp_update"].append(whole)
        fb, whole = one_step(layer, x, pk_opts)
        times["mem"].append(fb)
        times["mem_update"].append(whole)
    med = {key: statistics.median(v) for key, v in times.items()}
    with torch.no_grad():
        _, rows = layer.search(x)
    distinct = int(torch.unique(rows).numel())
    recall = recall_at_k(layer, x[: args.recall_tokens]) if args.recall_tokens else None
    row = {
        "d": d,
        "size": name,
        "rows": layer.n_rows,
        "n_keys": n_keys,
        "mlp_s": med["mlp"],
        "memory_s": med["mem"],
        "time_ratio": med["mem"] / med["mlp"],
        "mlp_update_s": med["mlp_update"],
        "memory_update_s": med["mem_update"],
        "update_ratio": med["mem_update"] / med["mlp_update"],
        "bytes_per_row": resident_bytes(layer, row_opt) / layer.n_rows,
        "value_bytes_per_row": layer.row_value_dim * layer.memory_values.element_size(),
        "reads_per_step": rows.numel(),
        "distinct_rows_read": distinct,
        "recall_at_k": recall,
        "build_s": build_s,
    }
    del layer, row_opt, dense_opt, pk_opts, mlp, mlp_opt
    gc.collect()
    return row


def scaling_table(args) -> dict:
    """Every (d, size) row plus the issue's summary keys."""
    table = []
    for d in [int(v) for v in args.scale_dims.split(",") if v.strip()]:
        x = torch.randn(args.scale_tokens, d, generator=torch.Generator().manual_seed(d))
        for name in parse_sizes(args.scale_rows):
            table.append(measure_size(d, name, args, x))
    ratio = {(r["d"], r["size"]): r["time_ratio"] for r in table}
    recalls = [r["recall_at_k"] for r in table if r["recall_at_k"] is not None]
    return {
        "scale_time_ratio_1m_d768": ratio.get((768, "1m")),
        "scale_time_ratio_1m_d256": ratio.get((256, "1m")),
        "scale_recall_at_k": min(recalls) if recalls else None,
        "scale_table": table,
        "scale_config": {
            "tokens": args.scale_tokens,
            "heads": args.heads,
            "k": args.k,
            "key_dim": args.key_dim,
            "repeats": args.repeats,
            "mlp": "GPT2MLP, n_inner = 4 d",
            "memory_optimizers": "RowwiseAdagrad (values) + AdamW (dense)",
            "mlp_optimizer": "AdamW",
        },
    }


def optimizer_comparison(args) -> dict:
    """Step time and state bytes of row-wise Adagrad, SparseAdam and Adagrad on one sparse
    gradient of the values (the first step of each separately: it allocates the state)."""
    d, n_keys = args.optim_dim, SIZES[args.optim_rows]
    torch.manual_seed(0)
    layer = ProductKeyMemory(d, n_keys=n_keys, heads=args.heads, k=args.k, key_dim=args.key_dim)
    x = torch.randn(args.scale_tokens, d)
    layer.train()(x).square().mean().backward()
    values = layer.memory_values
    out = {"rows": layer.n_rows, "d": d, "grad_rows": int(values.grad._nnz())}
    makers = {
        "RowwiseAdagrad": lambda: RowwiseAdagrad([values], lr=1e-2),
        "SparseAdam": lambda: torch.optim.SparseAdam([values], lr=1e-3),
        "Adagrad": lambda: torch.optim.Adagrad([values], lr=1e-2),
    }
    for name, make in makers.items():
        opt = make()
        t0 = time.perf_counter()
        opt.step()
        first = time.perf_counter() - t0
        steps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t0)
        state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        out[name] = {
            "first_step_s": first,
            "step_s": statistics.median(steps),
            "state_bytes": state,
        }
        del opt
        gc.collect()
    return out


def print_table(result: dict) -> None:
    cfg = result["scale_config"]
    print(
        f"\nProductKeyMemory vs GPT2MLP (n_inner = 4d): {cfg['tokens']} tokens, heads={cfg['heads']},"
        f" k={cfg['k']}, key_dim={cfg['key_dim']}, median of {cfg['repeats']}"
    )
    print(
        f"{'d':>4}{'rows':>10}{'mlp s':>8}{'mem s':>8}{'ratio':>7}{'mlp+opt':>9}{'mem+opt':>9}"
        f"{'ratio':>7}{'B/row':>8}{'distinct':>10}{'recall':>8}"
    )
    for r in result["scale_table"]:
        recall = "-" if r["recall_at_k"] is None else f"{r['recall_at_k']:.3f}"
        print(
            f"{r['d']:>4}{r['rows']:>10,}{r['mlp_s']:>8.3f}{r['memory_s']:>8.3f}"
            f"{r['time_ratio']:>7.2f}{r['mlp_update_s']:>9.3f}{r['memory_update_s']:>9.3f}"
            f"{r['update_ratio']:>7.2f}{r['bytes_per_row']:>8.0f}{r['distinct_rows_read']:>10,}"
            f"{recall:>8}"
        )
