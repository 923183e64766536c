"""``memstore serve`` throughput and latency under concurrent HTTP clients.

    python benchmarks/serve.py --student STUDENT_DIR --teacher TEACHER_DIR [--clients 1,4,16]
        [--max-tokens 24] [--requests 3] [--device cpu] [--json]

Starts ``memstore serve STUDENT`` twice as its own process on a free port: with continuous
batching (``--max-batch 16``) and with batching off (``--max-batch 1``). For each ``--clients``
count, that many client threads (stdlib HTTP, one connection per request) each send
``--requests`` greedy ``/v1/completions`` requests of ``--max-tokens`` tokens one after another;
tokens/s is all completion tokens over the wall time of the round, latency is per request
(p50/p99). The dense teacher decodes the same prompt through transformers' ``generate()`` (greedy,
its KV cache, one sequence) in this process for ``vs_hf_generate_1``.

Also checks that the server's greedy text equals ``memstore generate``'s loop
(``sample_tokens``, temperature 0) for the same prompt (``greedy_identical``).

JSON keys: ``tokens_per_s_1``, ``tokens_per_s_4``, ``tokens_per_s_16`` (batched server),
``unbatched_tokens_per_s_*``, ``batching_speedup_16`` (batched / unbatched at 16 clients),
``hf_generate_tokens_per_s``, ``vs_hf_generate_1`` (server at 1 client / HF generate),
``p50_ms_*``, ``p99_ms_*``, ``greedy_identical``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

#: Short prompts (at most 5 tokens in the tiny test tokenizer): prompt + max_tokens must fit the
#: model's context, or the server refuses the request (400).
PROMPTS = ["The for statement", "A list is", "x = 1", "The value"]


def start_server(student: str, max_batch: int, device: str, log: Path):
    """(process, base URL) of ``memstore serve`` on a free port."""
    code = "from memstore_gpt2.cli import main; main()"
    args = [sys.executable, "-c", code, "serve", student, "--port", "0", "--device", device,
            "--max-batch", str(max_batch)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    handle = open(log, "w")  # noqa: SIM115 - the server's whole life
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=handle, text=True, env=env)
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
    return process, line.split()[2].removesuffix("/v1")


def complete(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode()[:300]}") from None
    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]


def load_round(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, ``requests`` each: tokens/s over the round, per-request latency."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            started = time.perf_counter()
            try:
                _, n = complete(url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    if errors:  # a figure over failed requests would mean nothing
        raise SystemExit(f"{len(errors)} of {clients * requests} requests failed: {errors[0]}")
    return {"tokens_per_s": tokens[0] / seconds, "tokens": tokens[0], "seconds": seconds,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99)}  # fmt: skip


def hf_generate_tokens_per_s(teacher: str, device: str, max_tokens: int, rounds: int) -> float:
    """The dense teacher through transformers' ``generate()`` (greedy, KV cache): best of rounds."""
    import torch

    from memstore_gpt2.teacher import load_teacher

    model, tokenizer = load_teacher(teacher)
    model.to(device).eval()
    ids = torch.tensor([tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]],
                       device=device)  # fmt: skip
    best = 0.0
    with torch.no_grad():
        for _ in range(rounds):
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            seconds = time.perf_counter() - started
            best = max(best, (out.shape[1] - ids.shape[1]) / seconds)
    return best


def reference_greedy(student: str, max_tokens: int) -> str:
    """``memstore generate``'s greedy continuation of the first prompt."""
    from memstore_gpt2.generate import sample_continuation
    from memstore_gpt2.model_dir import open_model_dir

    with open_model_dir(student) as opened:
        text, _ = sample_continuation(opened.model, opened.tokenizer, PROMPTS[0],
                                      max_new_tokens=max_tokens, temperature=0)  # fmt: skip
    return text[len(PROMPTS[0]) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per round.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None, help="Where the server logs go [default: tmp].")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.clients.split(",")]
    result: dict = {"clients": counts, "max_tokens": args.max_tokens, "device": args.device,
                    "requests_per_client": args.requests}  # fmt: skip
    for label, max_batch in (("", 16), ("unbatched_", 1)):
        process, url = start_server(args.student, max_batch, args.device,
                                    work / f"server{max_batch}.log")  # fmt: skip
        try:
            complete(url, PROMPTS[0], 2)  # warm-up
            if not label:
                text, _ = complete(url, PROMPTS[0], args.max_tokens)
                result["greedy_identical"] = text == reference_greedy(args.student,
                                                                      args.max_tokens)  # fmt: skip
            for clients in counts:
                measured = load_round(url, clients, args.requests, args.max_tokens)
                for key, value in measured.items():
                    result[f"{label}{key}_{clients}"] = value
                if not args.json:
                    print(f"{label or 'batched_'}{clients} clients: {measured}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    result["hf_generate_tokens_per_s"] = hf_generate_tokens_per_s(args.teacher, args.device,
                                                                  args.max_tokens, 3)  # fmt: skip
    last = counts[-1]
    result[f"batching_speedup_{last}"] = (
        result[f"tokens_per_s_{last}"] / result[f"unbatched_tokens_per_s_{last}"]
    )
    result["vs_hf_generate_1"] = (
        result.get("tokens_per_s_1", 0) / result["hf_generate_tokens_per_s"]
    )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key in sorted(result):
            print(f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
