"""``memstore serve`` throughput and latency under concurrent HTTP clients.

    python benchmarks/serve.py --student STUDENT_DIR --teacher TEACHER_DIR [--clients 1,4,16]
        [--max-tokens 24] [--requests 3] [--repeats 3] [--paired-requests 12] [--device cpu]
        [--threads N] [--json]

Starts ``memstore serve STUDENT`` twice as its own process on a free port: with continuous
batching (``--max-batch 16``) and with batching off (``--max-batch 1``). For each ``--clients``
count, that many client threads (stdlib HTTP, one connection per request) each send
``--requests`` greedy ``/v1/completions`` requests of ``--max-tokens`` tokens one after another;
tokens/s is all completion tokens over the wall time of the round, latency is per request
(p50/p99). The reference is the dense teacher through transformers' ``generate()`` (greedy, its
KV cache, one sequence, in this process, after a warm-up as the server gets one). It is timed
against the batched server with one client request by request: ``--paired-requests`` times, one
server request, then the same prompt through ``generate()`` on one intra-op thread and on
torch's default count (the better of the two counts: the server picks its threads per step),
so the two are measured milliseconds apart. ``vs_hf_generate_1`` is the server's tokens/s in
that paired round over the reference's (the server's includes HTTP and tokenizing; the
reference's neither).

The arms are interleaved ``--repeats`` times (each client count on the batched server, then on
the unbatched one, then the paired round), so a slow minute on a shared machine hits every arm
alike; each figure is the median over the repeats, each ratio the median of the repeats' ratios.
``--pack NAME`` (repeatable) serves the student with knowledge packs attached (every request
uses them); ``--threads N`` gives both servers ``--threads N`` (default: what each measures at
start per step size; ``server_threads`` records the batched server's, from its ``/metrics``).
Also checks that the server's greedy text equals ``memstore generate``'s loop (``sample_tokens``,
temperature 0) for the same prompt (``greedy_identical``).

JSON keys: ``tokens_per_s_1``, ``tokens_per_s_4``, ``tokens_per_s_16`` (batched server),
``unbatched_tokens_per_s_*``, ``batching_speedup_16`` (batched / unbatched at 16 clients),
``paired_tokens_per_s_1`` (the server in the paired round), ``hf_generate_tokens_per_s`` (the
better of ``hf_generate_tokens_per_s_threads_N``), ``vs_hf_generate_1``, ``p50_ms_*``,
``p99_ms_*``, ``greedy_identical``, ``repeats`` (every repeat's figures), ``machine``. The table
is printed first; with ``--json`` the last line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from machine_info import machine_facts  # benchmarks/ is sys.path[0]

#: Short prompts (at most 5 tokens in the tiny test tokenizer): prompt + max_tokens must fit the
#: model's context, or the server refuses the request (400).
PROMPTS = ["The for statement", "A list is", "x = 1", "The value"]


def start_server(student: str, max_batch: int, device: str, log: Path, packs=(),
                 threads: int | None = None):  # fmt: skip
    """(process, base URL) of ``memstore serve`` on a free port."""
    code = "from memstore_gpt2.cli import main; main()"
    args = [sys.executable, "-c", code, "serve", student, "--port", "0", "--device", device,
            "--max-batch", str(max_batch)]  # fmt: skip
    for pack in packs:
        args += ["--pack", pack]
    if threads is not None:
        args += ["--threads", str(threads)]
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


def measured_threads(url: str) -> dict[str, int]:
    """The server's CPU threads per step size, from ``/metrics`` (``memstore_decode_threads``:
    what it measured at start, or its ``--threads``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        text = response.read().decode()
    prefix = 'memstore_decode_threads{sequences="'
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line.rsplit(" ", 1)
            found[labels[len(prefix) : -2]] = int(float(value))
    return found


def describe_threads(threads) -> str:
    """``--threads N`` as given, or the servers' measured counts as their startup line says."""
    from memstore_gpt2.serve.decoding import threads_summary

    if not isinstance(threads, dict):
        return str(threads)
    return threads_summary({int(n): t for n, t in threads.items()})


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


class HFReference:
    """The dense teacher through transformers' ``generate()`` (greedy, KV cache), loaded once."""

    def __init__(self, teacher: str, device: str, max_tokens: int) -> None:
        import torch

        from memstore_gpt2.teacher import load_teacher

        self.model, self.tokenizer = load_teacher(teacher)
        self.model.to(device).eval()
        self.max_tokens = max_tokens
        self.prompts = [
            torch.tensor([self.tokenizer(p, add_special_tokens=False)["input_ids"]], device=device)
            for p in PROMPTS
        ]
        self._run(self.prompts[0])  # warm-up, as the server gets one

    def _run(self, ids) -> int:
        import torch

        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=self.max_tokens,
                                      min_new_tokens=self.max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)  # fmt: skip
        return out.shape[1] - ids.shape[1]

    def run(self, index: int) -> int:
        """Generate from prompt ``index`` (of :data:`PROMPTS`); the new tokens."""
        return self._run(self.prompts[index % len(self.prompts)])


