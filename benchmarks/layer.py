"""Forward+backward time of a GPT-2-small MLP vs FeaturalMemory.from_mlp at several k.

Shape: d=768, n_inner=3072, a batch of 8 x 128 tokens, in training mode (so the memory layer's
LRFU bookkeeping is included), gradients to the input and every parameter (rows included).
Both are timed in the same run, interleaved, median of ``--repeats``.

    python benchmarks/layer.py [--json] [--threads 2] [--repeats 7]

``--json`` prints one object: ``mlp_s``, ``time_s_k{K}`` and ``time_ratio_k{K}`` for each k
(``time_ratio_k256`` is the issue's target, <= 1.5), plus the machine.

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

import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])
from transformers import GPT2Config  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402

from memstore_torch import AssociativeMemory, FeaturalMemory  # noqa: E402


def machine(threads: int) -> str:
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.variants:
        variants(args.seeds, args.steps)
        return
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
    result: dict[str, object] = {"machine": machine(args.threads), "mlp_s": mlp_s}
    for k in ks:
        t = statistics.median(times[f"k{k}"])
        result[f"time_s_k{k}"] = t
        result[f"time_ratio_k{k}"] = t / mlp_s
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(f"tokens: {batch}x{seq}, d=768, n_inner=3072, forward+backward, median of {args.repeats}")
    print(f"{'layer':<22}{'seconds':>10}{'ratio':>8}")
    print(f"{'GPT2MLP':<22}{mlp_s:>10.4f}{1.0:>8.2f}")
    for k in ks:
        name = f"FeaturalMemory k={k}"
        print(f"{name:<22}{result[f'time_s_k{k}']:>10.4f}{result[f'time_ratio_k{k}']:>8.2f}")


if __name__ == "__main__":
    main()
