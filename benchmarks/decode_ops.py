"""Where a decoding step's time goes: matrix products against everything else, student vs teacher.

    python benchmarks/decode_ops.py --student STUDENT_DIR --teacher TEACHER_DIR [--steps 10]
        [--threads 1] [--json]

Runs ``--steps`` single-sequence decoding steps (``memstore serve``'s KV-cache decoder, after a
prefill of one prompt and three warm-up steps) of the student and of its dense teacher, taking
turns step by step, each under ``torch.profiler`` on ``--threads`` intra-op threads, and sums the operators'
own CPU time per step in two groups: ``matmul_ms`` (``addmm``, ``mm``, ``bmm``: reading the
weights) and ``other_ms`` (every other operator: top-k, row bags, attention, norms, views...),
with ``ops`` the aten operator calls per step. The teacher is the reference: a student whose memory
is cheaper than the MLP it replaced does less ``matmul_ms``; what its memory layers add shows in
``other_ms`` and ``ops``. Profiler times include its own overhead, so compare the two rows of
one run, not runs. JSON keys: ``student`` / ``teacher`` (each ``matmul_ms``, ``other_ms``,
``ops``), ``machine``; the table is printed first, ``--json`` adds the object as the
last line.
"""

from __future__ import annotations

import argparse
import json

from machine_info import machine_facts  # benchmarks/ is sys.path[0]

MATMULS = {"aten::addmm", "aten::mm", "aten::bmm"}
PROMPT = "The value of the"


def operator_times(prof) -> tuple[float, float, int]:
    """(matrix product µs, other operators' µs, operator calls) of one profile's aten ops
    (Python-level and profiler records are left out: their time is in the ops below them)."""
    matmul = other = 0.0
    calls = 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        calls += event.count
        if event.key in MATMULS:
            matmul += event.self_cpu_time_total
        else:
            other += event.self_cpu_time_total
    return matmul, other, calls


def profile_steps(decoders: dict, ids: list[int], steps: int) -> dict:
    """Per-step operator time of each decoder over ``steps`` decoding steps after a prefill of
    ``ids``, the decoders taking turns step by step (a slow second of a shared machine then
    slows each alike)."""
    from torch.profiler import profile

    batches = {}
    for name, decoder in decoders.items():
        batches[name], _ = decoder.prefill(ids)
        for _ in range(3):
            decoder.step(batches[name], [ids[-1]])
    sums = {name: [0.0, 0.0, 0] for name in decoders}
    for _ in range(steps):
        for name, decoder in decoders.items():
            with profile() as prof:
                decoder.step(batches[name], [ids[-1]])
            for i, value in enumerate(operator_times(prof)):
                sums[name][i] += value
    return {name: {"matmul_ms": m / steps / 1000, "other_ms": o / steps / 1000,
                   "ops": c / steps} for name, (m, o, c) in sums.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from memstore_gpt2.serve.decoding import Decoder
    from memstore_gpt2.student import load_student
    from memstore_gpt2.teacher import load_teacher

    student = load_student(args.student)
    teacher, _ = load_teacher(args.teacher)
    teacher.eval()
    ids = student.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    decoders = {"student": Decoder(student.model, threads=args.threads),
                "teacher": Decoder(teacher, threads=args.threads)}  # fmt: skip
    with torch.no_grad():
        result = profile_steps(decoders, ids, args.steps)
    student.store.close()
    result["machine"] = {**machine_facts(), "threads": args.threads}
    m = result["machine"]
    print(
        f"# decoding steps of {args.student} and {args.teacher}; {args.steps} steps, "
        f"{args.threads} thread(s), per step, profiler times (compare rows, not runs)"
    )
    print(f"# machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}; "
          f"load average {m['load_average'][0]}")  # fmt: skip
    print("| model | matrix products ms | other operators ms | operator calls |")
    print("|---|---|---|---|")
    for name in ("student", "teacher"):
        r = result[name]
        print(f"| {name} | {r['matmul_ms']:.2f} | {r['other_ms']:.2f} | {r['ops']:.0f} |")
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
