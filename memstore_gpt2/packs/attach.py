"""Attaching packs to a loaded student, and detaching them (the student is never modified).

Attaching adds the packs as one submodule, ``model.knowledge_packs`` (so ``.to(device)``,
``memory_layers`` and Mindset's walks find their rows like any memory layer's), and forward hooks
that only *record* what the student computes -- each read block's MLP input, the residual into
``ln_f``, the token ids -- plus one on ``lm_head`` that turns the student's logits into the log of
the mixture of its distribution and the packs' (:mod:`memstore_gpt2.packs.modules`). Hooks leave
every module and weight of the student as it was, so :meth:`Attachment.detach` gives the student
back bit for bit -- and the same hooks work in transformers' forward and in the server's KV-cache
decoder, which both call these modules.

The logits of an attached model are therefore normalised log-probabilities (``log p``): argmax,
softmax, log-softmax and perplexity read them as they read raw logits.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memstore.errors import bad_parameter
from memstore_gpt2.errors import PackError
from memstore_gpt2.packs.modules import Pack, VocabularyDelta
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
            blocks[layer] = memory
        vocabulary = None
        if "vocabulary.token_ids" in record.parts:
            vocabulary = VocabularyDelta(
                int(record.manifest["student"]["vocab_size"]),
                int(record.manifest["student"]["d_model"]),
                record.parts["vocabulary.token_ids"],
            )
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise PackError(f"pack {record.name!r} is damaged ({type(exc).__name__}: {exc})") from None
    pack = Pack(record.name, blocks, vocabulary, int(record.manifest["student"]["d_model"]))
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


class _StudentStates:
    """What the student computed in the forward under way, recorded by the attachment's hooks
    for the packs to read at ``lm_head`` (and dropped there: nothing outlives one forward)."""

    def __init__(self) -> None:
        self.block_inputs: dict[str, torch.Tensor] = {}
        self.residual: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        #: True while ``memstore learn`` runs the student without autograd: the packs' part of
        #: the forward (only it) then records gradients.
        self.learning = False
        #: True on ``learn``'s background text: there only the gates train (the pack's own
        #: prediction is held fixed), so a pack cannot lower that loss by imitating the student on
        #: the background it saw -- which did not carry over to other text of that domain.
        self.gate_only = False

    def clear(self) -> None:
        self.block_inputs, self.residual, self.ids = {}, None, None


@dataclass
class Attachment:
    """Packs attached to a model; :meth:`detach` removes every hook and module they added."""

    model: Any
    packs: list[Pack]
    handles: list[Any] = field(default_factory=list)
    states: _StudentStates = field(default_factory=_StudentStates)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.packs]

    def mix_states(self, block_inputs: dict[str, torch.Tensor], residual: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The attached model's log-mixture ``(B, T, V)`` from student states recorded earlier
        (:func:`record_student_states`) instead of a forward: the student is frozen, so what it
        computes on a fixed text can be kept (``learn`` keeps its background text's)."""
        transformer, head = self.model.transformer, self.model.lm_head
        ln_f = transformer.ln_f
        with torch.no_grad():
            hidden = F.layer_norm(residual, ln_f.normalized_shape, ln_f.weight, ln_f.bias,
                                  ln_f.eps)  # fmt: skip
            logits = F.linear(hidden, head.weight, head.bias)
        states = self.states
        states.block_inputs, states.residual, states.ids = dict(block_inputs), residual, ids
        try:
            with torch.enable_grad() if states.learning else nullcontext():
                return _mixture(states, self.packs, ln_f, head.weight, hidden, logits)
        finally:
            states.clear()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.states.clear()
        if hasattr(self.model, PACKS_ATTRIBUTE):
            delattr(self.model, PACKS_ATTRIBUTE)
        self.packs = []


def attach(model, packs: Sequence[Pack]) -> Attachment:
    """Attach ``packs`` to ``model``: its next-token distribution becomes the mixture of the
    student's and theirs (:mod:`memstore_gpt2.packs.modules`)."""
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
    states, handles = attachment.states, attachment.handles
    read = {layer for p in packs for layer in p.blocks}
    handles += _recording_hooks(model, states, read, ids=any(p.vocabulary is not None
                                                             for p in packs))  # fmt: skip
    transformer = model.transformer
    handles.append(model.lm_head.register_forward_hook(_mix(states, list(packs), transformer.ln_f)))
    return attachment


def _recording_hooks(model, states: _StudentStates, blocks: set[str], *, ids: bool) -> list:
    """Hooks that record into ``states`` what packs read: the MLP input of each block in
    ``blocks`` (``str(index)``), the residual into ``ln_f`` and, with ``ids``, the token ids."""

    def record_block_input(key: str):
        return _recording(lambda x: states.block_inputs.__setitem__(key, x))

    handles = [block.mlp.register_forward_hook(record_block_input(str(i)))
               for i, block in enumerate(gpt2_blocks(model)) if str(i) in blocks]  # fmt: skip
    handles.append(model.transformer.ln_f.register_forward_hook(
        _recording(lambda x: setattr(states, "residual", x))))  # fmt: skip
    if ids:
        handles.append(model.transformer.wte.register_forward_hook(
            _recording(lambda x: setattr(states, "ids", x))))  # fmt: skip
    return handles


