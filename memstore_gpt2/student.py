"""Memory students: building their layers, and saving / loading them with their database.

A student directory holds the GPT-2 config, the tokenizer, the *dense* weights (``dense.pt``) and
``memstore_student.json`` — which blocks carry which memory layer, each layer's ``extra_config()``
and the database URL. The memory rows themselves are not copied into the directory: the database is
their home, so editing the database (``memstore prune``, ``import``...) edits what the model knows.

A directory that a distillation run is still writing has ``"run": {"finished": false}`` in its
manifest: until the run ends, ``dense.pt`` and the memory are from different steps, so loading it
is refused (resume the run to finish it). Manifests without a ``run`` entry are finished students.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memstore.durable import write_atomically, write_text_atomically
from memstore.errors import bad_parameter, first_line
from memstore_gpt2.errors import StudentFormatError
from memstore_gpt2.surgery import ZeroMlp, gpt2_blocks
from memstore_torch.model_memory import flush_memory, is_memory_row_key, memory_layers

STUDENT_FILE = "memstore_student.json"
WEIGHTS_FILE = "dense.pt"
DEFAULT_DB_FILE = "memory.db"
FORMAT_VERSION = 1
MEMORY_CLASSES = ("FeaturalMemory", "AssociativeMemory", "ProductKeyMemory")
#: Manifest class of a slot holding a base memory layer plus extra rows (``parts``: base first).
GROWN_CLASS = "GrownMemory"
#: Defaults of the extra rows' product-key memory (``--memory-rows``): one head of 32 reads kept
#: the step within 1.25x the dense control at d=256 (four heads: 1.8x); see docs/distill.md.
EXTRA_HEADS = 1
EXTRA_K = 32
EXTRA_KEY_DIM = 128
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
    """``{slot key: memory layer}`` of a student, found by type (see :func:`slot_key`); a slot
    holding a :class:`~memstore_torch.GrownMemory` (base + extra rows) maps to that module."""
    grown = grown_modules(model)
    slots: dict[int | str, nn.Module] = {slot_key(name): module for name, module in grown.items()}
    for name, layer in memory_layers(model).items():
        if not any(name.startswith(f"{g}.") for g in grown):
            slots[slot_key(name)] = layer
    return slots


def grown_modules(model) -> dict[str, nn.Module]:
    """``{qualified name: GrownMemory}`` of a model (none unless it has extra rows)."""
    from memstore_torch import GrownMemory

    return {name: m for name, m in model.named_modules() if isinstance(m, GrownMemory)}


def slot_rows(module: nn.Module) -> tuple[int, int]:
    """(rows in every collection of a slot, of which extra rows) for a slot's module."""
    layers = list(memory_layers(module).values())
    total = sum(len(layer.collection) for layer in layers)
    extra = 0
    if type(module).__name__ == GROWN_CLASS:
        extra = sum(len(m.collection) for e in module.extras for m in memory_layers(e).values())
    return total, extra


def extra_rows_shape(memory_rows: int) -> int:
    """``n_keys`` of the product-key memory holding ``memory_rows`` extra rows: the rows are
    rounded up to the square ``n_keys ** 2`` (product keys address rows as pairs)."""
    if memory_rows < 0:
        raise bad_parameter("memory_rows", f"must be >= 0, got {memory_rows}")
    return math.isqrt(memory_rows - 1) + 1 if memory_rows > 0 else 0


def default_db_url(out_dir: str | os.PathLike) -> str:
    """A SQLite file inside the student directory."""
    return f"sqlite:///{Path(out_dir).resolve() / DEFAULT_DB_FILE}"


def collection_name(layer_index: int) -> str:
    return f"layer{layer_index}"


def extra_collection_name(layer_index: int) -> str:
    """The collection of block ``layer_index``'s extra rows (``--memory-rows``)."""
    return f"layer{layer_index}.extra"


