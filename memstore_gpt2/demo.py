"""``memstore demo``: the whole product, offline, in a few minutes on a laptop-class CPU.

Every CPython ships several hundred KB of English prose (the ``help()`` topics in
``pydoc_data.topics``), so the demo needs no download: it trains a small GPT-2 teacher on that text,
distils it into a student whose feed-forward memory lives in a SQLite file, and compares their
held-out perplexities. ``--data`` swaps in the user's own text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from memstore_gpt2.distill import DistillJob, run_distill
from memstore_gpt2.teacher import TeacherSpec, train_teacher
from memstore_gpt2.text_data import python_docs_corpus, read_texts
from memstore_gpt2.trainer import DistillConfig

# Sized so both phases finish in a few minutes on 2 cores (see docs/distill.md for timings).
DEMO_TEACHER = TeacherSpec(
    layers=2, width=128, heads=4, context=64, inner=512, vocab=2048, steps=400,
    batch_size=16, lr=2e-3, warmup=40, dropout=0.0, seed=0,
)  # fmt: skip
DEMO_DISTILL_STEPS = 100
DEMO_K = 64  # n_inner / 8


def run_demo(
    data: list[str] | None,
    out: str | Path,
    teacher_steps: int | None = None,
    distill_steps: int | None = None,
    log=print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train teacher -> distil -> report; returns the summary (also what ``--json`` prints)."""
    started = time.perf_counter()
    out = Path(out)
    corpus_dir = out / "data"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if data:
        texts = read_texts(data)
        source = ", ".join(data)
    else:
        texts = python_docs_corpus()
        source = "Python's built-in help topics (pydoc_data.topics)"
    for old in corpus_dir.glob("*.txt"):
        old.unlink()
    for index, text in enumerate(texts):  # one file per text, in order: same tokens as the teacher
        (corpus_dir / f"{index:05d}.txt").write_text(text, encoding="utf-8")
    log(f"[1/2] training a small GPT-2 teacher on {source} ...")
    spec = TeacherSpec(**{**DEMO_TEACHER.__dict__})
    if teacher_steps is not None:
        spec.steps = teacher_steps
        spec.warmup = min(spec.warmup, max(1, teacher_steps // 10))
    teacher_dir = out / "teacher"
    teacher_summary = train_teacher(texts, teacher_dir, spec, progress=progress)
    log(
        f"      teacher: {teacher_summary['parameters']:,} parameters, "
        f"{teacher_summary['seconds']:.0f} s"
    )
    student_dir = out / "student"
    steps = DEMO_DISTILL_STEPS if distill_steps is None else distill_steps
    log(f"[2/2] distilling it into a student whose MLP memory lives in SQLite ({steps} steps) ...")
    job = DistillJob(
        teacher=str(teacher_dir),
        data=[str(corpus_dir)],
        out=str(student_dir),
        kind="featural",
        k=DEMO_K,
        init="mlp",
        context=spec.context,
        config=DistillConfig(
            steps=steps, warmup=min(10, steps), eval_blocks=None, checkpoint_every=0
        ),  # fmt: skip
        progress=progress,
    )
    summary = run_distill(job)
    teacher_ppl, student_ppl = summary["teacher_ppl"], summary["student_ppl"]
    rows = sum(summary["memory_rows"].values())
    log("")
    log(f"  held-out perplexity   teacher {teacher_ppl:8.2f}")
    log(
        f"                        student {summary['student_init_ppl']:8.2f}  (before distillation)"
    )
    log(
        f"                        student {student_ppl:8.2f}  (after {steps} steps, "
        f"{student_ppl / teacher_ppl:.3f}x the teacher)"
    )
    log(f"  memory: {rows} rows in {summary['db']}")
    log(f"  total time: {time.perf_counter() - started:.0f} s")
    log(f"  try: memstore generate {student_dir} --prompt 'The for statement'")
    return {
        **summary,
        "teacher_dir": str(teacher_dir),
        "teacher_train_seconds": teacher_summary["seconds"],
        "total_seconds": time.perf_counter() - started,
    }