def paired_round(url: str, reference: HFReference, requests: int, max_tokens: int) -> dict:
    """The server with one client and the reference in turn, request by request (the same
    prompt each time): so the two are timed within milliseconds of each other, and a slow
    moment of a shared machine falls on both. The reference runs each prompt on one intra-op
    thread and on torch's default count (the server picks its threads per step, so the
    reference gets its better setting too)."""
    import torch

    default = torch.get_num_threads()
    arms = ["server", *sorted({1, default})]
    seconds, tokens = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0)
    try:
        for r in range(requests):
            for arm in arms:
                started = time.perf_counter()
                if arm == "server":
                    n = complete(url, PROMPTS[r % len(PROMPTS)], max_tokens)[1]
                else:
                    torch.set_num_threads(arm)
                    n = reference.run(r)
                seconds[arm] += time.perf_counter() - started
                tokens[arm] += n
    finally:
        torch.set_num_threads(default)
    rates = {arm: tokens[arm] / seconds[arm] for arm in arms}
    figures = {"paired_tokens_per_s_1": rates.pop("server")}
    for threads, rate in rates.items():
        figures[f"hf_generate_tokens_per_s_threads_{threads}"] = rate
    figures["hf_generate_tokens_per_s"] = max(rates.values())
    return figures


def format_table(result: dict) -> str:
    rows = ["| clients | tokens/s, batching | tokens/s, batching off | p50 ms | p99 ms |",
            "|---|---|---|---|---|"]  # fmt: skip
    for clients in result["clients"]:
        rows.append(f"| {clients} | {result[f'tokens_per_s_{clients}']:.1f} | "
                    f"{result[f'unbatched_tokens_per_s_{clients}']:.1f} | "
                    f"{result[f'p50_ms_{clients}']:.0f} | {result[f'p99_ms_{clients}']:.0f} |")  # fmt: skip
    m = result["machine"]
    last = result["clients"][-1]
    return "\n".join([
        f"# memstore serve: {result['student']} ({result['device']}, threads "
        f"{describe_threads(result['server_threads'])}, packs: "
        f"{', '.join(result['packs']) or 'none'}); {result['requests_per_client']} greedy "
        f"requests of {result['max_tokens']} tokens per client; medians of "
        f"{len(result['repeats'])} interleaved repeats",
        f"# machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} "
        f"threads), Python {m['python']}; load average at the end {m['load_average'][0]}",
        *rows,
        f"reference, request by request against the server at "
        f"{result['paired_tokens_per_s_1']:.1f} tokens/s: the dense teacher through transformers' "
        f"generate(), {result['hf_generate_tokens_per_s']:.1f} tokens/s "
        f"({reference_threads(result)}); vs_hf_generate_1 "
        f"{result['vs_hf_generate_1']:.2f}; batching_speedup_{last} "
        f"{result[f'batching_speedup_{last}']:.2f}; greedy_identical {result['greedy_identical']}",
    ])  # fmt: skip


def reference_threads(result: dict) -> str:
    """The reference's tokens/s per thread count, as the table shows them."""
    prefix = "hf_generate_tokens_per_s_threads_"
    counts = sorted(int(key[len(prefix) :]) for key in result if key.startswith(prefix))
    return ", ".join(f"{result[prefix + str(n)]:.1f} on {n} thread{'s' * (n > 1)}"
                     for n in counts)  # fmt: skip


def reference_greedy(student: str, max_tokens: int, packs=()) -> str:
    """``memstore generate``'s greedy continuation of the first prompt."""
    from memstore_gpt2.generate import sample_continuation
    from memstore_gpt2.model_dir import open_model_dir

    with open_model_dir(student, packs=tuple(packs)) as opened:
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
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved rounds of every arm.")
    parser.add_argument("--paired-requests", type=int, default=12,
                        help="Requests of the server and the reference in turn, per repeat.")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pack", action="append", default=[], help="Serve with this pack.")
    parser.add_argument("--threads", type=int, default=None,
                        help="The servers' --threads [default: what they measure at start].")  # fmt: skip
    parser.add_argument("--work", default=None, help="Where the server logs go [default: tmp].")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.clients.split(",")]
    result: dict = {"clients": counts, "max_tokens": args.max_tokens, "device": args.device,
                    "requests_per_client": args.requests, "packs": args.pack,
                    "student": str(args.student)}  # fmt: skip
    servers = {}
    try:
        for label, max_batch in (("", 16), ("unbatched_", 1)):
            servers[label] = start_server(args.student, max_batch, args.device,
                                          work / f"server{max_batch}.log", args.pack,
                                          args.threads)  # fmt: skip
            complete(servers[label][1], PROMPTS[0], 2)  # warm-up
        result["server_threads"] = args.threads or measured_threads(servers[""][1])
        text, _ = complete(servers[""][1], PROMPTS[0], args.max_tokens)
        result["greedy_identical"] = text == reference_greedy(args.student, args.max_tokens,
                                                              args.pack)  # fmt: skip
        reference = HFReference(args.teacher, args.device, args.max_tokens)
        repeats = []
        for _ in range(args.repeats):
            figures: dict = {}
            for clients in counts:
                for label, (_, url) in servers.items():
                    measured = load_round(url, clients, args.requests, args.max_tokens)
                    for key, value in measured.items():
                        figures[f"{label}{key}_{clients}"] = value
                    print(f"{label or 'batched_'}{clients} clients: {measured}",
                          file=sys.stderr, flush=True)  # fmt: skip
            figures.update(paired_round(servers[""][1], reference, args.paired_requests,
                                        args.max_tokens))  # fmt: skip
            repeats.append(figures)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    for key in repeats[0]:
        result[key] = statistics.median(r[key] for r in repeats)
    last = counts[-1]
    result[f"batching_speedup_{last}"] = statistics.median(
        r[f"tokens_per_s_{last}"] / r[f"unbatched_tokens_per_s_{last}"] for r in repeats
    )
    result["vs_hf_generate_1"] = statistics.median(
        r["paired_tokens_per_s_1"] / r["hf_generate_tokens_per_s"] for r in repeats
    )
    result["repeats"] = repeats
    result["machine"] = machine_facts()
    print(format_table(result), flush=True)
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
