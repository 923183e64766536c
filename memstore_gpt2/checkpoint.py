"""Training checkpoints whose dense half (a file) and memory half (database rows) are one unit.

A checkpoint of a memory student lives in two places: ``checkpoint.pt`` in the run directory (dense
weights, optimizer, RNG, step) and the memory rows in the database. No file system commits together
with a database, so an order and a stamp make the two halves one unit:

1. the file for step ``s`` gets a fresh random *token*; it is written under a temporary name and
   fsynced, the current ``checkpoint.pt`` becomes ``checkpoint.prev.pt``, and the new file is renamed
   into place (then the directory is fsynced);
2. every memory layer is flushed in ONE database transaction that also records ``(run id, s,
   token)`` in the table ``memstore_gpt2_checkpoints``.

So the database never runs ahead of the files: after a kill at any moment, the token committed in
the database names a file that exists -- the new one once step 2 committed, the previous one before
that -- and :func:`consistent_checkpoint` resumes from exactly that file. A run killed between the
two steps therefore resumes from the previous checkpoint, whose memory the database still holds,
and replays the steps since (batches, learning rates and dropout are functions of the seed and the
step, so the replay is exact). A dense student (no memory layers) has only the file half; either
file is then a whole checkpoint.

Files are read with ``torch.load(weights_only=True)``: a checkpoint holds plain data (tensors,
numbers, strings, lists, dicts), so a tampered one is refused instead of running code.
"""

from __future__ import annotations

import os
import pickle
import secrets
import uuid
import zipfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from memstore.durable import install, temporary_path, write_durably
from memstore.errors import InvalidInputError, first_line
from memstore_gpt2.errors import StudentFormatError
from memstore_torch.model_memory import flush_memory, memory_layers

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
TEMPORARY_FILE = temporary_path(CHECKPOINT_FILE).name
FORMAT_VERSION = 2

#: The database half of the stamp: which checkpoint file the memory rows belong to.
STAMPS = sa.Table(
    "memstore_gpt2_checkpoints",
    sa.MetaData(),
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("token", sa.String(64), nullable=False),
)

#: Keys every checkpoint payload has, with the type each must be.
_PAYLOAD_TYPES = {
    "format": int,
    "run_id": str,
    "token": str,
    "step": int,
    "dense": dict,
    "optimizer": dict,
    "rng": torch.Tensor,
    "state": dict,
    "config": dict,
    "run": dict,
}


def new_run_id() -> str:
    return uuid.uuid4().hex


def new_token() -> str:
    return secrets.token_hex(16)


