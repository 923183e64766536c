"""Forward+backward time of a GPT-2-small MLP vs FeaturalMemory.from_mlp at several k, and the
scaling table of ProductKeyMemory from 1k to 1M rows.

Shape: d=768, n_inner=3072, a batch of 8 x 128 tokens, in training mode (so the memory layer's
LRFU bookkeeping is included), gradients to the input and every parameter (rows included).
Both are timed in the same run, interleaved, median of ``--repeats``.

    python benchmarks/layer.py [--json] [--threads 2] [--repeats 7]

``--json`` prints one object: ``mlp_s``, ``time_s_k{K}`` and ``time_ratio_k{K}`` for each k
(``time_ratio_k256`` is the issue's target, <= 1.5), plus the machine.

It also gains the scaling table (benchmarks/layer_scaling.py): ProductKeyMemory at 1k, 16k, 262k
and 1M rows, d = 256 and 768, 2,048 tokens, against a GPT-2 MLP of n_inner = 4 d in the same run
(forward + backward, the whole update with optimizers, bytes per row, distinct rows read,
recall@k); JSON keys ``scale_time_ratio_1m_d768``, ``scale_time_ratio_1m_d256``,
``scale_recall_at_k`` and ``scale_table``. Sizes and widths are flags (a smoke run:
``--scale-rows 1k --scale-dims 64 --scale-tokens 64``); ``--no-scale`` skips the table,
``--scale-only`` skips the FeaturalMemory section, ``--optimizers`` adds the step time and state of
RowwiseAdagrad, SparseAdam and Adagrad on one gradient (``--optim-rows 1m --optim-dim 768``).

CPU settings, set unless already in the environment (before torch loads): ``THP_MEM_ALLOC_ENABLE=1``
(torch backs large CPU allocations with transparent huge pages: a fresh (rows x d) gradient
otherwise spends most of its time in page faults) and ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP
threads sleep instead of spinning, which on a shared machine keeps many small parallel regions
from waiting a scheduler slice each). Both sides of every ratio run under them; the machine line
prints them.

    python benchmarks/layer.py --variants [--seeds 2] [--steps 150]

trains AssociativeMemory on a fact-recall task under each straight-through variant (docs/design.md,
Straight-through gradients: which variants train best) and prints the final in-step loss and the recall
error when the facts must come from the table alone, both relative to predicting zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in CPU_ENV.items():
    os.environ.setdefault(_name, _value)

import layer_scaling  # noqa: E402  (benchmarks/ is sys.path[0])
import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402
from transformers import GPT2Config  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402

from memstore_torch import AssociativeMemory, FeaturalMemory  # noqa: E402


def machine(threads: int) -> str:
    cpu = cpu_model()
    env = ", ".join(f"{name}={os.environ.get(name, '')}" for name in CPU_ENV)
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}, {env}"
    )


def step_time(module: torch.nn.Module, x: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    module(xg).square().mean().backward()
    return time.perf_counter() - t0


def fact_batch(a: torch.Tensor, b: torch.Tensor, pick: torch.Tensor):
    """Position 0 shows the fact [a; b], position 1 asks [a; 0]; the answer is [0; b]."""
    fact = torch.cat([a[pick], b[pick]], dim=1)
    ask = torch.cat([a[pick], torch.zeros_like(b[pick])], dim=1)
    target = torch.cat([torch.zeros_like(a[pick]), b[pick]], dim=1)
    return torch.stack([fact, ask], dim=1), ask[:, None, :], target


VARIANTS = {
    "all rules, trainable rows": {},
    "no dQuery=dKeyReturned": {"st_query": False},
    "no insert rules": {"st_insert": False},
    "read-only rows": {"trainable_rows": False},
    "no rules, read-only rows": {"st_query": False, "st_insert": False, "trainable_rows": False},
}


def train_variant(options: dict, seed: int, steps: int, n_facts: int = 64, half: int = 8):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_facts, half, generator=g)
    b = torch.randn(n_facts, half, generator=g)
    torch.manual_seed(seed)
    mem = AssociativeMemory(
        2 * half, heads=2, k=8, key_dim=16, value_dim=16, capacity=8192, **options
    ).train()
    opt = torch.optim.Adam(mem.parameters(), lr=1e-2)
    recent: list[float] = []  # training loss (fact shown in the same sequence), last 20 steps
    for _ in range(steps):
        x, _, target = fact_batch(a, b, torch.randint(0, n_facts, (16,), generator=g))
        loss = (mem(x)[:, 1] - target).square().mean() / target.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
    _, ask, target = fact_batch(a, b, torch.arange(n_facts))
    with torch.no_grad():
        mem.eval()  # no inserts: the answer can only come from the table
        recall = (mem(ask)[:, 0] - target).square().mean().item()
    zero = target.square().mean().item()
    return statistics.mean(recent), recall / zero, len(mem.index)


def variants(seeds: int, steps: int) -> None:
    print(f"AssociativeMemory, 64 facts, 16 a batch, {steps} Adam steps, {seeds} seeds")
    print("errors relative to predicting zeros (1.0 = learnt nothing); mean over seeds")
    print(f"{'variant':<28}{'in-step loss':>14}{'table recall':>14}{'rows':>7}")
    for name, options in VARIANTS.items():
        runs = [train_variant(options, seed, steps) for seed in range(seeds)]
        in_step = statistics.mean(r[0] for r in runs)
        recall = statistics.mean(r[1] for r in runs)
        rows = statistics.mean(r[2] for r in runs)
        print(f"{name:<28}{in_step:>14.3f}{recall:>14.3f}{rows:>7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ks", default="64,256,3072")
    ap.add_argument("--tokens", default="8x128", help="batch x sequence")
    ap.add_argument("--variants", action="store_true", help="straight-through variants instead")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    scale = ap.add_argument_group("scaling table (ProductKeyMemory)")
    scale.add_argument("--no-scale", action="store_true", help="skip the scaling table")
    scale.add_argument("--scale-only", action="store_true", help="only the scaling table")
    scale.add_argument("--scale-rows", default="1k,16k,262k,1m", help="sizes: 1k,16k,262k,1m")
    scale.add_argument("--scale-dims", default="256,768", help="widths d, comma-separated")
    scale.add_argument("--scale-tokens", type=int, default=2048)
    scale.add_argument("--scale-repeats", type=int, default=3)
    scale.add_argument("--scale-warmup", type=int, default=2)
    scale.add_argument("--pk-heads", type=int, default=4)
    scale.add_argument("--pk-k", type=int, default=32)
    scale.add_argument("--pk-key-dim", type=int, default=256)
    scale.add_argument("--recall-tokens", type=int, default=16, help="0: skip recall@k")
    scale.add_argument("--optimizers", action="store_true", help="compare sparse optimizers")
    scale.add_argument("--optim-rows", default="1m")
    scale.add_argument("--optim-dim", type=int, default=768)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.variants:
        variants(args.seeds, args.steps)
        return
    result: dict[str, object] = {"machine": machine(args.threads)}
    if not args.scale_only:
        result.update(featural_section(args))
    if not args.no_scale:
        result.update(layer_scaling.scaling_table(scaling_args(args)))
    if args.optimizers:
        result["optimizers"] = layer_scaling.optimizer_comparison(scaling_args(args))
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    if not args.scale_only:
        print_featural(result, args)
    if not args.no_scale:
        layer_scaling.print_table(result)
    if args.optimizers:
        print_optimizers(result["optimizers"])


def scaling_args(args) -> argparse.Namespace:
    return argparse.Namespace(
        scale_rows=args.scale_rows,
        scale_dims=args.scale_dims,
        scale_tokens=args.scale_tokens,
        repeats=args.scale_repeats,
        warmup=args.scale_warmup,
        heads=args.pk_heads,
        k=args.pk_k,
        key_dim=args.pk_key_dim,
        recall_tokens=args.recall_tokens,
        optim_rows=args.optim_rows,
        optim_dim=args.optim_dim,
    )


def print_optimizers(out: dict) -> None:
    print(
        f"\noptimizer step on one sparse gradient of {out['rows']:,} x {out['d']} values "
        f"({out['grad_rows']:,} rows with a gradient)"
    )
    print(f"{'optimizer':<16}{'first step s':>14}{'step s':>10}{'state MiB':>11}")
    for name in ("RowwiseAdagrad", "SparseAdam", "Adagrad"):
        o = out[name]
        print(
            f"{name:<16}{o['first_step_s']:>14.3f}{o['step_s']:>10.3f}"
            f"{o['state_bytes'] / 2**20:>11.1f}"
        )


def featural_section(args) -> dict:
    """GPT-2-small MLP vs FeaturalMemory.from_mlp at each k (the original table)."""
    torch.manual_seed(0)
    batch, seq = (int(v) for v in args.tokens.split("x"))
    cfg = GPT2Config(n_embd=768, n_inner=3072, resid_pdrop=0.0)
    mlp = GPT2MLP(3072, cfg).train()
    x = torch.randn(batch, seq, 768)
    ks = [int(v) for v in args.ks.split(",")]
    calib = torch.randn(512, 768)
    layers = {k: FeaturalMemory.from_mlp(mlp, k=k, calibration=calib).train() for k in ks}
    for m in [mlp, *layers.values()]:  # warm-up
        step_time(m, x)
    times: dict[str, list[float]] = {"mlp": []} | {f"k{k}": [] for k in ks}
    for _ in range(args.repeats):
        times["mlp"].append(step_time(mlp, x))
        for k, layer in layers.items():
            times[f"k{k}"].append(step_time(layer, x))
    mlp_s = statistics.median(times["mlp"])
    result: dict[str, object] = {"mlp_s": mlp_s}
    for k in ks:
        t = statistics.median(times[f"k{k}"])
        result[f"time_s_k{k}"] = t
        result[f"time_ratio_k{k}"] = t / mlp_s
    return result


def print_featural(result: dict, args) -> None:
    batch, seq = (int(v) for v in args.tokens.split("x"))
    ks = [int(v) for v in args.ks.split(",")]
    print(f"tokens: {batch}x{seq}, d=768, n_inner=3072, forward+backward, median of {args.repeats}")
    print(f"{'layer':<22}{'seconds':>10}{'ratio':>8}")
    print(f"{'GPT2MLP':<22}{result['mlp_s']:>10.4f}{1.0:>8.2f}")
    for k in ks:
        name = f"FeaturalMemory k={k}"
        print(f"{name:<22}{result[f'time_s_k{k}']:>10.4f}{result[f'time_ratio_k{k}']:>8.2f}")


if __name__ == "__main__":
    main()
