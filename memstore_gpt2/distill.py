"""The ``memstore distill gpt2`` pipeline: teacher -> surgery -> distillation -> saved student.

One function shared by the CLI, the demo and the quality benchmark, so that what is measured is
exactly what users run.

A run is recorded in its checkpoints: every option that shapes its trajectory and fingerprints of
its teacher (sha256 of the weights) and data (sha256 of the token blocks). ``resume`` checks the
invocation against that record and refuses a difference with one line naming it; options the
caller did not choose (``DistillJob.explicit``) take the run's values. A fresh run in a directory
whose earlier run was killed before committing its first checkpoint removes what that run created
and starts again.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from memstore.errors import InvalidInputError, bad_parameter
from memstore_gpt2.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_files,
    committed_stamp,
    new_run_id,
    read_checkpoint,
    remove_checkpoint_files,
    remove_spare_checkpoint,
)
from memstore_gpt2.db_lock import DatabaseWriter
from memstore_gpt2.errors import StudentFormatError
from memstore_gpt2.student import MemoryRows, check_layer_kind
from memstore_gpt2.text_data import default_context
from memstore_gpt2.trainer import DistillConfig, Distiller, write_summary
from memstore_torch.budget import MemoryBudget

#: Job options that shape a run's trajectory: a resume must keep them.
TRAJECTORY_JOB_OPTIONS = (
    "kind", "k", "init", "layers", "context", "heads", "capacity", "calibration_batches",
    "memory_rows", "memory_rows_heads", "memory_rows_k",
)  # fmt: skip
#: DistillConfig fields that shape the trajectory (or the reported perplexities).
TRAJECTORY_CONFIG_OPTIONS = (
    "batch_size", "lr", "memory_lr", "weight_decay", "warmup", "alpha", "temperature", "clip",
    "eval_blocks", "seed", "memory_rows_lr", "precision", "memory_rows_reuse_every",
    "memory_rows_reuse_fraction", "memory_rows_recombine", "memory_rows_novel",
)  # fmt: skip
#: What a run recorded before an option existed meant this value (older runs still resume).
OPTION_DEFAULTS = {
    "memory_rows": 0, "memory_rows_heads": 1, "memory_rows_k": 32, "memory_rows_lr": 0.1,
    "precision": "fp32", "memory_rows_reuse_every": 0, "memory_rows_reuse_fraction": 0.01,
    "memory_rows_recombine": 0.0, "memory_rows_novel": 0.0,
}  # fmt: skip
#: DistillConfig fields a resume may change (``steps`` may grow; the rest do not change results).
FREE_CONFIG_OPTIONS = ("steps", "eval_every", "checkpoint_every", "log_every")


@dataclass
class DistillJob:
    """Everything ``memstore distill gpt2`` needs; field names follow the CLI flags.

    ``explicit``: the option names the caller chose; when resuming, every other option takes the
    run's recorded value. None means all were chosen (a resume then checks every one of them).
    """

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
    memory_rows: int = 0  # extra product-key rows per memory layer (rounded up to a square)
    memory_rows_heads: int = 1
    memory_rows_k: int = 32
    device: str = "auto"  # where the run trains; a resume may change it
    memory_budget: str | None = None  # resident share of the extra rows; a resume may change it
    config: DistillConfig = field(default_factory=DistillConfig)
    progress: bool = True
    explicit: frozenset[str] | None = None

    def chose(self, name: str) -> bool:
        return self.explicit is None or name in self.explicit


def prepare_data(tokenizer, job: DistillJob, context: int):
    """(train_blocks, eval_blocks) for the job: --eval-data, or the last 10 % of --data."""
    from memstore_gpt2.text_data import holdout_split, load_blocks

    blocks = load_blocks(tokenizer, job.data, context)
    if job.eval_data:
        return blocks, load_blocks(tokenizer, job.eval_data, context)
    return holdout_split(blocks)


def blocks_fingerprint(blocks: np.ndarray) -> str:
    """sha256 of token blocks (shape, dtype and ids): equal exactly when the data is the same."""
    digest = hashlib.sha256(f"{blocks.shape}|{blocks.dtype}".encode())
    digest.update(np.ascontiguousarray(blocks).tobytes())
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _run_options(job: DistillJob, layers: list[int], context: int) -> dict[str, Any]:
    options = {name: getattr(job, name) for name in TRAJECTORY_JOB_OPTIONS}
    options.update(layers=list(layers), context=context)
    options.update(asdict(job.config))
    return options


def _adopt_run_options(job: DistillJob, recorded: dict[str, Any]) -> None:
    """Options the caller did not choose take the values the run was started with."""
    config_names = {f.name for f in fields(DistillConfig)}
    for name, value in recorded.items():
        if job.chose(name):
            continue
        if name in config_names:
            setattr(job.config, name, value)
        elif name == "layers":
            job.layers = ",".join(str(i) for i in value)
        elif name in TRAJECTORY_JOB_OPTIONS:
            setattr(job, name, value)


def _check_same_run(job: DistillJob, record: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse, with one line naming it, the first way this invocation differs from the run."""
    if record.get("teacher_sha256") != current["teacher_sha256"]:
        raise bad_parameter(
            "teacher",
            f"{job.teacher!r} is not the teacher of the run being resumed "
            f"({record.get('teacher')!r}): their weights differ",
        )
    for name, what in (("data", "training"), ("eval_data", "held-out")):
        was, now = record.get(f"{name}_sha256"), current[f"{name}_sha256"]
        if was != now:
            raise bad_parameter(
                name,
                f"differs from the {what} data of the run being resumed (sha256 of its token "
                f"blocks {now[:12]}, the run's {str(was)[:12]}); resume with the run's data, "
                "or start a new run in another directory",
            )
    recorded = record.get("options", {})
    for name in TRAJECTORY_JOB_OPTIONS + TRAJECTORY_CONFIG_OPTIONS:
        was, now = recorded.get(name, OPTION_DEFAULTS.get(name)), current["options"][name]
        if was != now:
            raise bad_parameter(
                name,
                f"is {now!r} but the run being resumed used {was!r}; leave it out to keep the "
                "run's value, or start a new run in another directory",
            )


