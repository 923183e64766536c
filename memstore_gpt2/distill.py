"""The ``memstore distill gpt2`` pipeline: teacher -> surgery -> distillation -> saved student.

One function shared by the CLI, the demo and the quality benchmark, so that what is measured is
exactly what users run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memstore.errors import InvalidInputError
from memstore_gpt2.errors import StudentFormatError
from memstore_gpt2.trainer import CHECKPOINT_FILE, DistillConfig, Distiller, write_summary


@dataclass
class DistillJob:
    """Everything ``memstore distill gpt2`` needs; field names follow the CLI flags."""

    teacher: str
    data: list[str]
    out: str
    eval_data: list[str] | None = None
    db: str | None = None
    kind: str = "featural"
    k: int = 128
    init: str = "mlp"
    layers: str | None = None
    resume: bool = False
    context: int | None = None  # block length; None -> min(teacher context, 128)
    heads: int = 4  # associative memory heads
    capacity: int | None = None  # associative memory rows per layer
    calibration_batches: int = 4
    config: DistillConfig = field(default_factory=DistillConfig)
    progress: bool = True


def prepare_data(tokenizer, job: DistillJob, context: int):
    """(train_blocks, eval_blocks) for the job: --eval-data, or the last 10 % of --data."""
    from memstore_gpt2.text_data import holdout_split, load_blocks

    blocks = load_blocks(tokenizer, job.data, context)
    if job.eval_data:
        return blocks, load_blocks(tokenizer, job.eval_data, context)
    return holdout_split(blocks)


def run_distill(job: DistillJob) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the summary that ``--json`` prints."""
    from memstore import Store
    from memstore_gpt2.db_lock import hold_database
    from memstore_gpt2.student import (
        build_student_skeleton,
        default_db_url,
        memory_factory,
        memory_slots,
        read_manifest,
        resolve_db_url,
        save_student,
    )
    from memstore_gpt2.surgery import parse_layers
    from memstore_gpt2.teacher import load_teacher
    from memstore_torch.model_memory import memory_parameters

    started = time.perf_counter()
    job.config.validate()  # before any work: a bad option must not fail deep inside calibration
    teacher, tokenizer = load_teacher(job.teacher)
    layers = parse_layers(job.layers, teacher.config.n_layer)
    context = job.context or min(teacher.config.n_positions, 128)
    if context > teacher.config.n_positions:
        raise InvalidInputError(
            f"--context {context} exceeds the teacher's {teacher.config.n_positions} positions"
        )
    train_blocks, eval_blocks = prepare_data(tokenizer, job, context)
    out = Path(job.out)
    checkpoint = out / CHECKPOINT_FILE

    if job.resume:
        manifest = read_manifest(out)
        if not checkpoint.is_file():
            raise StudentFormatError(f"--resume: {out} has no {CHECKPOINT_FILE} to resume from")
        db_url = resolve_db_url(out, manifest, job.db)
    else:
        if checkpoint.is_file():
            raise InvalidInputError(
                f"{out} already holds a distillation run; pass --resume to continue it, "
                "or choose another --out"
            )
        db_url = job.db or default_db_url(out)
        # validates --kind/--init/--k before the store is touched
        memory_factory(job.kind, None, k=job.k, init=job.init, heads=job.heads)
        out.mkdir(parents=True, exist_ok=True)
    info = {"teacher": job.teacher, "kind": job.kind, "k": job.k, "init": job.init}
    if job.resume:  # what the run was started with wins over this invocation's defaults
        info = {**info, **{k: v for k, v in manifest.get("info", {}).items() if k in info}}
    writer = hold_database(db_url, out, "training")  # an edit meanwhile would be overwritten
    try:
        store = Store(db_url)
    except BaseException:
        writer.release()
        raise
    try:
        if job.resume:
            student = build_student_skeleton(out, manifest, store)
        else:
            student = _new_student(job, teacher, layers, train_blocks, store)
            save_student(student, tokenizer, out, db_url, info=info)
    except BaseException:
        store.close()
        writer.release()
        raise

    try:
        distiller = Distiller(
            student,
            teacher,
            train_blocks,
            eval_blocks,
            job.config,
            out_dir=out,
            progress=job.progress,
        )
        if job.resume:
            distiller.load_checkpoint()
        result = distiller.run()
        save_student(student, tokenizer, out, db_url, info=info)
        slots = memory_slots(student)
        rows = {str(key): len(layer.collection) for key, layer in slots.items()}
        db_bytes = store.size_bytes()
    finally:
        store.close()
        writer.release()
    summary = {
        **result,
        "db": db_url,
        "out": str(out),
        "kind": info["kind"],
        "k": info["k"],
        "init": info["init"],
        "layers": list(slots),
        "memory_rows": rows,
        "db_bytes": db_bytes,
        "parameters": sum(p.numel() for p in student.parameters())
        - sum(p.numel() for p in memory_parameters(student)),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "train_tokens": int(train_blocks.size),
        "eval_tokens": int(eval_blocks.size),
        "seconds": time.perf_counter() - started,
    }
    write_summary(out, summary)
    return summary


def _new_student(job: DistillJob, teacher, layers: list[int], train_blocks, store):
    """Surgery for a fresh run: memory layers bound to ``layer<i>`` collections of ``store``."""
    from memstore_gpt2.lm_training import batch_for_step
    from memstore_gpt2.student import collection_name, memory_factory
    from memstore_gpt2.surgery import capture_mlp_inputs, clone_with_mlps

    existing = {c.name for c in store.list_collections()}
    clash = sorted(existing & {collection_name(i) for i in layers})
    if clash:
        raise InvalidInputError(
            f"database {store.url} already holds collection(s) {', '.join(clash)}; "
            "pass --resume to continue that run, or give another --db"
        )
    calibration = None
    if job.init == "mlp":
        batches = [
            batch_for_step(train_blocks, s, job.config.batch_size, job.config.seed + 1)
            for s in range(job.calibration_batches)
        ]
        calibration = capture_mlp_inputs(teacher, layers, batches)
    factory = memory_factory(
        job.kind,
        store,
        k=job.k,
        init=job.init,
        calibration=calibration,
        heads=job.heads,
        capacity=job.capacity,
    )
    return clone_with_mlps(teacher, layers, factory)