@dataclass(frozen=True)
class MemoryRows:
    """The extra product-key rows beside each memory layer (``--memory-rows``,
    ``--memory-rows-heads``, ``--memory-rows-k``), built once from the options and handed down
    to the layers as it is: each field keeps its flag's name all the way, so a bad value is
    reported under the flag the user typed (``bad_parameter("memory_rows_heads", ...)`` reads
    ``--memory-rows-heads`` on the command line).

    ``memory_rows`` is rounded up to the square ``n_keys ** 2`` (product keys address rows as
    pairs); 0 means no extra rows. ``memory_rows_key_dim`` is the width of the queries.
    """

    memory_rows: int = 0
    memory_rows_heads: int = EXTRA_HEADS
    memory_rows_k: int = EXTRA_K
    memory_rows_key_dim: int = EXTRA_KEY_DIM

    def __post_init__(self) -> None:
        extra_rows_shape(self.memory_rows)  # refuses a negative count
        for name in ("memory_rows_heads", "memory_rows_k"):
            if getattr(self, name) <= 0:
                raise bad_parameter(name, f"must be positive, got {getattr(self, name)}")
        if self.memory_rows_key_dim <= 0 or self.memory_rows_key_dim % 2:
            raise bad_parameter(
                "memory_rows_key_dim",
                f"must be positive and even, got {self.memory_rows_key_dim}",
            )

    @property
    def n_keys(self) -> int:
        return extra_rows_shape(self.memory_rows)

    @property
    def n_rows(self) -> int:
        """Rows per layer after rounding up to a square (0: none)."""
        return self.n_keys**2

    @property
    def k(self) -> int:
        """Rows each head reads per token (``memory_rows_k``, at most every row)."""
        return min(self.memory_rows_k, self.n_rows)

    @property
    def reads_per_token(self) -> int:
        return self.memory_rows_heads * self.k

    def layer(self, d_model: int, store, index: int, cache_rows: int | None = None) -> nn.Module:
        """The product-key memory of block ``index`` (collection ``layer<index>.extra``), values
        zero; ``cache_rows`` pages it through a cache of that many rows."""
        from memstore_torch import ProductKeyMemory

        return ProductKeyMemory(
            d_model,
            n_keys=self.n_keys,
            heads=self.memory_rows_heads,
            k=self.k,
            key_dim=self.memory_rows_key_dim,
            store=store,
            collection=extra_collection_name(index),
            cache_rows=cache_rows,
        )


def check_layer_kind(kind: str, k: int, init: str) -> None:
    """Refuse a ``--kind``/``--k``/``--init`` that :func:`memory_factory` cannot build (callers
    check up front, before any work; the factory checks again for its own callers)."""
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
    memory_rows: MemoryRows | int = 0,
    cache_rows: int | None = None,
):
    """A surgery factory that turns teacher MLP ``i`` into a memory layer bound to ``layer{i}``.

    ``init='mlp'`` (featural only) copies the MLP into memory rows with tail correction, which is
    what makes the student start close to the teacher (docs/design.md, The tail correction);
    ``'random'`` starts from scratch.

    ``memory_rows`` (a :class:`MemoryRows`, or a row count with its other defaults) grows each
    layer: ``GrownMemory(layer, MemoryRows.layer(...))``, whose product-key memory lives in
    ``layer{i}.extra``. Its values start at zero, so the grown student computes exactly what the
    student without them computes until it trains. ``cache_rows`` pages them through a cache of
    that many rows (written straight to the store, never all in memory).
    """
    options = dict(layer_options or {})
    check_layer_kind(kind, k, init)
    rows = memory_rows if isinstance(memory_rows, MemoryRows) else MemoryRows(memory_rows)

    def factory(index: int, mlp: nn.Module) -> nn.Module:
        layer = base_factory(index, mlp)
        if not rows.n_rows:
            return layer
        from memstore_torch import GrownMemory

        d_model = mlp.c_fc.weight.shape[0]  # GPT-2 Conv1D: weight (d_in, d_out)
        return GrownMemory(layer, rows.layer(d_model, store, index, cache_rows))

    def base_factory(index: int, mlp: nn.Module) -> nn.Module:
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
    """{slot key: {"class", "config"}} for every memory layer and removed MLP of a student; a
    grown slot is ``{"class": "GrownMemory", "parts": [base entry, extra entry, ...]}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, layer in memory_slots(model).items():
        if type(layer).__name__ == GROWN_CLASS:
            parts = [layer.base, *layer.extras]
            out[str(key)] = {"class": GROWN_CLASS, "parts": [_layer_entry(p) for p in parts]}
        else:
            out[str(key)] = _layer_entry(layer)
    for index, block in enumerate(gpt2_blocks(model)):
        if isinstance(block.mlp, ZeroMlp):
            out[str(index)] = {"class": "ZeroMlp", "config": {}}
    return out


def _layer_entry(layer: nn.Module) -> dict[str, Any]:
    if type(layer).__name__ not in MEMORY_CLASSES:
        raise bad_parameter("model", f"cannot save a {type(layer).__name__} inside a grown slot")
    return {"class": type(layer).__name__, "config": layer.extra_config()}


def save_student(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    db_url: str,
    info: dict | None = None,
    run: dict | None = None,
) -> Path:
    """Flush memory and write the student directory (config, tokenizer, dense weights, manifest).

    ``run`` is the distillation run's record (``id``, ``finished``, ``collections``); a run saves
    the directory with ``finished`` False when it starts and True when it ends.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flush_memory(model)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_atomically(out / WEIGHTS_FILE, lambda handle: torch.save(model.state_dict(), handle))
    write_manifest(out, db_url, layer_manifest(model), info, run)
    return out