_START_AGAIN = "run the same command without --resume to start it again"


def _saved_run(out: Path) -> tuple[str, dict[str, Any]]:
    """(run id, run record) of the checkpoint in ``out`` (both checkpoint files hold the same)."""
    files = checkpoint_files(out)
    if not files:
        raise StudentFormatError(
            f"--resume: {out} has no {CHECKPOINT_FILE} to resume from (its run stopped before "
            f"its first checkpoint); {_START_AGAIN}"
        )
    payload = read_checkpoint(files[0])
    record = payload["run"]
    if not isinstance(record.get("options"), dict) or "data_sha256" not in record:
        raise StudentFormatError(
            f"--resume: {files[0]} does not record the options of its run, so a resume cannot be "
            "checked against it; start a new run"
        )
    return payload["run_id"], record


def _prepare_fresh_directory(out: Path) -> None:
    """Refuse a directory holding a run with trained steps; clear one whose run stopped before
    its first step (never committed a checkpoint, or only the step-0 one: a resume would gain
    nothing over starting again, and refusing would block the same command forever)."""
    from memstore import Store
    from memstore.errors import DatabaseError
    from memstore_gpt2.student import STUDENT_FILE, read_manifest, resolve_db_url, run_unfinished

    refuse = InvalidInputError(
        f"{out} already holds a distillation run; pass --resume to continue it, "
        "or choose another --out"
    )
    if not (out / STUDENT_FILE).is_file():
        if checkpoint_files(out):
            raise refuse
        return
    manifest = read_manifest(out)
    if not run_unfinished(manifest):
        if checkpoint_files(out):
            raise refuse
        return
    run = manifest["run"]
    try:
        store = Store(resolve_db_url(out, manifest), create=False)
    except DatabaseError:
        store = None  # its database was never created: nothing to clear there
    try:
        if store is not None:
            stamp = committed_stamp(store, str(run.get("id")))
            if stamp is not None and stamp[0] > 0:  # trained steps that --resume would keep
                raise refuse
            for name in run.get("collections", []):
                if store.has_collection(name):
                    store.drop_collection(name)
    finally:
        if store is not None:
            store.close()
    remove_checkpoint_files(out)


@dataclass
class RunInputs:
    """What both a fresh and a resumed run read before touching the directory: the teacher, the
    data, the options as built once (``rows``: the extra rows' :class:`MemoryRows`) and the
    fingerprints a checkpoint records (``current``)."""

    teacher: Any
    tokenizer: Any
    layers: list[int]
    context: int
    rows: MemoryRows
    budget: MemoryBudget | None
    device: Any
    train_blocks: np.ndarray
    eval_blocks: np.ndarray
    current: dict[str, Any]


