"""Attaching packs to a loaded student, and detaching them (the student is never modified).

Attaching adds the packs as one submodule, ``model.knowledge_packs`` (so ``.to(device)``,
``memory_layers`` and Mindset's walks find their rows like any memory layer's), and forward hooks:
on each block's MLP (``+ gate * memory``), on ``wte`` (``+ delta_in``) and on ``lm_head``
(``+ gate * h . delta_out`` at the pack's token columns). Hooks leave every module and weight of
the student as it was, so :meth:`Attachment.detach` gives the student back bit for bit -- and the
same hooks work in transformers' forward and in the server's KV-cache decoder, which both call
these modules.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memstore_gpt2.errors import PackError
from memstore_gpt2.packs.modules import Pack, PackMemory, VocabularyDelta
from memstore_gpt2.packs.storage import PackRecord, read_pack
from memstore_gpt2.surgery import gpt2_blocks
from memstore_torch import ProductKeyMemory
from memstore_torch.model_memory import is_memory_row_key

#: The submodule of a model under which attached packs live.
PACKS_ATTRIBUTE = "knowledge_packs"


def student_fingerprint(student_dir: str | os.PathLike) -> str:
    """sha256 of the student's dense weights (``dense.pt``): a pack learnt for one student is
    refused by another, even of the same shape, because its rows were fitted to those weights."""
    from memstore_gpt2.student import WEIGHTS_FILE

    digest = hashlib.sha256()
    with open(Path(student_dir) / WEIGHTS_FILE, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def student_shape(model) -> dict[str, int]:
    """The dims a pack must share with the student it attaches to."""
    return {
        "d_model": int(model.config.n_embd),
        "n_layer": int(model.config.n_layer),
        "vocab_size": int(model.config.vocab_size),
    }


def check_fits(record: PackRecord, model, fingerprint: str | None) -> None:
    """Refuse, in one line, a pack that does not fit this student: other dims, blocks it does not
    have, another student's weights, or a pack whose learning has not finished."""
    manifest, name = record.manifest, record.name
    learnt_for = manifest.get("student")
    if not isinstance(learnt_for, dict):
        raise PackError(f"pack {name!r}'s manifest is damaged: it names no student")
    here = student_shape(model)
    for key, value in here.items():
        if key == "n_layer":
            continue
        if learnt_for.get(key) != value:
            raise PackError(
                f"pack {name!r} does not fit this student: it was learnt for {key} "
                f"{learnt_for.get(key)!r}, this student has {value}"
            )
    outside = [i for i in manifest["layers"] if not 0 <= i < here["n_layer"]]
    if outside:
        raise PackError(
            f"pack {name!r} does not fit this student: it reads block(s) {outside}, "
            f"this student has blocks 0-{here['n_layer'] - 1}"
        )
    if fingerprint is not None and learnt_for.get("fingerprint") != fingerprint:
        raise PackError(
            f"pack {name!r} was learnt for another student (its dense weights differ from this "
            "one's); learn it again for this student"
        )
    if not record.finished:
        raise PackError(
            f"pack {name!r} has not finished learning (step {record.extra.get('step', 0)} of "
            f"{manifest.get('steps')}); finish it with 'memstore learn ... --pack {name} --resume'"
        )


def build_pack(record: PackRecord, store, cache_rows: dict[int, int | None] | None = None) -> Pack:
    """The modules of a stored pack, rows bound to (and loaded from) its collections, dense parts
    from its blob; ``cache_rows`` ({block: rows}) pages a block's rows through that big a cache."""
    cache_rows = cache_rows or {}
    blocks = {}
    configs = record.manifest.get("memories")
    if not isinstance(configs, dict):
        raise PackError(f"pack {record.name!r}'s manifest is damaged: no 'memories'")
    try:
        for layer in record.manifest["layers"]:
            saved = configs[str(layer)]
            memory = ProductKeyMemory.from_config(saved, store, cache_rows=cache_rows.get(layer))
            blocks[layer] = PackMemory(memory)
        vocabulary = None
        if "vocabulary.token_ids" in record.parts:
            vocabulary = VocabularyDelta(
                int(record.manifest["student"]["vocab_size"]),
                int(record.manifest["student"]["d_model"]),
                record.parts["vocabulary.token_ids"],
            )
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise PackError(f"pack {record.name!r} is damaged ({type(exc).__name__}: {exc})") from None
    pack = Pack(record.name, blocks, vocabulary)
    load_parts(pack, record.parts)
    return pack


def dense_parts(pack: Pack) -> dict[str, torch.Tensor]:
    """The pack's state without its rows (those live in its collections)."""
    return {
        key: value.detach().cpu().clone()
        for key, value in pack.state_dict().items()
        if not is_memory_row_key(key, pack)
    }