def write_manifest(
    out_dir: str | os.PathLike,
    db_url: str,
    layers: dict[str, dict[str, Any]],
    info: dict | None = None,
    run: dict | None = None,
) -> None:
    """Atomically write ``memstore_student.json`` (a run writes one before it creates any
    collection, so a run killed during surgery leaves a directory that says what it created)."""
    out = Path(out_dir)
    manifest = {
        "format": FORMAT_VERSION,
        "db": db_url,
        "db_relative": _relative_sqlite_path(db_url, out),
        "layers": layers,
        "info": info or {},
    }
    if run is not None:
        manifest["run"] = run
    write_text_atomically(out / STUDENT_FILE, json.dumps(manifest, indent=2))


def run_unfinished(manifest: dict) -> bool:
    """True while a distillation run is writing the directory (or was stopped before its end)."""
    run = manifest.get("run")
    return isinstance(run, dict) and run.get("finished") is False


def read_manifest(student_dir: str | os.PathLike) -> dict:
    """The parsed manifest; :class:`StudentFormatError` (one line) when missing or damaged."""
    path = Path(student_dir) / STUDENT_FILE
    if not path.is_file():
        raise StudentFormatError(
            f"{str(student_dir)!r} is not a memstore student directory (no {STUDENT_FILE}); "
            "make one with 'memstore distill gpt2 ... --out DIR'"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudentFormatError(f"{path} is damaged: {exc}") from None
    if not isinstance(manifest, dict):
        raise StudentFormatError(f"{path} is damaged: not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise StudentFormatError(
            f"{path} has format {manifest.get('format')!r}; this memstore reads {FORMAT_VERSION}"
        )
    layers = manifest.get("layers")
    if not isinstance(manifest.get("db"), str) or not isinstance(layers, dict):
        raise StudentFormatError(f"{path} is damaged: 'db' or 'layers' is missing")
    for key, entry in layers.items():
        _check_entry(path, key, entry)
        if entry["class"] == GROWN_CLASS:
            parts = entry.get("parts")
            if not isinstance(parts, list) or len(parts) < 2:
                raise StudentFormatError(f"{path} is damaged: layer {key!r} has no parts")
            for part in parts:
                _check_entry(path, key, part)
                if part["class"] in ("ZeroMlp", GROWN_CLASS):
                    raise StudentFormatError(
                        f"{path} is damaged: layer {key!r} has a {part['class']} part"
                    )
    for key in ("info", "run"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise StudentFormatError(f"{path} is damaged: {key!r} is not an object")
    return manifest


def _check_entry(path: Path, key: str, entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise StudentFormatError(f"{path} is damaged: layer {key!r} has no class")
    if entry["class"] not in ("ZeroMlp", GROWN_CLASS) and not isinstance(entry.get("config"), dict):
        raise StudentFormatError(f"{path} is damaged: layer {key!r} has no config")


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


def _product_key_entries(manifest: dict) -> list[dict[str, Any]]:
    """The student's own product-key layer entries (alone or inside a grown layer)."""
    entries = []
    for entry in manifest["layers"].values():
        parts = entry.get("parts", [entry]) if entry["class"] == GROWN_CLASS else [entry]
        entries += [p for p in parts if p.get("class") == "ProductKeyMemory"]
    return entries


def _tables(entries: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(rows, bytes per cached row)`` of product-key entries, as a budget splits them."""
    from memstore_torch import PagedRows, ProductKeyMemory

    tables = []
    for entry in entries:
        config, _ = ProductKeyMemory.split_saved_config(entry["config"])
        tables.append((config.n_rows, PagedRows.bytes_per_slot(2, config.row_value_dim)))
    return tables


def _cache_rows(
    manifest: dict, memory_budget, pack_entries: Sequence[dict[str, Any]] = ()
) -> dict[int, int | None]:
    """``{id(entry): cache rows}`` for every product-key entry under ``memory_budget``
    (a :class:`~memstore_torch.budget.MemoryBudget`; None: every row resident). ``pack_entries``
    (``{"class": "ProductKeyMemory", "config": ...}`` of attached packs) share the one budget."""
    if memory_budget is None:
        return {}
    entries = _product_key_entries(manifest) + list(pack_entries)
    rows = memory_budget.cache_rows(_tables(entries))
    return {id(entry): n for entry, n in zip(entries, rows, strict=True)}


def _damaged_config(exc: Exception) -> StudentFormatError:
    return StudentFormatError(
        f"{STUDENT_FILE} or a pack: a product-key layer's config is damaged ({exc})"
    )


def _pack_entries(records: Sequence[Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {
        (r.name, int(layer)): {"class": "ProductKeyMemory", "config": config}
        for r in records
        for layer, config in (r.manifest.get("memories") or {}).items()
    }


def budget_split(manifest: dict, memory_budget, records: Sequence[Any]):
    """``memory_budget`` split over the student's product-key layers and those of the pack
    ``records``: ``(cache rows by entry id, {pack name: {layer: cache rows}})`` (all None,
    every row resident, without a budget)."""
    pack_entries = _pack_entries(records)
    try:
        cache_rows = _cache_rows(manifest, memory_budget, list(pack_entries.values()))
    except (TypeError, KeyError) as exc:
        raise _damaged_config(exc) from None
    pack_cache: dict[str, dict[int, int | None]] = {}
    for (name, layer), entry in pack_entries.items():
        pack_cache.setdefault(name, {})[layer] = cache_rows.get(id(entry))
    return cache_rows, pack_cache


def packs_split_after_student(manifest: dict, memory_budget, records: Sequence[Any]):
    """``{pack name: {layer: cache rows}}`` for packs that join a student already loaded under
    a ``memory_budget`` in bytes: the student's own tables keep what they took alone (they are
    not resized while serving), and the packs share the rest of the budget. Raises
    :class:`~memstore_gpt2.errors.PackError` when the rest cannot hold one row of every pack
    table."""
    from memstore_torch.budget import MemoryBudget

    from .errors import PackError

    pack_entries = _pack_entries(records)
    try:
        own_tables = _tables(_product_key_entries(manifest))
        pack_tables = _tables(list(pack_entries.values()))
    except (TypeError, KeyError) as exc:
        raise _damaged_config(exc) from None
    own_rows = memory_budget.cache_rows(own_tables)  # what the student took, loaded alone
    used = sum((n if n is not None else rows) * row_bytes
               for n, (rows, row_bytes) in zip(own_rows, own_tables, strict=True))  # fmt: skip
    left = memory_budget.bytes - used
    if left < sum(row_bytes for _, row_bytes in pack_tables):
        raise PackError(
            f"no room for packs under --memory-budget {memory_budget}: the student's own rows "
            f"take {used} bytes of it; give a larger budget, or a share such as 10%"
        )
    rows = MemoryBudget(bytes=left).cache_rows(pack_tables)
    pack_cache: dict[str, dict[int, int | None]] = {}
    for (name, layer), n in zip(pack_entries, rows, strict=True):
        pack_cache.setdefault(name, {})[layer] = n
    return pack_cache


def build_student_skeleton(
    student_dir: str | os.PathLike,
    manifest: dict,
    store,
    memory_budget=None,
    cache_rows: dict[int, int | None] | None = None,
):
    """GPT-2 from the saved config with memory layers rebuilt from the store (dense weights
    unset); under ``memory_budget`` product-key values page from the store instead of loading
    (``cache_rows``: the split of that budget, when the caller made it with packs in it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from memstore_gpt2.model_dir import check_model_size

    check_model_size(student_dir)  # absurd sizes refused before GPT2LMHeadModel allocates
    try:
        config = GPT2Config.from_pretrained(student_dir, local_files_only=True)
    except (OSError, ValueError) as exc:  # missing or unparsable config.json
        raise StudentFormatError(
            f"{Path(student_dir) / 'config.json'} is missing or damaged ({first_line(exc)})"
        ) from None
    model = GPT2LMHeadModel(config)
    blocks = gpt2_blocks(model)
    try:
        if cache_rows is None:
            cache_rows = _cache_rows(manifest, memory_budget)
    except (TypeError, KeyError) as exc:
        raise StudentFormatError(
            f"{STUDENT_FILE}: a product-key layer's config is damaged ({exc})"
        ) from None
    for key, entry in manifest["layers"].items():
        if entry["class"] == "ZeroMlp":
            module = ZeroMlp()
        elif entry["class"] == GROWN_CLASS:
            from memstore_torch import GrownMemory

            module = GrownMemory(
                *(_rebuild_layer(key, part, store, cache_rows) for part in entry["parts"])
            )
        else:
            module = _rebuild_layer(key, entry, store, cache_rows)
        try:
            if key.isdigit():
                blocks[int(key)].mlp = module
            else:
                model.set_submodule(key, module)
        except (IndexError, AttributeError) as exc:
            raise StudentFormatError(
                f"{STUDENT_FILE}: layer {key!r} is not a place in this model ({exc})"
            ) from None
    return model


def _rebuild_layer(
    key: str, entry: dict[str, Any], store, cache_rows: dict[int, int | None]
) -> nn.Module:
    try:
        if cache_rows.get(id(entry)) is not None:
            return memory_class(entry["class"]).from_config(
                entry["config"], store, cache_rows=cache_rows[id(entry)]
            )
        return memory_class(entry["class"]).from_config(entry["config"], store)
    except (TypeError, KeyError) as exc:
        raise StudentFormatError(
            f"{STUDENT_FILE}: the config of layer {key!r} is damaged ({exc})"
        ) from None


@dataclass
class LoadedStudent:
    model: Any
    tokenizer: Any
    store: Any
    manifest: dict
    db_url: str
    #: The knowledge packs attached at load (``load_student(..., packs=...)``); detaching
    #: them gives the student back bit for bit.
    packs: Any = None

    @property
    def pack_names(self) -> list[str]:
        return [] if self.packs is None else self.packs.names

    def close(self) -> None:
        self.store.close()


def load_student(
    student_dir: str | os.PathLike,
    db: str | None = None,
    memory_budget=None,
    packs: Sequence[str] = (),
) -> LoadedStudent:
    """Rebuild a saved student with its memory from the database; model returned in eval mode.

    Refuses a directory whose distillation run has not finished, and never creates a database
    (a wrong ``db`` is an error, not a new empty file). Under ``memory_budget`` (a
    :class:`~memstore_torch.budget.MemoryBudget`) extra rows page from the database. ``packs``
    names knowledge packs in the database to attach (none: the student's own knowledge); a pack
    that does not fit the student is refused in one line (:class:`PackError`).
    """
    from transformers import AutoTokenizer

    from memstore import Store

    manifest = read_manifest(student_dir)
    if run_unfinished(manifest):
        raise StudentFormatError(
            f"{str(student_dir)!r} holds a distillation run that has not finished (its dense "
            "weights and its memory are from different steps); finish it first with "
            "'memstore distill gpt2 ... --resume'"
        )
    weights = Path(student_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise StudentFormatError(f"{weights} is missing")
    db_url = resolve_db_url(student_dir, manifest, db)
    store = Store(db_url, create=False)
    try:
        from memstore_gpt2.packs.attach import attach_packs, student_fingerprint
        from memstore_gpt2.packs.storage import read_pack

        records = [read_pack(store, name) for name in packs]
        cache_rows, pack_cache = budget_split(manifest, memory_budget, records)
        model = build_student_skeleton(student_dir, manifest, store, memory_budget, cache_rows)
        load_dense_state(model, read_dense_weights(weights))
        attached = attach_packs(
            model,
            store,
            records,
            fingerprint=student_fingerprint(student_dir) if records else None,
            cache_rows=pack_cache,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise StudentFormatError(
                f"the tokenizer files in {student_dir} are missing or damaged ({first_line(exc)})"
            ) from None
    except BaseException:
        store.close()
        raise
    model.eval()
    return LoadedStudent(model, tokenizer, store, manifest, db_url, attached)


def read_dense_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``dense.pt`` as a state dict of tensors (plain data only: a file cannot run code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise StudentFormatError(
            f"{path} is damaged or not a weights file ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise StudentFormatError(f"{path} is damaged: not a dictionary of named tensors")
    return state


def load_dense_state(model, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that tolerates only the absence of keys a memory layer keeps in the store."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise StudentFormatError(f"weights do not fit the model: {first_line(exc)}") from None
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
