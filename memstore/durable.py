"""Durable file writes, in one place for every package: write a temporary file, fsync it, rename it over the target,
fsync the directory.

A kill or power loss at any moment then leaves either the old file or the new one, never a torn
one (the rename is atomic; the two fsyncs make the data and then the rename reach the disk, in that
order). It lives in the store package, which
imports neither torch nor the application, so that every writer shares it: the layer library's
saved models (:mod:`memstore_torch.saving`), the student's files (``dense.pt``,
``memstore_student.json``, :func:`write_atomically`) and checkpoints, which split the same two
halves (:func:`write_durably`, then :func:`install`) because they move the current file aside in
between (:mod:`memstore_gpt2.checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

#: The temporary file of ``path`` (``dense.pt`` -> ``dense.pt.tmp``).
TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def write_durably(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(handle)`` into ``path`` (truncated first), then flush and fsync it."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file another library wrote (safetensors writes by path, not through a handle)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def install(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` over ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by what ``write(handle)`` writes, all or nothing (module docstring)."""
    tmp = temporary_path(path)
    write_durably(tmp, write)
    install(tmp, path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` to ``path``, atomically."""
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def fsync_directory(path: str | os.PathLike) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
