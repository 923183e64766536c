"""How interactive Mindset is: a trace of a 64-token prompt on the demo student.

Compared, in the same run and interleaved (median of ``--repeats``), with a plain forward pass of
the same model on the same 64 tokens:

* forward with read recording on (``recording_reads``: the cost of the layers' own record);
* ``trace_prompt`` (``memstore trace``'s work after loading: record, merge heads, measure
  contributions, order), top 8 rows per token and every row read (``--top 0``);
* the UI's trace (``MindsetService.trace``: the trace plus what every shown row promotes, its
  LRFU facts read from the database);
* ``memstore trace`` as a user runs it: a new process that imports torch, loads the student and
  traces (fewer repeats: it takes seconds).

    python benchmarks/mindset.py --student memstore-demo/student [--repeats 20] [--json]

Without ``--student`` it first trains the demo student (``memstore demo``, a few minutes) into a
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])

from memstore_gpt2.mindset.session import Mindset  # noqa: E402
from memstore_gpt2.mindset.trace import trace_prompt  # noqa: E402
from memstore_gpt2.mindset.web import MindsetService  # noqa: E402
from memstore_torch.model_memory import recording_reads  # noqa: E402

PROMPT_TOKENS = 64


def machine(threads: int) -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"
    )


def prompt_of(mindset: Mindset, n: int) -> str:
    """A text of exactly ``n`` tokens from Python's own docs (what the demo student read)."""
    from memstore_gpt2.text_data import python_docs_corpus

    ids = mindset.tokenizer(python_docs_corpus()[1], add_special_tokens=False)["input_ids"]
    for cut in range(n, n + 16):  # decoding then encoding may merge tokens: find a cut that holds
        text = mindset.tokenizer.decode(ids[:cut])
        if len(mindset.encode(text)) == n:
            return text
    raise SystemExit(f"could not build a {n}-token prompt")


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="Student directory [default: train the demo first].")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    scratch = None
    student = args.student
    if student is None:
        from memstore_gpt2.demo import run_demo

        scratch = tempfile.TemporaryDirectory(prefix="mindset-bench-")
        print("training the demo student first (a few minutes) ...", file=sys.stderr)
        run_demo(None, Path(scratch.name) / "demo", log=lambda *_: None, progress=False)
        student = str(Path(scratch.name) / "demo" / "student")

    with Mindset.open(student) as mindset:
        prompt = prompt_of(mindset, PROMPT_TOKENS)
        ids = torch.tensor([mindset.encode(prompt)])
        model = mindset.model

        def plain():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        def recorded():
            with recording_reads(model), torch.no_grad():
                model(input_ids=ids, use_cache=False)

        cases = {
            "plain forward (64 tokens)": plain,
            "forward, reads recorded": recorded,
            "trace, top 8 rows per token": lambda: trace_prompt(mindset, prompt, top=8),
            "trace, every row read": lambda: trace_prompt(mindset, prompt, top=0),
        }
        layers = ", ".join(
            f"{e.name} {e.layer.index.n} rows k {e.layer.k}" for e in mindset.layers.values()
        )
        threads = torch.get_num_threads()
    service = MindsetService(student)
    cases["UI trace (+ promoted tokens, LRFU facts)"] = lambda: service.trace(prompt, 8)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    names = list(cases)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # no case always first
            t0 = time.perf_counter()
            cases[name]()
            samples[name].append(time.perf_counter() - t0)
    service.close()

    cli = [sys.executable, "-c", "from memstore_gpt2.cli import main; main()", "trace", student,
           "--prompt", prompt, "--json"]  # fmt: skip
    cli_samples = []
    for _ in range(args.cli_repeats):
        t0 = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        cli_samples.append(time.perf_counter() - t0)

    base = median_ms(samples["plain forward (64 tokens)"])
    rows = [(name, median_ms(s)) for name, s in samples.items()]
    rows.append(("`memstore trace` process (start, load, trace)", median_ms(cli_samples)))
    result = {
        "machine": machine(threads),
        "student": student,
        "layers": layers,
        "prompt_tokens": PROMPT_TOKENS,
        "repeats": args.repeats,
        "ms": {name: round(ms, 3) for name, ms in rows},
        "ratio_to_forward": {name: round(ms / base, 2) for name, ms in rows},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"machine: {result['machine']}")
        print(f"student: {student} ({layers}); prompt {PROMPT_TOKENS} tokens; median of "
              f"{args.repeats} (process: {args.cli_repeats})")  # fmt: skip
        print(f"| {'what':<48} | {'ms':>9} | {'x forward':>9} |")
        print(f"|{'-' * 50}|{'-' * 11}:|{'-' * 11}:|")
        for name, ms in rows:
            print(f"| {name:<48} | {ms:>9.2f} | {ms / base:>9.2f} |")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
