"""``memstore generate`` and ``memstore learn``'s own background text, with the KV cache and without.

    python benchmarks/generate_cache.py --student STUDENT_DIR [--tokens 60] [--blocks 64]
        [--block-len 64] [--repeats 3] [--json]

Two loops, each against the one it replaced, in the same run, taking turns repeat by repeat:

* ``generate``: ``sample_tokens`` (seeded, temperature 0.8, top-k 40) of ``--tokens`` new tokens
  after a short prompt, with the KV-cache decoder (``cache=True``, what ``memstore generate``
  runs) and re-running the whole context for every token (``cache=False``, the reference);
  tokens per second. The two draw the same tokens (checked).
* ``background``: ``memstore learn``'s sampling of ``--blocks`` blocks of ``--block-len`` tokens
  from the student itself, decoded with the cache (``sample_background``) and by re-running the
  blocks at every position (the former loop); seconds. With ``--blocks`` at most 64 (one batch)
  the two draw the same tokens (checked).

Prints a table (medians of the repeats) and the machine; ``--json`` adds one object as the last
line: ``generate`` and ``background`` (each ``cached``, ``uncached``, ``speedup``), ``machine``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from machine_info import machine_facts  # benchmarks/ is sys.path[0]

PROMPT = "The value of the"


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch

    from memstore_gpt2.generate import sample_tokens
    from memstore_gpt2.packs.learn import SAMPLE_BATCH, _sample_without_cache, sample_background
    from memstore_gpt2.student import load_student

    loaded = load_student(args.student)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    context = int(model.config.n_positions)
    if len(ids) + args.tokens > context or args.block_len > context:
        raise SystemExit(f"--tokens and --block-len must fit the model's {context}-token context")
    sampling = dict(max_new_tokens=args.tokens, temperature=0.8, top_k=40, seed=0)
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    arms = {
        ("generate", "cached"): lambda: sample_tokens(model, ids, cache=True, **sampling),
        ("generate", "uncached"): lambda: sample_tokens(model, ids, cache=False, **sampling),
        ("background", "cached"): lambda: sample_background(
            model, tokenizer, args.blocks, args.block_len, 0),
        ("background", "uncached"): lambda: _sample_without_cache(
            model, start, args.blocks, args.block_len, torch.Generator().manual_seed(0)),
    }  # fmt: skip
    seconds: dict = {arm: [] for arm in arms}
    outputs: dict = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for arm, fn in arms.items():
                took, outputs[arm] = timed(fn)
                seconds[arm].append(took)
    loaded.close()
    if outputs["generate", "cached"] != outputs["generate", "uncached"]:
        raise SystemExit("the cached and uncached generate loops drew different tokens")
    same = np.array_equal(outputs["background", "cached"], outputs["background", "uncached"])
    if args.blocks <= SAMPLE_BATCH and not same:
        raise SystemExit("the cached and uncached background loops drew different tokens")
    result: dict = {}
    for loop in ("generate", "background"):
        cached = statistics.median(seconds[loop, "cached"])
        uncached = statistics.median(seconds[loop, "uncached"])
        result[loop] = {"cached_s": cached, "uncached_s": uncached, "speedup": uncached / cached}
    result["generate"]["cached_tokens_per_s"] = args.tokens / result["generate"]["cached_s"]
    result["generate"]["uncached_tokens_per_s"] = args.tokens / result["generate"]["uncached_s"]
    result["machine"] = machine_facts()
    m = result["machine"]
    print(f"# {args.student}: generate {args.tokens} tokens; background {args.blocks} blocks of "
          f"{args.block_len}; medians of {args.repeats} interleaved repeats")  # fmt: skip
    print(f"# machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} "
          f"threads), Python {m['python']}; load average {m['load_average'][0]}")  # fmt: skip
    print("| loop | with the KV cache | re-running the context | speed-up |")
    print("|---|---|---|---|")
    g, b = result["generate"], result["background"]
    print(f"| generate | {g['cached_tokens_per_s']:.1f} tokens/s | "
          f"{g['uncached_tokens_per_s']:.1f} tokens/s | {g['speedup']:.2f}x |")  # fmt: skip
    print(f"| background | {b['cached_s']:.2f} s | {b['uncached_s']:.2f} s | "
          f"{b['speedup']:.2f}x |")  # fmt: skip
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