def record_student_states(model, ids: torch.Tensor, blocks: Sequence[int | str]):
    """What the bare ``model`` computes on ``ids`` without autograd, as packs read it:
    ``(block MLP inputs {str(block): (B, T, d)}, ln_f input (B, T, d), logits (B, T, V))``."""
    if hasattr(model, PACKS_ATTRIBUTE):
        raise PackError("record the student's states with no packs attached")
    states = _StudentStates()
    handles = _recording_hooks(model, states, {str(b) for b in blocks}, ids=False)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return states.block_inputs, states.residual, logits


def _recording(keep):
    """A forward hook handing the module's input to ``keep`` (the output stays as it was)."""

    def hook(module, inputs, output):
        keep(inputs[0])

    return hook


def _mix(states: _StudentStates, packs: list[Pack], ln_f: nn.LayerNorm):
    """The ``lm_head`` hook: the student's logits -> log of the mixture of its distribution and
    the acting packs'. Rows no pack acts on keep the student's logits exactly."""

    def hook(module, inputs, output):
        hidden = inputs[0]
        acting = [p for p in packs if p.row_mask is None or bool(p.row_mask.any())]
        if not acting or states.residual is None:
            states.clear()
            return output
        try:
            with torch.enable_grad() if states.learning else nullcontext():
                return _mixture(states, acting, ln_f, module.weight, hidden, output)
        finally:
            states.clear()

    return hook


def _last(tensor: torch.Tensor, positions: int) -> torch.Tensor:
    """The last ``positions`` positions of ``tensor`` (B, T, ...): transformers' ``generate``
    runs ``lm_head`` on the last position only (``logits_to_keep``)."""
    return tensor if tensor.shape[1] == positions else tensor[:, -positions:]


def _mixture(states, packs, ln_f, head_weight, hidden, student_logits):
    if hidden.dim() != 3:
        raise PackError(
            f"packs read (batch, positions, d) hidden states, got {tuple(hidden.shape)}"
        )
    positions = hidden.shape[1]
    inputs = {k: _last(v, positions) for k, v in states.block_inputs.items()}
    residual = _last(states.residual, positions)
    ids = None if states.ids is None else _last(states.ids, positions)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    gates, logps = [torch.zeros_like(student_logp[..., :1])], []
    acts_somewhere = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for pack in packs:
        gate, logp = pack.predict(inputs, residual, ids, ln_f, head_weight, student_logits,
                                  student_logp, hidden, gate_only=states.gate_only)  # fmt: skip
        gate = gate.float()
        if pack.row_mask is None:
            acts_somewhere[:] = True
        else:
            mask = pack.row_mask.to(device=gate.device, dtype=torch.bool)
            acts_somewhere |= mask
            gate = gate.masked_fill(~mask.view(-1, 1, 1), float("-inf"))
        gates.append(gate)
        logps.append(logp)
    log_weights = torch.log_softmax(torch.cat(gates, dim=-1), dim=-1)  # (B, T, 1 + packs)
    for i, pack in enumerate(packs):
        pack.last_weight = log_weights[..., i + 1 : i + 2].exp()
    mixed = log_weights[..., :1] + student_logp
    for i, logp in enumerate(logps):
        mixed = torch.logaddexp(mixed, log_weights[..., i + 1 : i + 2] + logp)
    if not bool(acts_somewhere.all()):
        keep = ~acts_somewhere.view(-1, 1, 1)
        mixed = torch.where(keep, student_logits.float(), mixed)
    return mixed.to(student_logits.dtype)


def attached_packs(model) -> dict[str, Pack]:
    """The packs attached to ``model`` by name (empty when none)."""
    packs = getattr(model, PACKS_ATTRIBUTE, None)
    return {} if packs is None else {pack.name: pack for pack in packs.values()}


def chosen_packs(choice, loaded: Sequence[str], where: str) -> tuple[str, ...] | None:
    """The packs a request chose among ``loaded`` (``choice``: a name or a list of names; None:
    every loaded pack; ``[]``: the bare student), checked; ``where`` says what loaded them
    ("this server") in the errors, which name the parameter ``pack``."""
    if choice is None:
        return None
    names = [choice] if isinstance(choice, str) else choice
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad_parameter("pack", "must be a pack name or a list of pack names")
    listed = ", ".join(repr(n) for n in loaded) or "none (start it with --pack NAME)"
    for name in names:
        if name not in loaded:
            raise bad_parameter("pack", f"{name!r} is not loaded by {where}; loaded: {listed}")
    if len(set(names)) != len(names):
        raise bad_parameter("pack", f"names a pack twice: {names}")
    return tuple(names)


@contextmanager
def packs_acting(model, per_row: Sequence[Sequence[str]] | None):
    """Within the block the attached packs ``per_row[b]`` act on row ``b`` (as
    :func:`select_packs`; None: every pack on every row), every pack again afterwards."""
    if per_row is None:
        yield
        return
    select_packs(model, per_row)
    try:
        yield
    finally:
        select_packs(model, None)


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
