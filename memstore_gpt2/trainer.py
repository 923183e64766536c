"""Knowledge distillation of a GPT-2 teacher into a student (memory or dense), with resumable runs.

loss = alpha * T^2 * KL(p_T || p_S) + (1 - alpha) * CE  (Hinton et al.; the T^2 keeps the soft-target
gradients on the same scale as the hard-target ones when T changes).

Resumability is by construction rather than by luck: the batch of step s and the learning rate of
step s are pure functions of (seed, s); torch's RNG (dropout) is seeded from the seed when the run
starts and saved in every checkpoint; a checkpoint stores the dense weights, the optimizer, the RNG
state and the step, and its memory half -- every layer's rows -- is committed to the database with a
stamp naming that checkpoint file (:mod:`memstore_gpt2.checkpoint`). A run resumed from step s
therefore replays exactly what the uninterrupted run would have done, whenever it was stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memstore.errors import bad_parameter
from memstore_gpt2.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT_VERSION,
    WriteBackInterval,
    commit_memory,
    consistent_checkpoint,
    memory_store,
    new_run_id,
    new_token,
    write_checkpoint_file,
)
from memstore_gpt2.errors import RunInterrupted, StudentFormatError
from memstore_gpt2.interrupts import StopRequests, progress_bar
from memstore_gpt2.lm_training import (
    autocast,
    batch_for_step,
    check_precision,
    lm_logits,
    perplexity,
    resolve_device,
    warmup_cosine,
)
from memstore_torch.model_memory import (
    memory_committed,
    memory_layers,
    recording_reads,
    split_parameters,
)
from memstore_torch.optim import RowwiseAdagrad

__all__ = ["CHECKPOINT_FILE", "DistillConfig", "Distiller", "TrainState", "kd_loss"]


@dataclass
class DistillConfig:
    """Hyper-parameters of a distillation run (defaults: T=2, alpha=0.5, AdamW 3e-4)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-4
    memory_lr: float | None = None  # memory rows' own rate; None -> same as lr
    #: Row-wise Adagrad's rate for product-key value rows (extra rows; sparse gradients).
    memory_rows_lr: float = 0.1
    #: Every this many steps (0: never), each product-key memory hands its coldest trained rows
    #: (LRFU) back as blank rows: values zero, a new row's LRFU state, Adagrad state reset.
    memory_rows_reuse_every: int = 0
    #: Share of each product-key memory's rows considered at each reuse (the coldest ones).
    memory_rows_reuse_fraction: float = 0.01
    #: At each reuse, first merge rows that fired together in that step with values this near
    #: (relative distance; 0: never): ``ProductKeyMemory.recombine_rows``.
    memory_rows_recombine: float = 0.0
    #: At each reuse, the share of that step's token-heads whose best match was weakest each
    #: claim the coldest row they read (``ProductKeyMemory.insert_novel``; 0: never).
    memory_rows_novel: float = 0.0
    #: "fp32", or "bf16": forwards under torch.autocast on the run's device.
    precision: str = "fp32"
    weight_decay: float = 0.01
    warmup: int = 20
    alpha: float = 0.5
    temperature: float = 2.0
    clip: float = 1.0
    eval_every: int = 0  # 0 -> only before and after training
    eval_blocks: int | None = 64  # cap on held-out blocks per evaluation (None = all)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise bad_parameter("steps", f"must be >= 0, got {self.steps}")
        if self.batch_size <= 0:
            raise bad_parameter("batch_size", f"must be positive, got {self.batch_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad_parameter("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise bad_parameter("temperature", f"must be positive, got {self.temperature}")
        if self.lr <= 0:
            raise bad_parameter("lr", f"must be positive, got {self.lr}")
        if self.memory_lr is not None and self.memory_lr < 0:
            raise bad_parameter("memory_lr", f"must be >= 0, got {self.memory_lr}")
        if not self.memory_rows_lr > 0:
            raise bad_parameter("memory_rows_lr", f"must be positive, got {self.memory_rows_lr}")
        check_precision(self.precision)
        if self.memory_rows_reuse_every < 0:
            raise bad_parameter(
                "memory_rows_reuse_every", f"must be >= 0, got {self.memory_rows_reuse_every}"
            )
        if not self.memory_rows_recombine >= 0:
            raise bad_parameter(
                "memory_rows_recombine", f"must be >= 0, got {self.memory_rows_recombine}"
            )
        if not 0.0 <= self.memory_rows_novel <= 1.0:
            raise bad_parameter(
                "memory_rows_novel", f"must be in [0, 1], got {self.memory_rows_novel}"
            )
        if not 0.0 < self.memory_rows_reuse_fraction <= 1.0:
            raise bad_parameter(
                "memory_rows_reuse_fraction",
                f"must be in (0, 1], got {self.memory_rows_reuse_fraction}",
            )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for logits (B, T, V) and ids (B, T); per next-token position averages."""
    vocab = student_logits.shape[-1]
    s = student_logits[:, :-1].reshape(-1, vocab).float()  # (N, V), N = B*(T-1)
    t = teacher_logits[:, :-1].reshape(-1, vocab).float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s, input_ids[:, 1:].reshape(-1))
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, kl, ce


@dataclass
class TrainState:
    step: int = 0
    teacher_ppl: float | None = None
    student_init_ppl: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class Distiller:
    """Trains ``student`` towards ``teacher``; checkpoints into ``out_dir``.

    The student may be anything GPT-2-shaped; its memory layers (if any) get a separate optimizer
    group and are committed to their collections, all in one transaction, at every checkpoint.

    Constructing a Distiller seeds torch's global RNG from ``config.seed`` (dropout draws from it),
    so two runs with the same seed are identical; :meth:`load_checkpoint` restores the saved state.
    ``run_id`` names the run in the database's checkpoint stamps (a new one by default);
    ``run_info`` is plain data stored in every checkpoint (the CLI keeps the options and data
    fingerprints there to check a resume against). ``handle_signals`` makes SIGINT/SIGTERM save a
    checkpoint and raise :class:`RunInterrupted` (main thread only).

    Optimizers: AdamW for the dense weights and the featural/associative memory rows (their own
    group, ``memory_lr``); :class:`~memstore_torch.optim.RowwiseAdagrad` (``memory_rows_lr``) for
    the value rows of product-key memories, whose gradients are sparse -- AdamW would read, write
    and keep two moments of every row. Gradient clipping covers the AdamW parameters only (a
    sparse gradient's norm would need a coalesce of ~every row read; Adagrad normalises each row's
    step by its own history anyway). ``device`` ("auto", "cpu", "cuda") moves student and teacher
    there; ``config.precision`` "bf16" runs the forwards under ``torch.autocast``.
    """

    def __init__(
        self,
        student,
        teacher,
        train_blocks: np.ndarray,
        eval_blocks: np.ndarray | None,
        config: DistillConfig,
        out_dir: str | os.PathLike | None = None,
        progress: bool = False,
        tensorboard: bool = True,
        run_id: str | None = None,
        run_info: dict[str, Any] | None = None,
        handle_signals: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        config.validate()
        self.device = resolve_device(device)
        if len(train_blocks) == 0:
            raise bad_parameter("data", "holds too little text for one training block")
        self.student, self.teacher = student, teacher
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.tensorboard = tensorboard and self.out_dir is not None
        self.teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        if self.device.type != "cpu":
            self.student.to(self.device)
            self.teacher.to(self.device)
        self.row_optimizer: RowwiseAdagrad | None = None
        self.optimizer = self._build_optimizer()
        self.state = TrainState()
        self.run_id = run_id or new_run_id()
        self.run_info = dict(run_info or {})
        self.handle_signals = handle_signals
        self._saved_step: int | None = None  # step of the checkpoint on disk, if any
        self._interval: WriteBackInterval | None = None  # open while a paged student trains
        self._writer = None
        torch.manual_seed(config.seed)

    # -- setup ---------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        dense, memory, rows = split_parameters(self.student)  # rows: sparse gradients
        cfg = self.config
        if rows:
            self.row_optimizer = RowwiseAdagrad(rows, lr=cfg.memory_rows_lr)
            for group in self.row_optimizer.param_groups:
                group["name"], group["peak_lr"] = "memory_rows", group["lr"]
        groups: list[dict[str, Any]] = [
            {"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "dense"}
        ]
        if memory:
            memory_lr = cfg.lr if cfg.memory_lr is None else cfg.memory_lr
            groups.append(
                {"params": memory, "lr": memory_lr, "weight_decay": 0.0, "name": "memory"}
            )
        optimizer = torch.optim.AdamW(groups)
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
        return optimizer

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW, then the row-wise Adagrad of product-key value rows when the student has any."""
        return [self.optimizer] + ([self.row_optimizer] if self.row_optimizer is not None else [])

    def _set_lr(self, step: int) -> float:
        factor = warmup_cosine(step, self.config.steps, self.config.warmup)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        """Write the checkpoint file, then commit every memory layer with its stamp (see
        :mod:`memstore_gpt2.checkpoint` for why this order survives a kill at any moment)."""
        if self.out_dir is None:
            return
        store = memory_store(self.student)
        token = new_token()
        payload = {
            "format": FORMAT_VERSION,
            "run_id": self.run_id,
            "token": token,
            "step": self.state.step,
            "dense": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            **self._extra_payload(),
            "state": {k: v for k, v in asdict(self.state).items() if k != "step"},
            "config": asdict(self.config),
            "run": self.run_info,
        }
        write_checkpoint_file(self.out_dir, payload)
        if store is not None:  # product-key layers are MemoryLayers: flushed in this transaction
            commit_memory(self.student, store, self.run_id, self.state.step, token)
            if self._interval is not None:  # paged rows written back since the last checkpoint
                self._interval.commit()
                memory_committed(self.student)
        self._saved_step = self.state.step

    def _extra_payload(self) -> dict[str, Any]:
        """Checkpoint entries only some runs have: the row optimizer, CUDA's RNG."""
        extra: dict[str, Any] = {}
        if self.row_optimizer is not None:
            extra["row_optimizer"] = self.row_optimizer.state_dict()
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return extra

    def load_checkpoint(self) -> None:
        """Restore the checkpoint whose memory the database holds (the student's memory layers
        were loaded from that database); the dense state, optimizer, RNG and step come from it."""
        from memstore_gpt2.student import load_dense_state

        if self.out_dir is None:
            raise StudentFormatError("resuming needs the run directory (out_dir)")
        path, payload = consistent_checkpoint(self.out_dir, memory_store(self.student))
        load_dense_state(self.student, payload["dense"])
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
            if self.row_optimizer is not None:
                self.row_optimizer.load_state_dict(payload["row_optimizer"])
            elif "row_optimizer" in payload:
                raise ValueError("it has a row optimizer and this student has no extra rows")
        except (ValueError, KeyError, TypeError) as exc:
            raise StudentFormatError(
                f"{path}: the checkpoint's optimizer does not match this student ({exc})"
            ) from None
        try:
            torch.set_rng_state(payload["rng"].clone())
            if self.device.type == "cuda" and isinstance(payload.get("cuda_rng"), torch.Tensor):
                torch.cuda.set_rng_state(payload["cuda_rng"].clone(), self.device)
            self.state = TrainState(step=payload["step"], **payload["state"])
        except (RuntimeError, TypeError) as exc:
            raise StudentFormatError(f"{path} is damaged: {exc}") from None
        self.run_id = payload["run_id"]
        self.run_info = payload["run"]
        self._saved_step = self.state.step

    # -- training ------------------------------------------------------------------------------
    def evaluate_student(self) -> float:
        with autocast(self.device, self.config.precision):
            return perplexity(self.student, self.eval_blocks, max_blocks=self.config.eval_blocks)

    def _log_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        ids = batch_for_step(self.train_blocks, step, cfg.batch_size, cfg.seed)  # (B, T)
        ids = ids.to(self.device)
        lr = self._set_lr(step)
        every = cfg.memory_rows_reuse_every
        upkeep = bool(every and self.row_optimizer is not None and (step + 1) % every == 0)
        recombine = upkeep and cfg.memory_rows_recombine > 0
        novel = upkeep and cfg.memory_rows_novel > 0
        # the reads of this step's forward, when recombination or novelty look at them after it
        with recording_reads(self.student) if recombine or novel else nullcontext() as recorded:
            with autocast(self.device, cfg.precision):
                with torch.no_grad():
                    teacher_logits = lm_logits(self.teacher, ids)  # (B, T, V)
                student_logits = lm_logits(self.student, ids)  # (B, T, V)
            loss, kl, ce = kd_loss(student_logits, teacher_logits, ids, cfg.alpha, cfg.temperature)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(  # dense gradients only (class docstring)
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.clip
            )
            for optimizer in self.optimizers:
                optimizer.step()
            upkept = {}
            if recombine:
                upkept["memory_rows_recombined"] = float(self._recombine_rows(recorded))
            if novel:
                upkept["memory_rows_novel"] = float(self._insert_novel(recorded))
        if upkeep:
            upkept["memory_rows_reused"] = float(self._reuse_cold_rows())
        return {
            **upkept,
            "train_loss": float(loss.detach()),
            "kd_kl": float(kl.detach()),
            "ce": float(ce.detach()),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }

    @torch.no_grad()
    def _recombine_rows(self, recorded: dict) -> int:
        """Recombination (``MemoryLayer.recombine_last_read``): rows this step read together
        whose values are near-duplicates merge; the rows freed restart their Adagrad
        accumulators. Returns the rows merged away."""
        threshold, optimizer = self.config.memory_rows_recombine, self.row_optimizer
        return sum(layer.recombine_last_read(threshold, optimizer) for layer in recorded.values())

    @torch.no_grad()
    def _insert_novel(self, recorded: dict) -> int:
        """Novelty (``MemoryLayer.insert_novel_last_read``): this step's weakest-matched queries
        each claim the coldest row they read, whose Adagrad accumulator restarts. Returns the
        rows claimed."""
        share, optimizer = self.config.memory_rows_novel, self.row_optimizer
        return sum(layer.insert_novel_last_read(share, optimizer) for layer in recorded.values())

    @torch.no_grad()
    def _reuse_cold_rows(self) -> int:
        """LRFU eviction for always-full tables (``MemoryLayer.reuse_cold_rows``): the coldest
        ``memory_rows_reuse_fraction`` rows holding trained content become blank again and
        restart their Adagrad accumulators. Returns the rows reused."""
        fraction, optimizer = self.config.memory_rows_reuse_fraction, self.row_optimizer
        layers = memory_layers(self.student).values()
        return sum(layer.reuse_cold_rows(fraction, optimizer) for layer in layers)

    def run(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train from the current step to ``config.steps`` (or ``stop_at``); returns a summary.

        A run with a directory checkpoints once before its first step (after the initial
        evaluation), every ``checkpoint_every`` steps and at the end. On SIGINT/SIGTERM (when
        ``handle_signals``) it checkpoints after the step in flight and raises RunInterrupted.
        """
        stop = StopRequests() if self.handle_signals else StopRequests(signals=())
        try:
            # the final evaluation and checkpoint page rows too: inside the write-back interval
            with self._write_back_interval():
                with stop:
                    self._open_writer()
                    self._initial_evaluation()
                    if self.out_dir is not None and self._saved_step is None:
                        self.save_checkpoint()  # from now on the run is resumable
                    elapsed, steps_done = self._train(stop_at, stop)
                    if stop.requested and self._saved_step != self.state.step:
                        self.save_checkpoint()
                if stop.requested:
                    raise RunInterrupted(stop.name, stop.signum, self.state.step, self.config.steps)
                return self._finish(elapsed, steps_done)
        finally:
            self._close_writer()

    @contextmanager
    def _write_back_interval(self) -> Iterator[None]:
        """While the run lasts, a paged student's writes go into one transaction per checkpoint
        interval (:class:`~memstore_gpt2.checkpoint.WriteBackInterval`); a resident student's
        memory needs none (its rows reach the database only at checkpoints)."""
        store = memory_store(self.student)
        paged = any(getattr(m, "paged", False) for m in memory_layers(self.student).values())
        if store is None or not paged:  # (a run without a directory: one interval, the run)
            yield
            return
        with WriteBackInterval(store) as interval:
            self._interval = interval
            try:
                yield
            finally:
                self._interval = None

    def _open_writer(self) -> None:
        """TensorBoard writer that drops what an earlier process logged at or after this step
        (a run killed after its last checkpoint logged steps that the resumed run logs again)."""
        if not self.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        start = self.state.step
        self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start)
        # what the checkpoint already holds at the purge step is logged again
        if start == 0 and self.state.teacher_ppl is not None:
            self._log_scalar("eval/teacher_ppl", self.state.teacher_ppl, 0)
            self._log_scalar("eval/student_ppl", self.state.student_init_ppl, 0)
        for entry in self.state.evals:
            if entry["step"] >= start:
                self._log_scalar("eval/student_ppl", entry["student_ppl"], entry["step"])

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def _has_eval(self) -> bool:
        return self.eval_blocks is not None and len(self.eval_blocks) > 0

    def _initial_evaluation(self) -> None:
        if self._has_eval() and self.state.teacher_ppl is None:
            cfg = self.config
            with autocast(self.device, cfg.precision):
                self.state.teacher_ppl = perplexity(
                    self.teacher, self.eval_blocks, max_blocks=cfg.eval_blocks
                )
            self.state.student_init_ppl = self.evaluate_student()
            self._log_scalar("eval/teacher_ppl", self.state.teacher_ppl, 0)
            self._log_scalar("eval/student_ppl", self.state.student_init_ppl, 0)

    def _train(self, stop_at: int | None, stop: StopRequests) -> tuple[float, int]:
        cfg = self.config
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.student.train()
        bar = progress_bar(
            total=cfg.steps, initial=self.state.step, desc="distill", disable=not self.progress
        )
        started = time.perf_counter()
        first_step = self.state.step
        try:
            while self.state.step < end and not stop.requested:
                step = self.state.step
                metrics = self.train_step(step)
                self.state.history.append({"step": step, **metrics})
                self.state.step = step + 1
                for tag, value in metrics.items():
                    self._log_scalar(tag, value, step)
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
                bar.update(1)
                if self._has_eval() and cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    self._record_eval()
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        self.state.seconds += elapsed
        return elapsed, self.state.step - first_step

    def _finish(self, elapsed: float, steps_done: int) -> dict[str, Any]:
        student_ppl = None
        if self._has_eval():
            last = self.state.evals[-1] if self.state.evals else None
            if last is not None and last["step"] == self.state.step:
                student_ppl = last["student_ppl"]
            else:
                student_ppl = self._record_eval()
        self.save_checkpoint()
        return {
            "teacher_ppl": self.state.teacher_ppl,
            "student_init_ppl": self.state.student_init_ppl,
            "student_ppl": student_ppl,
            "steps": self.state.step,
            "final_train_loss": self.state.history[-1]["train_loss"]
            if self.state.history
            else None,
            "step_time_s": elapsed / steps_done if steps_done else None,
            "train_seconds": self.state.seconds,
        }

    def _record_eval(self) -> float:
        ppl = self.evaluate_student()
        self.state.evals.append({"step": self.state.step, "student_ppl": ppl})
        self._log_scalar("eval/student_ppl", ppl, self.state.step)
        self.student.train()
        return ppl


def sparse_row_parameters(model) -> list[torch.nn.Parameter]:
    """Memory rows trained by sparse gradients: the values of every product-key memory."""
    from memstore_torch import ProductKeyMemory

    out: dict[int, torch.nn.Parameter] = {}
    for layer in memory_layers(model).values():
        if isinstance(layer, ProductKeyMemory):
            out.update((id(p), p) for p in layer.memory_parameters())
    return list(out.values())


def write_summary(out_dir: str | os.PathLike, summary: dict) -> None:
    Path(out_dir, "distill_summary.json").write_text(json.dumps(summary, indent=2, default=_json))


def _json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
