"""A memory student opened for Mindset: checked, loaded, its memory layers named by collection.

Everything in Mindset names a memory layer by its collection (``layer0``), the name the database
and ``memstore inspect`` use too; a block index (``0``) or the module path is accepted as well.
The checks run before anything is loaded, so that a directory without its database, or a
database without the student's collections, is one clear line instead of a new empty database
left behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import bad_parameter
from memstore_gpt2.errors import StudentFormatError

#: Greedy continuations in Mindset (edit before/after, the UI) are this long unless asked.
DEFAULT_NEW_TOKENS = 30


@dataclass
class MindsetLayer:
    """One memory layer of the student: ``name`` is its collection, ``module`` where it sits.

    ``slot`` is the block it serves (the student's slot key). In a grown student (``distill
    --memory-rows``) a block holds two layers summed into one output: ``part`` says which one --
    ``"base"`` (the featural rows, collection ``layer<i>``) or ``"extra"`` (the product-key rows,
    ``layer<i>.extra``); it is None for a block with one memory layer.
    """

    name: str
    module: str
    slot: int | str
    layer: object  # a memstore_torch MemoryLayer
    part: str | None = None

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def collection(self):
        return self.layer.collection

    @property
    def product_keys(self) -> bool:
        """True for product-key rows: a fixed table whose row ``r`` always has id ``r + 1``."""
        from memstore_torch import ProductKeyMemory

        return isinstance(self.layer, ProductKeyMemory)

    @property
    def title(self) -> str:
        """How people read the layer's place: ``block 0``, ``block 0 extra`` (a grown block's
        product-key rows); a layer outside GPT-2's blocks is named by its module path."""
        where = f"block {self.slot}" if isinstance(self.slot, int) else str(self.slot)
        return f"{where} extra" if self.part == "extra" else where

    def describe(self) -> dict:
        cfg = self.layer.config
        return {
            "name": self.name,
            "module": self.module,
            "block": self.slot,
            "part": self.part,
            "title": self.title,
            "kind": self.kind,
            "rows": int(self.layer.index.n),
            "k": int(cfg.k),
            "heads": int(cfg.heads),
        }


