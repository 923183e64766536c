"""Memory students: building their layers, and saving / loading them with their database.

A student directory holds the GPT-2 config, the tokenizer, the *dense* weights (``dense.pt``) and
``memstore_student.json`` — which blocks carry which memory layer, each layer's ``extra_config()``
and the database URL. The memory rows themselves are not copied into the directory: the database is
their home, so editing the database (``memstore prune``, ``import``...) edits what the model knows.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memstore.errors import bad_parameter
from memstore_gpt2.errors import StudentFormatError
from memstore_gpt2.surgery import ZeroMlp, gpt2_blocks
from memstore_torch.model_memory import flush_memory, is_memory_row_key, memory_layers

STUDENT_FILE = "memstore_student.json"
WEIGHTS_FILE = "dense.pt"
DEFAULT_DB_FILE = "memory.db"
FORMAT_VERSION = 1
MEMORY_CLASSES = ("FeaturalMemory", "AssociativeMemory")
_BLOCK_MLP = re.compile(r"(?:transformer\.)?h\.(\d+)\.mlp")


def memory_class(name: str):
    """The memory layer class called ``name`` (imported lazily: torch helper's modules)."""
    if name not in MEMORY_CLASSES:
        raise StudentFormatError(f"unknown memory layer class {name!r} in {STUDENT_FILE}")
    import memstore_torch

    return getattr(memstore_torch, name)


def slot_key(module_name: str) -> int | str:
    """How a student names where a module sits: the block index for a GPT-2 block's MLP, the
    dotted module path anywhere else (a memory layer may sit in any submodule)."""
    match = _BLOCK_MLP.fullmatch(module_name)
    return int(match.group(1)) if match else module_name


def memory_slots(model) -> dict[int | str, nn.Module]:
    """``{slot key: memory layer}`` of a student, found by type (see :func:`slot_key`)."""
    return {slot_key(name): layer for name, layer in memory_layers(model).items()}


def default_db_url(out_dir: str | os.PathLike) -> str:
    """A SQLite file inside the student directory."""
    return f"sqlite:///{Path(out_dir).resolve() / DEFAULT_DB_FILE}"


def collection_name(layer_index: int) -> str:
    return f"layer{layer_index}"


def memory_factory(
    kind: str,
    store,
    *,
    k: int,
    init: str = "mlp",
    calibration: dict[int, torch.Tensor] | None = None,
    heads: int = 4,
    capacity: int | None = None,
    layer_options: dict[str, Any] | None = None,
):
    """A surgery factory that turns teacher MLP ``i`` into a memory layer bound to ``layer{i}``.

    ``init='mlp'`` (featural only) copies the MLP into memory rows with tail correction, which is
    what makes the student start close to the teacher (docs/design.md, The tail correction); ``'random'`` starts from scratch.
    """
    options = dict(layer_options or {})
    if kind not in ("featural", "associative"):
        raise bad_parameter("kind", f"must be 'featural' or 'associative', got {kind!r}")
    if init not in ("mlp", "random"):
        raise bad_parameter("init", f"must be 'mlp' or 'random', got {init!r}")
    if kind == "associative" and init == "mlp":
        raise bad_parameter(
            "init", "'mlp' applies to kind 'featural'; associative memory starts empty ('random')"
        )
    if k <= 0:
        raise bad_parameter("k", f"must be positive, got {k}")

    def factory(index: int, mlp: nn.Module) -> nn.Module:
        d_model = mlp.c_fc.weight.shape[0]  # GPT-2 Conv1D: weight (d_in, d_out)
        n_inner = mlp.c_fc.weight.shape[1]
        name = collection_name(index)
        if kind == "featural":
            from memstore_torch import FeaturalMemory

            if init == "mlp":
                if calibration is None or index not in calibration:
                    raise bad_parameter("init", "'mlp' needs calibration inputs for every layer")
                return FeaturalMemory.from_mlp(
                    mlp,
                    k=min(k, n_inner),
                    calibration=calibration[index],
                    store=store,
                    collection=name,
                    **options,
                )
            return FeaturalMemory(
                d_model, n_rows=n_inner, k=min(k, n_inner), store=store, collection=name, **options
            )
        from memstore_torch import AssociativeMemory

        return AssociativeMemory(
            d_model,
            heads=heads,
            k=k,
            capacity=capacity if capacity is not None else n_inner * 4,
            store=store,
            collection=name,
            **options,
        )

    return factory


def layer_manifest(model) -> dict[str, dict[str, Any]]:
    """{slot key: {"class", "config"}} for every memory layer and removed MLP of a student."""
    out: dict[str, dict[str, Any]] = {}
    for key, layer in memory_slots(model).items():
        out[str(key)] = {"class": type(layer).__name__, "config": layer.extra_config()}
    for index, block in enumerate(gpt2_blocks(model)):
        if isinstance(block.mlp, ZeroMlp):
            out[str(index)] = {"class": "ZeroMlp", "config": {}}
    return out


def save_student(
    model, tokenizer, out_dir: str | os.PathLike, db_url: str, info: dict | None = None
) -> Path:
    """Flush memory and write the student directory (config, tokenizer, dense weights, manifest)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flush_memory(model)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    _atomic_torch_save(model.state_dict(), out / WEIGHTS_FILE)
    manifest = {
        "format": FORMAT_VERSION,
        "db": db_url,
        "db_relative": _relative_sqlite_path(db_url, out),
        "layers": layer_manifest(model),
        "info": info or {},
    }
    _atomic_write_text(out / STUDENT_FILE, json.dumps(manifest, indent=2))
    return out


def read_manifest(student_dir: str | os.PathLike) -> dict:
    path = Path(student_dir) / STUDENT_FILE
    if not path.is_file():
        raise StudentFormatError(
            f"{str(student_dir)!r} is not a memstore student directory (no {STUDENT_FILE}); "
            "make one with 'memstore distill gpt2 ... --out DIR'"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise StudentFormatError(
            f"{path} has format {manifest.get('format')!r}; this memstore reads {FORMAT_VERSION}"
        )
    return manifest


def resolve_db_url(student_dir: str | os.PathLike, manifest: dict, db: str | None = None) -> str:
    """The database of a student: explicit ``db``, else the SQLite file next to it, else its URL.

    Preferring the relative SQLite file keeps a student directory movable as a whole.
    """
    if db:
        return db
    relative = manifest.get("db_relative")
    if relative and (Path(student_dir) / relative).is_file():
        return f"sqlite:///{(Path(student_dir) / relative).resolve()}"
    return manifest["db"]


def build_student_skeleton(student_dir: str | os.PathLike, manifest: dict, store):
    """GPT-2 from the saved config with memory layers rebuilt from the store (dense weights unset)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(student_dir, local_files_only=True)
    model = GPT2LMHeadModel(config)
    blocks = gpt2_blocks(model)
    for key, entry in manifest["layers"].items():
        if entry["class"] == "ZeroMlp":
            module = ZeroMlp()
        else:
            module = memory_class(entry["class"]).from_config(entry["config"], store)
        if key.isdigit():
            blocks[int(key)].mlp = module
        else:
            model.set_submodule(key, module)
    return model


@dataclass
class LoadedStudent:
    model: Any
    tokenizer: Any
    store: Any
    manifest: dict
    db_url: str

    def close(self) -> None:
        self.store.close()


def load_student(student_dir: str | os.PathLike, db: str | None = None) -> LoadedStudent:
    """Rebuild a saved student with its memory from the database; model returned in eval mode."""
    from transformers import AutoTokenizer

    from memstore import Store

    manifest = read_manifest(student_dir)
    db_url = resolve_db_url(student_dir, manifest, db)
    store = Store(db_url)
    try:
        model = build_student_skeleton(student_dir, manifest, store)
        weights = Path(student_dir) / WEIGHTS_FILE
        if not weights.is_file():
            raise StudentFormatError(f"{weights} is missing")
        load_dense_state(model, torch.load(weights, map_location="cpu", weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    except BaseException:
        store.close()
        raise
    model.eval()
    return LoadedStudent(model, tokenizer, store, manifest, db_url)


def load_dense_state(model, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that tolerates only the absence of keys a memory layer keeps in the store."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise StudentFormatError(f"weights have unexpected keys: {result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys if not is_memory_row_key(k, model)]
    if missing:
        raise StudentFormatError(f"weights lack keys: {missing[:5]}")


def _relative_sqlite_path(db_url: str, out: Path) -> str | None:
    prefix = "sqlite:///"
    if not db_url.startswith(prefix):
        return None
    path = Path(db_url[len(prefix) :]).resolve()
    try:
        return str(path.relative_to(out.resolve()))
    except ValueError:
        return None


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
