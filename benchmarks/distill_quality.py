"""Quality of memory students against their teacher (the evaluation protocol of docs/design.md).

    python benchmarks/distill_quality.py --train ../shared/data/wikitext-2/valid.txt \
        --test ../shared/data/wikitext-2/test.txt [--steps 200] [--json]

Trains (or reuses, cached under --work) a GPT-2-architecture teacher — byte-level BPE 4096, 4 blocks,
width 256, 4 heads, n_inner 1024, context 128 — on --train, then builds on the same test tokens:
the teacher; the student with its MLPs removed (lower bound); FF-initialised featural students at
k = n_inner/16, /8, /4 before and after distillation; an associative student (empty memory); a
dense student with re-initialised MLPs (the associative student's dense counterpart); and the dense
control (the teacher's clone, MLPs intact, trained with the same loss, data and steps). Every
trained model gets exactly the same batches (same seed), so differences are the models'.

Prints a table (perplexity, ratio to the teacher, parameters in the model, rows and bytes in the
database, step time relative to the dense control) and the machine; ``--json`` prints one JSON
object with the issue's keys as the last line.

``--memory-rows 0,4096,16384,65536`` adds the memory-scaling students: the FF-initialised featural
student at k = n_inner/8 grown by that many extra product-key rows per layer (``memstore distill
gpt2 --memory-rows``: values zero at the start, row-wise Adagrad), trained like the dense control;
JSON ``memory_scaling``: one object per size (``memory_rows``, ``student_ppl``,
``dense_control_ppl``, ``step_time_ratio``, ...). ``--skip featural,associative,reinit`` leaves
out the other students (the memory-scaling run in docs/distill.md does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: CPU settings (as benchmarks/layer.py), unless already set: huge pages for the extra rows' sparse
#: gradients (fresh memory every step) and sleeping OpenMP threads on a shared machine. Every
#: student and the dense control run under them; the machine line says which were in effect.
CPU_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in CPU_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0])

from memstore import Store  # noqa: E402
from memstore_gpt2.lm_training import batch_for_step, perplexity  # noqa: E402
from memstore_gpt2.student import MemoryRows, memory_factory  # noqa: E402
from memstore_gpt2.surgery import (  # noqa: E402
    capture_mlp_inputs,
    clone_with_mlps,
    keep_mlps,
    reinit_mlps,
    remove_mlps,
)
from memstore_gpt2.teacher import TeacherSpec, load_teacher, train_teacher  # noqa: E402
from memstore_gpt2.text_data import load_blocks, read_texts  # noqa: E402
from memstore_gpt2.trainer import DistillConfig, Distiller  # noqa: E402
from memstore_torch.model_memory import flush_memory, memory_layers, memory_parameters  # noqa: E402

TEACHER = TeacherSpec(layers=4, width=256, heads=4, context=128, inner=1024, vocab=4096,
                      steps=400, batch_size=16, lr=2e-3, warmup=40, dropout=0.1, seed=0)  # fmt: skip


def machine() -> dict:
    import sqlite_vec

    try:
        import pysqlite3.dbapi2 as sqlite_mod
    except ImportError:  # pragma: no cover
        import sqlite3 as sqlite_mod
    cpu = cpu_model()
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sqlite": sqlite_mod.sqlite_version,
        "sqlite_vec": getattr(sqlite_vec, "__version__", "?"),
        "env": ", ".join(f"{name}={os.environ.get(name, '')}" for name in CPU_ENV),
    }


def get_teacher(args) -> tuple:
    """Train the evaluation-protocol teacher once and cache it under --work (reused when the spec matches)."""
    teacher_dir = Path(args.work) / "teacher"
    spec = TeacherSpec(**{**TEACHER.__dict__, "steps": args.teacher_steps})
    info_file = teacher_dir / "teacher_train.json"
    cached = info_file.is_file() and _same_spec(json.loads(info_file.read_text())["spec"], spec)
    if not cached:
        log(f"training the teacher ({spec.steps} steps) into {teacher_dir} ...")
        train_teacher(read_texts(args.train), teacher_dir, spec, progress=not args.json,
                      eval_texts=read_texts(args.test))  # fmt: skip
    model, tokenizer = load_teacher(teacher_dir)
    return model, tokenizer, json.loads(info_file.read_text())


def _same_spec(saved: dict, spec: TeacherSpec) -> bool:
    """Cache hit test; ``inner=None`` means 4*width, as in GPT-2."""
    want = dict(spec.__dict__)
    have = dict(saved)
    for d in (want, have):
        d["inner"] = d.get("inner") or 4 * d["width"]
        d.setdefault("precision", "fp32")  # teachers cached before the option existed
        d.pop("warmup", None)
    return have == want


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dense_param_count(model) -> int:
    memory_ids = {id(p) for p in memory_parameters(model)}
    return sum(p.numel() for p in model.parameters() if id(p) not in memory_ids)


def memory_rows(model, store) -> int:
    if store is None:
        return 0
    return sum(len(layer.collection) for layer in memory_layers(model).values())


class Bench:
    def __init__(self, args, teacher, train_blocks, test_blocks):
        self.args, self.teacher = args, teacher
        self.train_blocks, self.test_blocks = train_blocks, test_blocks
        self.layers = list(range(teacher.config.n_layer))
        self.n_inner = teacher.transformer.h[0].mlp.c_fc.weight.shape[1]
        self.rows: list[dict] = []
        self.results: dict[str, float] = {}
        self._calibration = None

    def ppl(self, model) -> float:
        return perplexity(model, self.test_blocks, batch_size=16)

    def calibration(self):
        if self._calibration is None:
            batches = [batch_for_step(self.train_blocks, s, 16, seed=12345) for s in range(4)]
            self._calibration = capture_mlp_inputs(self.teacher, self.layers, batches)
        return self._calibration

    def open_store(self, name: str) -> tuple[Store, str]:
        path = Path(self.args.work) / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path.resolve()}"
        return Store(url), url

    def train(self, student, name: str) -> dict:
        config = DistillConfig(
            steps=self.args.steps, batch_size=self.args.batch_size, lr=self.args.lr,
            memory_lr=self.args.memory_lr, warmup=min(20, self.args.steps // 5 + 1),
            memory_rows_lr=self.args.memory_rows_lr,
            eval_blocks=None, checkpoint_every=0, seed=self.args.seed,
        )  # fmt: skip
        distiller = Distiller(student, self.teacher, self.train_blocks, None, config,
                              out_dir=Path(self.args.work) / name, progress=not self.args.json)  # fmt: skip
        return distiller.run()

    def add(self, label: str, model, store=None, step_time=None, key: str | None = None):
        ppl = self.ppl(model)
        row = {
            "model": label,
            "ppl": ppl,
            "parameters": dense_param_count(model),
            "db_rows": memory_rows(model, store),
            "db_bytes": (store.size_bytes() or 0) if store is not None else 0,
            "step_time_s": step_time,
        }
        self.rows.append(row)
        if key:
            self.results[key] = ppl
        log(f"  {label:<40} ppl {ppl:9.2f}")
        return row

    def featural(self, divisor: int, train: bool) -> None:
        k = self.n_inner // divisor
        store, _ = self.open_store(f"featural_k{divisor}")
        try:
            factory = memory_factory("featural", store, k=k, init="mlp",
                                     calibration=self.calibration())  # fmt: skip
            student = clone_with_mlps(self.teacher, self.layers, factory)
            self.add(f"featural k={k} (n_inner/{divisor}), MLP init", student, store,
                     key=f"featural_init_ppl_k{divisor}")  # fmt: skip
            if train:
                result = self.train(student, f"featural_k{divisor}")
                flush_memory(student)
                self.add(f"featural k={k}, distilled {self.args.steps} steps", student, store,
                         step_time=result["step_time_s"], key=f"featural_ppl_k{divisor}")  # fmt: skip
        finally:
            store.close()

    def associative(self) -> None:
        store, _ = self.open_store("associative")
        try:
            factory = memory_factory("associative", store, k=self.args.assoc_k, init="random",
                                     heads=4, capacity=self.args.assoc_capacity)  # fmt: skip
            student = clone_with_mlps(self.teacher, self.layers, factory)
            result = self.train(student, "associative")
            flush_memory(student)
            self.add(f"associative k={self.args.assoc_k}, {self.args.steps} steps", student, store,
                     step_time=result["step_time_s"], key="associative_ppl")  # fmt: skip
        finally:
            store.close()

    def grown(self, memory_rows: int) -> dict:
        """The featural k = n_inner/8 student with ``memory_rows`` extra rows per layer, trained."""
        k = self.n_inner // 8
        store, _ = self.open_store(f"grown_{memory_rows}")
        try:
            factory = memory_factory("featural", store, k=k, init="mlp",
                                     calibration=self.calibration(),
                                     memory_rows=MemoryRows(
                                         memory_rows,
                                         memory_rows_heads=self.args.memory_rows_heads,
                                         memory_rows_k=self.args.memory_rows_k))  # fmt: skip
            torch.manual_seed(self.args.seed)
            student = clone_with_mlps(self.teacher, self.layers, factory)
            extra = sum(
                len(layer.collection) for layer in memory_layers(student).values()
                if layer.collection.name.endswith(".extra")
            ) // len(self.layers)  # fmt: skip
            result = self.train(student, f"grown_{memory_rows}")
            flush_memory(student)
            row = self.add(f"featural k={k} + {extra:,} extra rows/layer", student, store,
                           step_time=result["step_time_s"])  # fmt: skip
            row["memory_rows"] = extra
            return row
        finally:
            store.close()

    def dense(self, factory, label: str, key: str) -> dict:
        student = clone_with_mlps(self.teacher, self.layers, factory)
        result = self.train(student, key)
        return self.add(label, student, step_time=result["step_time_s"], key=key)


def format_table(rows: list[dict], teacher_ppl: float, control_time: float | None) -> str:
    header = (f"| {'model':<44} | {'test ppl':>9} | {'x teacher':>9} | {'params':>10} | "
              f"{'db rows':>8} | {'db MB':>7} | {'step time':>9} |")  # fmt: skip
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for row in rows:
        if row["step_time_s"] and control_time:
            rel = f"{row['step_time_s'] / control_time:.2f}x"
        else:
            rel = "-"
        lines.append(
            f"| {row['model']:<44} | {row['ppl']:9.2f} | {row['ppl'] / teacher_ppl:9.3f} | "
            f"{row['parameters']:10,} | {row['db_rows']:8,} | {row['db_bytes'] / 2**20:7.2f} | "
            f"{rel:>9} |"
        )
    return "\n".join(lines)


def format_scaling(scaling: list[dict]) -> str:
    header = (f"| {'extra rows/layer':>16} | {'test ppl':>9} | {'x teacher':>9} | "
              f"{'x dense control':>15} | {'step time x control':>19} | {'db rows':>9} | "
              f"{'db MB':>7} |")  # fmt: skip
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for s in scaling:
        ratio = "-" if s["step_time_ratio"] is None else f"{s['step_time_ratio']:.2f}x"
        lines.append(
            f"| {s['memory_rows']:16,} | {s['student_ppl']:9.2f} | {s['x_teacher']:9.3f} | "
            f"{s['x_dense_control']:15.3f} | {ratio:>19} | {s['db_rows']:9,} | "
            f"{s['db_bytes'] / 2**20:7.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training text (teacher and students)")
    parser.add_argument("--test", required=True, help="test text (perplexity)")
    parser.add_argument("--work", default="runs/distill_quality", help="cache and database dir")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER.steps)
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per student")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--memory-lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-blocks", type=int, default=0,
                        help="evaluate on the first N test blocks of 128 tokens (0: all)")  # fmt: skip
    parser.add_argument("--trained-ks", default="16,8,4",
                        help="n_inner divisors whose featural students are also distilled")  # fmt: skip
    parser.add_argument("--assoc-k", type=int, default=32)
    parser.add_argument("--assoc-capacity", type=int, default=4096)
    parser.add_argument("--skip", default="",
                        help="comma list of: featural,associative,reinit")  # fmt: skip
    parser.add_argument("--memory-rows", default="",
                        help="comma list of extra rows per layer for the memory-scaling students "
                             "(e.g. 0,4096,16384,65536; each rounded up to a square)")  # fmt: skip
    parser.add_argument("--memory-rows-lr", type=float, default=0.1)
    parser.add_argument("--memory-rows-heads", type=int, default=1)
    parser.add_argument("--memory-rows-k", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher, tokenizer, teacher_info = get_teacher(args)
    context = teacher.config.n_positions
    train_blocks = load_blocks(tokenizer, args.train, context)
    test_blocks = load_blocks(tokenizer, args.test, context)
    if args.test_blocks:
        test_blocks = test_blocks[: args.test_blocks]
    bench = Bench(args, teacher, train_blocks, test_blocks)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    trained = {int(d) for d in args.trained_ks.split(",") if d.strip()}
    log(f"evaluating on {test_blocks.size:,} test tokens; {args.steps} steps per trained student")

    teacher_row = bench.add("teacher (dense GPT-2)", teacher, key="teacher_ppl")
    bench.add("MLPs removed (lower bound)", clone_with_mlps(teacher, bench.layers, remove_mlps),
              key="no_mlp_ppl")  # fmt: skip
    control = bench.dense(keep_mlps, f"dense control, {args.steps} steps", "dense_control_ppl")
    if "featural" not in skip:
        for divisor in (16, 8, 4):
            bench.featural(divisor, train=divisor in trained)
    sizes = [int(n) for n in args.memory_rows.split(",") if n.strip()]
    grown = [bench.grown(n) for n in sizes]
    if "associative" not in skip:
        bench.associative()
    if "reinit" not in skip:
        bench.dense(reinit_mlps(args.seed), f"dense, MLPs re-initialised, {args.steps} steps",
                    "dense_reinit_ppl")  # fmt: skip

    control_time = control["step_time_s"]
    k8_rows = [r for r in bench.rows if r["model"].startswith("featural k=") and
               "distilled" in r["model"] and f"k={bench.n_inner // 8}," in r["model"]]  # fmt: skip
    ratio = k8_rows[0]["step_time_s"] / control_time if k8_rows and control_time else None
    teacher_ppl = teacher_row["ppl"]
    info = machine()
    print(f"# memstore distillation quality (evaluation protocol, docs/design.md) — {args.steps} distillation steps, "
          f"batch {args.batch_size}x{context}, teacher {teacher_info['steps']} steps")  # fmt: skip
    print(f"# machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']} "
          f"({info['torch_threads']} threads), SQLite {info['sqlite']}, "
          f"sqlite-vec {info['sqlite_vec']}, Python {info['python']}, {info['env']}")  # fmt: skip
    print(f"# test tokens: {test_blocks.size:,}; train tokens: {train_blocks.size:,}; "
          f"wall time {time.perf_counter() - started:.0f} s")  # fmt: skip
    print(format_table(bench.rows, teacher_ppl, control_time))
    control_ppl = control["ppl"]
    scaling = [
        {
            "memory_rows": row["memory_rows"],
            "memory_rows_requested": n,
            "student_ppl": row["ppl"],
            "dense_control_ppl": control_ppl,
            "x_teacher": row["ppl"] / teacher_ppl,
            "x_dense_control": row["ppl"] / control_ppl,
            "step_time_ratio": row["step_time_s"] / control_time if control_time else None,
            "db_rows": row["db_rows"],
            "db_bytes": row["db_bytes"],
        }
        for n, row in zip(sizes, grown, strict=True)
    ]
    if scaling:
        print(format_scaling(scaling))
    results = {
        **bench.results,
        "memory_scaling": scaling,
        "step_time_ratio": ratio,
        "steps": args.steps,
        "rows": bench.rows,
        "machine": info,
    }
    if args.json:
        print(json.dumps(results, default=lambda v: None if isinstance(v, float) and
                         not math.isfinite(v) else str(v)))  # fmt: skip
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
