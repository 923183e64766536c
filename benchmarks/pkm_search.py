"""Product-key search: every sum at once against the two-stage candidate search, per call size.

    python benchmarks/pkm_search.py [--n-keys 64,128,256] [--tokens 1,2,4,8,16] [--k 32]
        [--rounds 40] [--json]

``product_topk_stacked`` finds the exact top k of a token's ``n^2`` sums two ways: scoring all
``n^2`` sums and taking their top k (brute force itself), or taking each half's k best and
searching only the ~k ln k rank pairs that can win. The first costs fewer operators, the second
less arithmetic; which is cheaper depends on the call's size, and the product searches the whole
sum set when ``tokens * n^2 <= FULL_SEARCH_SUMS``. This script times both routes on the same
inputs under ``torch.no_grad`` (a decoding step), the two taking turns in every round so a slow
moment of a shared machine falls on both, and prints microseconds per call (medians of the rounds)
and the route the limit picks. JSON keys: ``rows`` (each ``n_keys``, ``tokens``, ``full_us``,
``two_stage_us``, ``chosen``), ``limit``, ``machine``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from machine_info import machine_facts  # benchmarks/ is sys.path[0]


def time_routes(halves, k: int, rounds: int, calls: int) -> dict[str, float]:
    """Median microseconds per call of each route, the two taking turns round by round."""
    from memstore_torch import product_keys

    limit = product_keys.FULL_SEARCH_SUMS
    routes = {"full_us": float("inf"), "two_stage_us": 0}  # the limit that forces each route
    times: dict[str, list[float]] = {name: [] for name in routes}
    try:
        for _ in range(rounds):
            for name, forced in routes.items():
                product_keys.FULL_SEARCH_SUMS = forced
                product_keys.product_topk_stacked(halves, k)  # warm
                started = time.perf_counter()
                for _ in range(calls):
                    product_keys.product_topk_stacked(halves, k)
                times[name].append((time.perf_counter() - started) / calls * 1e6)
    finally:
        product_keys.FULL_SEARCH_SUMS = limit
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-keys", default="64,128,256")
    parser.add_argument("--tokens", default="1,2,4,8,16")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from memstore_torch import product_keys

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for n in (int(v) for v in args.n_keys.split(",")):
            for tokens in (int(v) for v in args.tokens.split(",")):
                halves = torch.randn(tokens, 2, n, generator=generator)
                timed = time_routes(halves, args.k, args.rounds, args.calls)
                chosen = "full" if tokens * n * n <= product_keys.FULL_SEARCH_SUMS else "two-stage"
                rows.append({"n_keys": n, "tokens": tokens, **timed, "chosen": chosen})
    machine = {**machine_facts(), "threads": args.threads}
    print(f"# product-key search, k={args.k}, under no_grad, {args.threads} thread(s); "
          f"µs per call, medians of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"# machine: {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, "
          f"Python {machine['python']}; load average {machine['load_average'][0]}")  # fmt: skip
    print(f"# the product searches all sums when tokens x n^2 <= {product_keys.FULL_SEARCH_SUMS}")
    print("| n_keys (rows) | tokens | all sums µs | two-stage µs | limit picks |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_keys']} ({r['n_keys'] ** 2}) | {r['tokens']} | {r['full_us']:.1f} | "
              f"{r['two_stage_us']:.1f} | {r['chosen']} |")  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows, "limit": product_keys.FULL_SEARCH_SUMS,
                          "machine": machine}, sort_keys=True))  # fmt: skip


if __name__ == "__main__":
    main()