@dataclass
class RunSetup:
    """A run ready to train, as :func:`start_run` or :func:`resume_run` leave it: the student
    bound to its database, the writer lock held, the manifest's ``run`` record and ``info``."""

    inputs: RunInputs
    out: Path
    db_url: str
    writer: DatabaseWriter
    store: Any
    student: Any
    run: dict[str, Any]
    info: dict[str, Any]
    resumed: bool

    def close(self, *, finished: bool = False) -> None:
        """Close the database and drop the lock (removing its file once the run finished)."""
        from memstore_gpt2.db_lock import release_writer

        self.store.close()
        release_writer(self.writer, remove_file=finished)


def run_distill(job: DistillJob) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the summary that ``--json`` prints."""
    from memstore_gpt2.student import memory_slots, save_student, slot_rows
    from memstore_torch.model_memory import memory_parameters, paging_stats

    started = time.perf_counter()
    setup = resume_run(job) if job.resume else start_run(job)
    inputs, out, student = setup.inputs, setup.out, setup.student
    finished = False
    try:
        distiller = Distiller(
            student,
            inputs.teacher,
            inputs.train_blocks,
            inputs.eval_blocks,
            job.config,
            out_dir=out,
            progress=job.progress,
            run_id=setup.run["id"],
            run_info=inputs.current,
            device=inputs.device,
        )
        if setup.resumed:
            distiller.load_checkpoint()
        result = distiller.run()
        run = {**setup.run, "id": distiller.run_id, "finished": True}
        save_student(student, inputs.tokenizer, out, setup.db_url, info=setup.info, run=run)
        finished = True
        remove_spare_checkpoint(out)
        slots = memory_slots(student)
        counts = {str(key): slot_rows(module) for key, module in slots.items()}
        db_bytes = setup.store.size_bytes()
        paging = paging_stats(student)
    finally:
        setup.close(finished=finished)
    summary = {
        **result,
        "db": setup.db_url,
        "out": str(out),
        "kind": setup.info["kind"],
        "k": setup.info["k"],
        "init": setup.info["init"],
        "layers": list(slots),
        # every collection of each slot (extra rows included), and of which extra rows
        "memory_rows": {key: total for key, (total, _) in counts.items()},
        "memory_extra_rows": {key: extra for key, (_, extra) in counts.items()},
        "memory_rows_requested": job.memory_rows,  # per layer, before rounding up to a square
        "device": str(inputs.device),
        "precision": job.config.precision,
        "memory_budget": job.memory_budget,
        "paging": paging,  # what the memory held and read (memstore_torch.paging_stats)
        "db_bytes": db_bytes,
        "parameters": sum(p.numel() for p in student.parameters())
        - sum(p.numel() for p in memory_parameters(student)),
        "teacher_parameters": sum(p.numel() for p in inputs.teacher.parameters()),
        "train_tokens": int(inputs.train_blocks.size),
        "eval_tokens": int(inputs.eval_blocks.size),
        "seconds": time.perf_counter() - started,
    }
    write_summary(out, summary)
    return summary


def read_inputs(job: DistillJob) -> RunInputs:
    """Validate the options (once: a resume calls this after adopting the run's), load the
    teacher and the data, and refuse a budget too small for one step -- all before the run's
    directory or database is touched."""
    from memstore_gpt2.lm_training import resolve_device
    from memstore_gpt2.surgery import parse_layers
    from memstore_gpt2.teacher import load_teacher

    job.config.validate()
    rows = MemoryRows(job.memory_rows, job.memory_rows_heads, job.memory_rows_k)
    budget = None if job.memory_budget is None else MemoryBudget.parse(job.memory_budget)
    device = resolve_device(job.device)
    teacher, tokenizer = load_teacher(job.teacher)
    layers = parse_layers(job.layers, teacher.config.n_layer)
    context = job.context or default_context(teacher.config.n_positions)
    if context > teacher.config.n_positions:
        raise InvalidInputError(
            f"--context {context} exceeds the teacher's {teacher.config.n_positions} positions"
        )
    check_budget_covers_a_step(job, rows, budget, teacher.config.n_embd, len(layers), context)
    train_blocks, eval_blocks = prepare_data(tokenizer, job, context)
    current = {
        "teacher": job.teacher,
        "teacher_sha256": model_fingerprint(teacher),
        "data_sha256": blocks_fingerprint(train_blocks),
        "eval_data_sha256": blocks_fingerprint(eval_blocks),
        "options": _run_options(job, layers, context),
    }
    return RunInputs(teacher, tokenizer, layers, context, rows, budget, device,
                     train_blocks, eval_blocks, current)  # fmt: skip


def start_run(job: DistillJob) -> RunSetup:
    """A fresh run: clear what an earlier run that never trained a step left, take the lock,
    record the run in the manifest (before any collection exists, so a run killed during surgery
    can be cleared), then surgery and the first save."""
    from memstore_gpt2.student import default_db_url, save_student, write_manifest

    # a resume instead refuses any layer option that differs from its run (_check_same_run)
    check_layer_kind(job.kind, job.k, job.init)
    inputs = read_inputs(job)
    out = Path(job.out)
    _prepare_fresh_directory(out)
    db_url = job.db or default_db_url(out)
    out.mkdir(parents=True, exist_ok=True)
    writer, store = _open_locked(db_url, out)
    names = run_collections(job, inputs.layers)
    run = {"id": new_run_id(), "finished": False, "collections": names}
    info = {"teacher": job.teacher, "kind": job.kind, "k": job.k, "init": job.init}
    if job.memory_rows:
        info["memory_rows"] = job.memory_rows
    try:
        _check_no_clash(store, names)
        write_manifest(out, db_url, {}, info, run)
        import torch

        torch.manual_seed(job.config.seed)  # layers drawn at random start the same each run
        student = _new_student(job, inputs, store)
        save_student(student, inputs.tokenizer, out, db_url, info=info, run=run)
    except BaseException:
        store.close()
        writer.release()
        raise
    return RunSetup(inputs, out, db_url, writer, store, student, run, info, resumed=False)


def resume_run(job: DistillJob) -> RunSetup:
    """A resumed run: the options the caller left out take the run's values, every other one
    must equal them, the database must hold a committed checkpoint of this run; the student is
    rebuilt from the directory and its database (:meth:`Distiller.load_checkpoint` then restores
    the trainer's state)."""
    from memstore_gpt2.student import (
        build_student_skeleton,
        read_manifest,
        resolve_db_url,
        write_manifest,
    )

    out = Path(job.out)
    manifest = read_manifest(out)
    run_id, record = _saved_run(out)
    _adopt_run_options(job, record["options"])
    inputs = read_inputs(job)
    _check_same_run(job, record, inputs.current)
    db_url = resolve_db_url(out, manifest, job.db)
    writer, store = _open_locked(db_url, out, create=False)
    run = dict(manifest.get("run") or {}, id=run_id, finished=False)
    info = manifest.get("info") or {}
    try:
        if committed_stamp(store, run_id) is None:
            raise StudentFormatError(
                f"--resume: the run in {out} stopped before its first checkpoint was "
                f"committed to its database; {_START_AGAIN}"
            )
        student = build_student_skeleton(out, manifest, store, inputs.budget)
        write_manifest(out, db_url, manifest["layers"], manifest.get("info"), run)
    except BaseException:
        store.close()
        writer.release()
        raise
    return RunSetup(inputs, out, db_url, writer, store, student, run, info, resumed=True)


def extra_cache_rows(
    rows: MemoryRows, budget: MemoryBudget | None, n_embd: int, n_layers: int
) -> int | None:
    """Cache rows of each layer's extra rows under ``budget`` (None: all resident). The layers'
    tables are alike, so each gets the same share (``MemoryBudget.cache_rows``)."""
    from memstore_torch.paged_rows import PagedRows

    if budget is None or not rows.n_rows:
        return None
    table = (rows.n_rows, PagedRows.bytes_per_slot(2, n_embd))
    return budget.cache_rows([table] * n_layers)[0]


def check_budget_covers_a_step(
    job: DistillJob, rows: MemoryRows, budget: MemoryBudget | None, n_embd: int, n_layers: int,
    context: int,
) -> None:  # fmt: skip
    """Refuse, before any work, a ``--memory-budget`` too small for one step of this run.

    A paged layer must hold every distinct row one forward reads at once (a training forward's
    rows also stay pinned until the optimizer step), so the need is the worst case of one step,
    known from the options alone: ``min(rows, blocks x context x heads x k)`` for the training
    batch (``--batch-size``) and for an evaluation batch (``EVAL_BATCH_SIZE`` blocks, at most
    ``--eval-blocks``). What one batch happens to read is data-dependent and smaller, which is
    why a need measured at the first fetch differed from run to run and from step to step.
    """
    from memstore_gpt2.lm_training import EVAL_BATCH_SIZE

    cached = extra_cache_rows(rows, budget, n_embd, n_layers)
    if cached is None:  # every row resident: nothing pages
        return
    reads = context * rows.reads_per_token  # rows one block reads
    cfg = job.config
    batches = {"--batch-size": cfg.batch_size}  # the training forward (its rows stay pinned)
    if cfg.eval_blocks != 0:  # an evaluation forward, EVAL_BATCH_SIZE blocks at most
        batches["--eval-blocks"] = min(EVAL_BATCH_SIZE, cfg.eval_blocks or EVAL_BATCH_SIZE)
    blocks = max(batches.values())
    need = min(rows.n_rows, blocks * reads)
    if need <= cached:
        return
    fits = cached // reads  # blocks per forward this budget holds
    over = [flag for flag, n in batches.items() if n > fits]
    if fits:
        lower = "lower " + " and ".join(f"{flag} to {fits}" for flag in over)
    else:
        lower = "lower --memory-rows-k, --memory-rows-heads or --context"
    raise bad_parameter(
        "memory_budget",
        f"{budget} keeps {cached} of each layer's {rows.n_rows} extra rows in memory, but one "
        f"step may read {need} of them at once ({blocks} blocks x {context} tokens x "
        f"{rows.memory_rows_heads} --memory-rows-heads x {rows.k} --memory-rows-k, at most "
        f"every row); raise it to at least {math.ceil(100 * need / rows.n_rows)}%, or {lower}",
    )


def _open_locked(db_url: str, out: Path, **store_options):
    """(writer lock, Store): the run holds the database's writer lock for its whole life, so a
    ``memstore edit`` meanwhile is refused instead of being overwritten by the next flush."""
    from memstore import Store
    from memstore_gpt2.db_lock import hold_database

    writer = hold_database(db_url, out, "training")
    try:
        return writer, Store(db_url, **store_options)
    except BaseException:
        writer.release()
        raise


def run_collections(job: DistillJob, layers: list[int]) -> list[str]:
    """The collections a fresh run creates: ``layer<i>``, and ``layer<i>.extra`` with extra rows."""
    from memstore_gpt2.student import collection_name, extra_collection_name

    names = [collection_name(i) for i in layers]
    if job.memory_rows:
        names += [extra_collection_name(i) for i in layers]
    return names


def _check_no_clash(store, names: list[str]) -> None:
    existing = {c.name for c in store.list_collections()}
    clash = sorted(existing & set(names))
    if clash:
        raise InvalidInputError(
            f"database {store.url} already holds collection(s) {', '.join(clash)}; "
            "pass --resume to continue that run, or give another --db"
        )


def _new_student(job: DistillJob, inputs: RunInputs, store):
    """Surgery for a fresh run: memory layers bound to ``layer<i>`` collections of ``store``; under
    a budget the extra rows are written straight to the store and page from there."""
    from memstore_gpt2.lm_training import batch_for_step
    from memstore_gpt2.student import memory_factory
    from memstore_gpt2.surgery import capture_mlp_inputs, clone_with_mlps

    teacher, rows = inputs.teacher, inputs.rows
    calibration = None
    if job.init == "mlp":
        batches = [
            batch_for_step(inputs.train_blocks, s, job.config.batch_size, job.config.seed + 1)
            for s in range(job.calibration_batches)
        ]
        calibration = capture_mlp_inputs(teacher, inputs.layers, batches)
    factory = memory_factory(
        job.kind,
        store,
        k=job.k,
        init=job.init,
        calibration=calibration,
        heads=job.heads,
        capacity=job.capacity,
        memory_rows=rows,
        cache_rows=extra_cache_rows(rows, inputs.budget, teacher.config.n_embd, len(inputs.layers)),
    )
    return clone_with_mlps(teacher, inputs.layers, factory)