def checkpoint_files(out_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint files present in ``out_dir``, the current one first."""
    out = Path(out_dir)
    return [p for p in (out / CHECKPOINT_FILE, out / PREVIOUS_FILE) if p.is_file()]


def remove_checkpoint_files(out_dir: str | os.PathLike) -> None:
    """Delete every checkpoint file of ``out_dir`` (restarting a run that never committed one)."""
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE, TEMPORARY_FILE):
        Path(out_dir, name).unlink(missing_ok=True)


def remove_spare_checkpoint(out_dir: str | os.PathLike) -> None:
    """After a finished run: delete ``checkpoint.prev.pt`` (and a stray temporary file). The
    previous file only matters while a memory commit may still be at it; once the run's last
    commit and its finished manifest are in place, ``checkpoint.pt`` alone is what a
    ``--resume --steps N`` that extends the run reads."""
    for name in (PREVIOUS_FILE, TEMPORARY_FILE):
        Path(out_dir, name).unlink(missing_ok=True)


# -- the file half -----------------------------------------------------------------------------------
def write_checkpoint_file(out_dir: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Durably install ``payload`` as ``checkpoint.pt``, keeping the one it replaces as
    ``checkpoint.prev.pt`` (the database may still be at that one until the memory commit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / TEMPORARY_FILE
    write_durably(tmp, lambda handle: torch.save(payload, handle))
    _keep_previous(out)
    install(tmp, out / CHECKPOINT_FILE)
    return out / CHECKPOINT_FILE


def _keep_previous(out: Path) -> None:
    current = out / CHECKPOINT_FILE
    if current.exists():
        os.replace(current, out / PREVIOUS_FILE)


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, Any]:
    """A checkpoint payload, loaded as plain data only; :class:`StudentFormatError` otherwise.

    ``mmap`` (the default) maps the tensors instead of reading them: cheap when only the step,
    token or run record is wanted. Load with ``mmap=False`` to keep the tensors, so that no
    mapping pins the file's disk space after the next checkpoint replaces it.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):  # what torch.save writes; the rest is damage
        raise StudentFormatError(f"{path} is damaged or not a memstore checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # weights_only refuses a reference to a function or class as an "unsupported GLOBAL"
        refused = [line for line in str(exc).splitlines() if "GLOBAL" in line]
        if not refused:  # anything else it cannot unpickle is plain damage
            raise StudentFormatError(f"{path} is damaged (not a readable checkpoint)") from None
        raise StudentFormatError(
            f"{path} holds objects other than plain data (tensors, numbers, strings); refusing to "
            f"load it, because unpickling them could run code ({refused[0].strip()})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise StudentFormatError(
            f"{path} is damaged or not a memstore checkpoint ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise StudentFormatError(
            f"{path} is not a checkpoint this memstore can resume (format {found!r}, expected "
            f"{FORMAT_VERSION}); start a new run"
        )
    for key, kind in _PAYLOAD_TYPES.items():
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool):
            raise StudentFormatError(
                f"{path} is damaged: {key!r} is missing or not a {kind.__name__}"
            )
    return payload


# -- the database half -------------------------------------------------------------------------------
def memory_store(model) -> Any:
    """The one store every memory layer of ``model`` is bound to (None for a dense model)."""
    stores: dict[int, Any] = {}
    for name, layer in memory_layers(model).items():
        if layer.collection is None:
            raise InvalidInputError(
                f"memory layer {name!r} is not bound to a store, so it cannot be checkpointed"
            )
        stores[id(layer.collection.store)] = layer.collection.store
    if len(stores) > 1:
        raise InvalidInputError(
            f"the memory layers are bound to {len(stores)} different stores; a checkpoint commits "
            "one store atomically, so bind every layer to the same store"
        )
    return next(iter(stores.values()), None)


def commit_memory(model, store, run_id: str, step: int, token: str) -> None:
    """Flush every memory layer and stamp ``(run_id, step, token)`` in ONE transaction."""
    with store.transaction() as conn:  # every layer's flush below joins this one transaction
        STAMPS.create(conn, checkfirst=True)
        flush_memory(model)
        conn.execute(STAMPS.delete().where(STAMPS.c.run_id == run_id))
        conn.execute(STAMPS.insert().values(run_id=run_id, step=int(step), token=token))


class WriteBackInterval:
    """One write transaction held open from one checkpoint to the next, for a student whose memory
    pages (``--memory-budget``).

    A paged memory writes changed rows back whenever they leave its cache, long before the next
    checkpoint. Inside this transaction those writes, the checkpoint's flush and its stamp commit
    together in :meth:`commit`, and a process killed in between loses them all: the database stays
    exactly as of the last checkpoint, as for a fully resident student (whose rows reach the
    database only in the checkpoint's transaction anyway). Other processes keep reading the last
    checkpoint meanwhile (SQLite in WAL mode, PostgreSQL's MVCC).
    """

    def __init__(self, store) -> None:
        self.store = store
        self._open: Any = None

    def __enter__(self) -> WriteBackInterval:
        self._begin()
        return self

    def _begin(self) -> None:
        self._open = self.store.transaction()
        self._open.__enter__()

    def commit(self) -> None:
        """Commit everything written since the last commit, and open the next interval."""
        current, self._open = self._open, None
        current.__exit__(None, None, None)
        self._begin()

    def __exit__(self, *exc_info) -> None:
        current, self._open = self._open, None
        if current is not None:
            current.__exit__(*exc_info)  # rolls back when the block raised


def committed_stamp(store, run_id: str) -> tuple[int, str] | None:
    """``(step, token)`` of the last memory commit of run ``run_id`` (None: none committed)."""
    with store.read() as conn:
        if not sa.inspect(conn).has_table(STAMPS.name):
            return None
        row = conn.execute(
            sa.select(STAMPS.c.step, STAMPS.c.token).where(STAMPS.c.run_id == run_id)
        ).first()
    return None if row is None else (int(row.step), str(row.token))


# -- resuming ----------------------------------------------------------------------------------------
def consistent_checkpoint(out_dir: str | os.PathLike, store) -> tuple[Path, dict[str, Any]]:
    """The checkpoint whose memory the database holds, installed as ``checkpoint.pt``.

    ``store`` is the memory's store (None for a dense student). When the database is still at the
    previous checkpoint (a kill between the file and the memory commit), that file becomes the
    current one again, so the next save keeps the invariant "the current file matches the
    database" that :func:`write_checkpoint_file` relies on.
    """
    out = Path(out_dir)
    files = checkpoint_files(out)
    if not files:
        raise StudentFormatError(f"{out} has no {CHECKPOINT_FILE} to resume from")
    first = read_checkpoint(files[0])
    if store is None:  # no memory half: every file is a whole checkpoint
        return files[0], read_checkpoint(files[0], mmap=False)
    stamp = committed_stamp(store, first["run_id"])
    if stamp is None:
        raise StudentFormatError(
            f"the memory database holds no checkpoint of the run in {out}: it stopped before its "
            "first checkpoint was committed, so there is nothing to resume; start the run again"
        )
    for path in files:
        payload = first if path == files[0] else read_checkpoint(path)
        if payload["run_id"] == first["run_id"] and payload["token"] == stamp[1]:
            current = out / CHECKPOINT_FILE
            if path != current:
                install(path, current)
            return current, read_checkpoint(current, mmap=False)
    raise StudentFormatError(
        f"the memory database is at step {stamp[0]} of the run in {out}, but no checkpoint file "
        f"there matches it ({files[0].name} is at step {first['step']}); the directory and the "
        "database do not belong together"
    )