class Mindset:
    """A loaded student (model in eval mode, tokenizer, store) with its memory layers by name."""

    def __init__(self, student_dir: str | os.PathLike, loaded) -> None:
        from memstore_gpt2.student import grown_modules, slot_key
        from memstore_torch.model_memory import memory_layers

        self.student_dir = Path(student_dir)
        self.loaded = loaded
        self.model, self.tokenizer, self.store = loaded.model, loaded.tokenizer, loaded.store
        self.db_url = loaded.db_url
        self.layers: dict[str, MindsetLayer] = {}
        grown = grown_modules(self.model)
        for module, layer in memory_layers(self.model).items():
            name = layer.collection_name or module
            owner = next((g for g in grown if module.startswith(f"{g}.")), None)
            if owner is None:
                self.layers[name] = MindsetLayer(name, module, slot_key(module), layer)
            else:  # a part of a grown block: named by the block, not by ``mlp.base``/``extras.0``
                part = "base" if module == f"{owner}.base" else "extra"
                self.layers[name] = MindsetLayer(name, module, slot_key(owner), layer, part)

    @classmethod
    def open(
        cls, student_dir: str | os.PathLike, db: str | None = None, packs: Sequence[str] = ()
    ) -> Mindset:
        """Check and load a student directory (``db``: another database URL than the saved one;
        ``packs``: knowledge packs to attach, whose rows then show as layers
        ``pack.<name>.layer<i>`` beside the student's own)."""
        from memstore_gpt2.student import load_student

        db_url = check_student(student_dir, db)
        return cls(student_dir, load_student(student_dir, db=db_url, packs=packs))

    def close(self) -> None:
        self.loaded.close()

    def __enter__(self) -> Mindset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- layers
    def layer(self, spec: str | int, *, parameter: str = "layer") -> MindsetLayer:
        """The layer named by collection (``layer0``, ``layer0.extra``), block index (``0``: the
        block's first layer, its featural rows in a grown block), title (``block 0 extra``) or
        module path."""
        text = str(spec).strip()
        if text in self.layers:
            return self.layers[text]
        for entry in self.layers.values():
            if text in (entry.module, str(entry.slot), entry.title):
                return entry
        known = ", ".join(self.layers) or "none"
        hint = ""
        if text.startswith("pack.") and not any(name.startswith("pack.") for name in self.layers):
            hint = f"; a pack's layers are there when it is attached: --pack {text.split('.')[1]}"
        raise bad_parameter(
            parameter, f"{text!r} is not a memory layer of this student (known: {known}){hint}"
        )

    def select(self, spec: str | None, *, parameter: str = "layers") -> list[MindsetLayer]:
        """``None``/``"all"`` -> every layer; else comma-separated names as :meth:`layer` takes,
        where a block index stands for every layer of that block (both parts of a grown one)."""
        if spec is None or spec.strip().lower() in ("", "all"):
            return list(self.layers.values())
        chosen: list[MindsetLayer] = []
        for part in spec.split(","):
            text = part.strip()
            block = [] if text in self.layers else self.block(text)
            for entry in block or [self.layer(text, parameter=parameter)]:
                if entry not in chosen:
                    chosen.append(entry)
        return chosen

    def block(self, slot: str | int) -> list[MindsetLayer]:
        """The layers of one block (``0``): one, or a grown block's featural and extra rows."""
        return [entry for entry in self.layers.values() if str(entry.slot) == str(slot).strip()]

    # -------------------------------------------------------------------- tokens
    @property
    def context(self) -> int:
        return int(self.model.config.n_positions)

    def encode(self, prompt: str, *, parameter: str = "prompt") -> list[int]:
        """Token ids of a prompt; an empty one, or one longer than the model reads, is an error."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_parameter(parameter, "is empty: give some text")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise bad_parameter(parameter, "is empty after tokenization: give some text")
        if len(ids) > self.context:
            raise bad_parameter(
                parameter, f"is {len(ids)} tokens long; this model reads at most {self.context}"
            )
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def token_id(self, text: str, *, parameter: str = "promotes") -> int:
        """The one token ``text`` is (``" for"`` and ``"for"`` are different tokens)."""
        if not text:
            raise bad_parameter(parameter, "is empty: give a token")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = " + ".join(repr(self.token_text(i)) for i in ids)
            raise bad_parameter(parameter, f"{text!r} is {len(ids)} tokens ({pieces}); give one")
        return int(ids[0])

    def greedy(self, prompt: str, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> str:
        """The prompt and its greedy continuation (the same text every time: no sampling)."""
        from memstore_gpt2.generate import sample_tokens

        ids = sample_tokens(
            self.model,
            self.encode(prompt),
            max_new_tokens=max_new_tokens,
            temperature=0,
            eos_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_student(student_dir: str | os.PathLike, db: str | None = None) -> str:
    """The student's database URL, after checking that the database and its collections exist.

    Raises :class:`StudentFormatError` for a directory that is not a student or has lost its
    database, and a ``db`` parameter error for a ``db`` that does not hold this student.
    """
    from memstore import Store
    from memstore.errors import DatabaseError
    from memstore_gpt2.student import read_manifest, resolve_db_url

    manifest = read_manifest(student_dir)
    db_url = resolve_db_url(student_dir, manifest, db)
    if db_url.startswith("sqlite:///"):
        path = Path(db_url[len("sqlite:///") :].split("?", 1)[0])
        if not path.is_file():
            if db:
                raise bad_parameter("db", f"{db!r}: no database file at {path}")
            raise StudentFormatError(
                f"the memory database of {str(student_dir)!r} is missing: no file at {path}; "
                "pass --db URL if it was moved"
            )
    try:
        store = Store(db_url, create=False, read_only=db_url.startswith("sqlite:///"))
    except DatabaseError as exc:
        raise StudentFormatError(
            f"cannot open the memory database of {student_dir}: {exc}"
        ) from None
    try:
        for key, entry in manifest.get("layers", {}).items():
            where = "block " + key if key.isdigit() else key
            parts = entry.get("parts") or [entry]  # a grown block: featural + extra rows
            for i, part in enumerate(parts):
                name = part.get("config", {}).get("collection")
                if name and not store.has_collection(name):
                    what = f"the extra rows of {where}" if i else f"the memory of {where}"
                    raise StudentFormatError(
                        f"database {store.url.render_as_string(hide_password=True)} has no "
                        f"collection {name!r} ({what}): is it this student's database?"
                    )
    finally:
        store.close()
    return db_url


MAX_ROW_ID = 2**63 - 1  # the largest id SQL can bind (a signed 64-bit integer)
MAX_IDS_AT_ONCE = 1_000_000


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 5,000-digit number stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...({len(text)} characters)"


def parse_ids(value, parameter: str = "ids", *, holds: tuple[str, int] | None = None) -> list[int]:
    """``"102,162"``, ``"5-9"``, a number or a list of them -> sorted unique ids, or one clear error.

    Every id must fit SQL's 64-bit integers (a larger one would overflow at bind time, not here).
    With ``holds=(layer, rows)`` the merged ranges are counted before anything is expanded: asking
    ``0-1000000`` of a 128-row layer is refused at once instead of expanding a million ids only to
    look them up and fail. Without it a range may name at most a million ids."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        parts = str(value).replace(" ", ",").split(",")
    else:
        raise bad_parameter(
            parameter, f"must be row ids like '102,162', '5-9' or a list, got {shown(value)}"
        )
    spans: list[tuple[int, int]] = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise bad_parameter(parameter, f"{shown(part)} is not a row id")
        text = str(part).strip()
        if not text:
            continue
        lo, sep, hi = text.partition("-")
        try:
            low, high = (int(lo), int(hi)) if sep and lo else (int(text), int(text))
        except ValueError:
            raise bad_parameter(
                parameter,
                f"{shown(value if isinstance(value, str) else text)}: expected row ids like"
                " '102,162' or '5-9'",
            ) from None
        if low > high:
            raise bad_parameter(parameter, f"{shown(text)}: a range goes from low to high")
        if low < 0 or high > MAX_ROW_ID:
            raise bad_parameter(parameter, f"{shown(text)} is out of range: row ids are 0..2**63-1")
        spans.append((low, high))
    if not spans:
        raise bad_parameter(parameter, "is empty: give at least one row id")
    distinct, reach = 0, -1  # distinct ids of the merged spans, counted without expanding them
    for low, high in sorted(spans):
        if high > reach:
            distinct += high - max(low, reach + 1) + 1
            reach = high
    if holds is not None and distinct > holds[1]:
        raise bad_parameter(parameter, f"names {distinct:,} rows but {holds[0]} holds {holds[1]:,}")
    if distinct > MAX_IDS_AT_ONCE:
        raise bad_parameter(
            parameter, f"names {distinct:,} rows: at most {MAX_IDS_AT_ONCE:,} at once"
        )
    return sorted({i for low, high in spans for i in range(low, high + 1)})
