"""Save and load any model that holds memory layers: dense weights in safetensors, rows in the store.

``state_dict`` leaves a memory layer's rows out (the database is their home), so saving a model
with ``torch.save`` or Hugging Face's ``save_pretrained`` silently drops its memory, and a model
rebuilt from such a file has fresh rows. :func:`save_memory_model` writes a directory that a
freshly built model of the same architecture can be restored from, whatever the model is:

* ``model.safetensors`` -- every dense weight (``state_dict`` minus the memory rows), in
  safetensors: plain tensors, never a pickle, so loading it cannot run code;
* ``memory_layers.json`` -- a small manifest: per memory layer, its module path in the model,
  its kind (class name), its config and the collection its rows live in;
* the rows themselves are flushed to each layer's collection, in the layer's own store.

:func:`load_memory_state` checks the manifest against the model (the same memory layers at the
same paths, of the same kinds and configs; else one line naming the first difference), replaces
each memory layer by one loaded from its collection (``from_config``), then loads the dense
weights, refusing any that do not fit. The model then computes what the saved one computed, bit
for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memstore.durable import fsync_file, install, temporary_path, write_text_atomically
from memstore.errors import InvalidInputError

from .memory_layer import MemoryLayer
from .model_memory import flush_memory, is_memory_row_key, memory_layers
from .rows_source import CollectionStore

#: File names inside a saved directory.
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "memory_layers.json"
#: ``format`` and ``version`` of the manifest this code writes (and the only one it reads).
FORMAT = "memstore-memory-model"
VERSION = 1


def save_memory_model(
    model: nn.Module, directory: str | os.PathLike, store: CollectionStore | None = None
) -> Path:
    """Flush every memory layer's rows to its collection and write the dense weights and the
    manifest to ``directory`` (made when missing); returns its path.

    Every memory layer must be bound to a store (built with ``store=`` and ``collection=``);
    with ``store`` given, to that one -- a layer whose rows would go to another database is
    refused rather than saved half here, half there. Files are written to a temporary name,
    fsynced and renamed, so a crash leaves the previous save or the new one, never a mix."""
    layers = memory_layers(model)
    for name, layer in layers.items():
        label = _label(name)
        if layer.collection is None:
            raise InvalidInputError(
                f"memory layer {label} is not bound to a store; build it with store= and "
                "collection= to save it"
            )
        if store is not None and layer._store is not store:
            raise InvalidInputError(
                f"memory layer {label} keeps its rows in another store than the one given"
            )
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    flush_memory(model)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {
            name: {
                "kind": type(layer).__name__,
                "config": dataclasses.asdict(layer.config),
                "collection": layer.collection_name,
            }
            for name, layer in layers.items()
        },
    }
    from safetensors.torch import save_model

    weights = out / WEIGHTS_FILE
    tmp = temporary_path(weights)
    save_model(model, str(tmp), metadata={"format": FORMAT})  # tied weights stored once
    fsync_file(tmp)
    install(tmp, weights)
    write_text_atomically(
        out / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )
    return out


def load_memory_state(
    model: nn.Module,
    directory: str | os.PathLike,
    store: CollectionStore,
    *,
    cache_rows: int | None = None,
) -> dict[str, MemoryLayer]:
    """Restore a freshly built ``model`` from what :func:`save_memory_model` wrote to
    ``directory``: its memory layers are replaced by layers loaded from their collections in
    ``store`` and the dense weights are loaded. Returns ``{module path: loaded layer}``.

    ``cache_rows`` pages product-key memories through a cache of that many rows
    (:class:`~memstore_torch.paged_rows.PagedRows`) instead of loading all their rows. Any
    difference between the model and the saved one is refused in one line before anything in
    the model changes."""
    saved = _read_manifest(Path(directory))
    layers = memory_layers(model)
    if "" in layers:
        raise InvalidInputError(
            "the model itself is a memory layer; save and load a module that contains it"
        )
    missing = [name for name in saved if name not in layers]
    extra = [name for name in layers if name not in saved]
    if missing or extra:
        raise InvalidInputError(
            "the model's memory layers differ from the saved ones: "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(map(_label, missing))}" if missing else "",
                    f"not saved {', '.join(map(_label, extra))}" if extra else "",
                )
                if part
            )
        )
    for name, layer in layers.items():
        _check_layer(name, layer, saved[name])
    state = _read_weights(Path(directory) / WEIGHTS_FILE)
    _check_dense(model, state)
    loaded: dict[str, MemoryLayer] = {}
    for name, layer in layers.items():
        entry = saved[name]
        record = {"type": entry["kind"], **entry["config"], "collection": entry["collection"]}
        kind = type(layer)
        paged = cache_rows is not None and "cache_rows" in _from_config_options(kind)
        new = kind.from_config(record, store, **({"cache_rows": cache_rows} if paged else {}))
        new.train(layer.training)
        new.to(layer.memory_values.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        loaded[name] = new
    model.load_state_dict(state, strict=False)  # checked above: only memory rows are missing
    return loaded


# ---------------------------------------------------------------------------------- helpers
def _label(name: str) -> str:
    return repr(name) if name else "(the model itself)"


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(
            f"{directory} holds no saved memory model ({MANIFEST_FILE} is missing)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is damaged: {type(exc).__name__}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a memstore memory-model manifest")
    if manifest.get("version") != VERSION:
        raise InvalidInputError(
            f"{path} has version {manifest.get('version')!r}; this memstore reads version {VERSION}"
        )
    layers = manifest.get("layers")
    ok = isinstance(layers, dict) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("kind"), str)
        and isinstance(entry.get("config"), dict)
        and isinstance(entry.get("collection"), str)
        for entry in layers.values()
    )
    if not ok:
        raise InvalidInputError(f"{path} is damaged: its layer entries are malformed")
    return layers


def _check_layer(name: str, layer: MemoryLayer, entry: dict[str, Any]) -> None:
    label = _label(name)
    if entry["kind"] != type(layer).__name__:
        raise InvalidInputError(
            f"memory layer {label} is a {type(layer).__name__}; the saved one is a {entry['kind']}"
        )
    mine = dataclasses.asdict(layer.config)
    theirs = entry["config"]
    for field in sorted(set(mine) | set(theirs)):
        if field not in theirs or field not in mine or mine[field] != theirs[field]:
            raise InvalidInputError(
                f"memory layer {label}: the saved {entry['kind']} has {field}="
                f"{theirs.get(field, '(none)')!r}, this model's has {mine.get(field, '(none)')!r}"
            )


def _from_config_options(kind: type) -> set[str]:
    import inspect

    return set(inspect.signature(kind.from_config).parameters)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InvalidInputError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{path} is damaged or not a safetensors file: {first}") from None


def _check_dense(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse saved weights that ``load_state_dict`` would not load exactly: unknown keys, other
    shapes, keys the model has and the file lacks (memory rows and tied copies aside)."""
    own = model.state_dict(keep_vars=True)
    unexpected = [key for key in state if key not in own]
    if unexpected:
        raise InvalidInputError(f"the saved weights have keys this model lacks: {unexpected[:5]}")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise InvalidInputError(
                f"the saved weight {key!r} has shape {tuple(tensor.shape)}, this model's "
                f"{tuple(own[key].shape)}"
            )
    # tied weights are stored once (safetensors' save_model): their other names load through it
    loaded = {own[key].data_ptr() for key in state}
    missing = [
        key
        for key in own
        if key not in state
        and not is_memory_row_key(key, model)
        and own[key].data_ptr() not in loaded
    ]
    if missing:
        raise InvalidInputError(f"the saved weights lack keys of this model: {missing[:5]}")