def load_parts(pack: Pack, parts: dict[str, torch.Tensor]) -> None:
    try:
        result = pack.load_state_dict(parts, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise PackError(f"pack {pack.name!r}'s parts do not fit its shape: {first}") from None
    missing = [k for k in result.missing_keys if not is_memory_row_key(k, pack)]
    if missing or result.unexpected_keys:
        raise PackError(
            f"pack {pack.name!r} is damaged: parts missing {missing[:3]} "
            f"or unexpected {result.unexpected_keys[:3]}"
        )
    for key, value in parts.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PackError(f"pack {pack.name!r} is damaged: {key} holds NaN or infinite values")


@dataclass
class Attachment:
    """Packs attached to a model; :meth:`detach` removes every hook and module they added."""

    model: Any
    packs: list[Pack]
    handles: list[Any] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.packs]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if hasattr(self.model, PACKS_ATTRIBUTE):
            delattr(self.model, PACKS_ATTRIBUTE)
        self.packs = []


def attach(model, packs: Sequence[Pack]) -> Attachment:
    """Attach ``packs`` (their outputs summed, each behind its own gates) to ``model``."""
    if hasattr(model, PACKS_ATTRIBUTE):
        raise PackError("packs are already attached to this model: detach them first")
    names = [p.name for p in packs]
    if len(set(names)) != len(names):
        raise PackError(f"pack named twice: {names}")
    attachment = Attachment(model, list(packs))
    if not packs:
        return attachment
    device = next(model.parameters()).device
    # keyed by position, not by name: a pack may be called "half" or "to", which a ModuleDict
    # cannot hold as keys (they are nn.Module attributes)
    holder = nn.ModuleDict({f"pack{i}": p for i, p in enumerate(packs)})
    model.add_module(PACKS_ATTRIBUTE, holder.to(device))
    blocks = gpt2_blocks(model)
    for index, block in enumerate(blocks):
        readers = [(p, p.blocks[str(index)]) for p in packs if str(index) in p.blocks]
        if readers:
            attachment.handles.append(block.mlp.register_forward_hook(_add_outputs(readers)))
    vocabularies = [(p, p.vocabulary) for p in packs if p.vocabulary is not None]
    if vocabularies:
        wte, head = model.transformer.wte, model.lm_head
        attachment.handles.append(wte.register_forward_hook(_add_embeddings(vocabularies)))
        attachment.handles.append(head.register_forward_hook(_add_logits(vocabularies)))
    return attachment


def _masked(pack: Pack, added: torch.Tensor) -> torch.Tensor:
    """``added`` (B, ...) with the rows of sequences that did not ask for ``pack`` zeroed."""
    if pack.row_mask is None:
        return added
    mask = pack.row_mask.to(device=added.device, dtype=added.dtype)
    return added * mask.view(-1, *([1] * (added.dim() - 1)))


def _add_outputs(readers: list[tuple[Pack, PackMemory]]):
    def hook(module, inputs, output):
        x = inputs[0]
        for pack, reader in readers:
            output = output + _masked(pack, reader(x).to(output.dtype))
        return output

    return hook


def _add_embeddings(vocabularies: list[tuple[Pack, VocabularyDelta]]):
    def hook(module, inputs, output):
        ids = inputs[0]
        for pack, vocabulary in vocabularies:
            output = output + _masked(pack, vocabulary.embed(ids).to(output.dtype))
        return output

    return hook


def _add_logits(vocabularies: list[tuple[Pack, VocabularyDelta]]):
    def hook(module, inputs, output):
        hidden = inputs[0]
        for pack, vocabulary in vocabularies:
            output = output + _masked(pack, vocabulary.logits(hidden, torch.zeros_like(output)))
        return output

    return hook


def attached_packs(model) -> dict[str, Pack]:
    """The packs attached to ``model`` by name (empty when none)."""
    packs = getattr(model, PACKS_ATTRIBUTE, None)
    return {} if packs is None else {pack.name: pack for pack in packs.values()}


def select_packs(model, per_row: Sequence[Sequence[str]] | None) -> None:
    """Which attached packs act on each row of the next batches: ``per_row[b]`` names the packs
    of sequence ``b`` (a server batches requests that chose different packs); None: every
    attached pack acts on every row. Unknown names are refused (one line)."""
    packs = attached_packs(model)
    if per_row is None:
        for pack in packs.values():
            pack.row_mask = None
        return
    for names in per_row:
        unknown = sorted(set(names) - set(packs))
        if unknown:
            raise PackError(
                f"pack {unknown[0]!r} is not attached (attached: {', '.join(packs) or 'none'})"
            )
    for name, pack in packs.items():
        pack.row_mask = torch.tensor([float(name in names) for names in per_row])


def attach_packs(
    model,
    store,
    packs: Sequence[str | PackRecord],
    *,
    fingerprint: str | None = None,
    cache_rows: dict[str, dict[int, int | None]] | None = None,
) -> Attachment:
    """Check that each pack (a name in ``store``, or a record already read from it) fits, and
    attach them all (none: nothing is attached)."""
    built = []
    for pack in packs:
        record = pack if isinstance(pack, PackRecord) else read_pack(store, pack)
        check_fits(record, model, fingerprint)
        built.append(build_pack(record, store, (cache_rows or {}).get(record.name)))
    return attach(model, built)
