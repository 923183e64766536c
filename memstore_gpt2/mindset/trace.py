"""Which memory rows fired for each token of a prompt: the forward pass's own record.

The trace runs the prompt once with every memory layer's ``record_reads`` on
(:func:`memstore_torch.model_memory.recording_reads`), so the ids and weights it reports are the
ones the forward's top-k selected and used -- not a second search that could pick differently.
For each token and layer it lists the rows read, largest contribution first, where a row's
contribution is ``|weight| * ||out path(value)||``: the length of what that row added to the
layer's output at that token (:func:`memstore_gpt2.mindset.vocab.out_path`; an associative row
read by several heads adds each head's part). A row read by several heads of one token is one
entry with the weights summed.

Rows selected at *every* token of the prompt are called out (``every_token``): such rows act like
a constant bias of the layer rather than a memory of anything in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memstore.errors import bad_parameter
from memstore_gpt2.mindset.vocab import out_path


@dataclass
class LayerTrace:
    """One layer's reads: per token, row ids with their weights and contribution sizes."""

    ids: list[list[int]]
    weights: list[list[float]]
    contributions: list[list[float]]
    selected: int  # rows the forward read per token (k x heads)
    every_token: list[int]  # rows read at every token, by id

    def to_json(self) -> dict:
        return {
            "ids": self.ids,
            "weights": self.weights,
            "contributions": self.contributions,
            "selected": self.selected,
            "every_token": self.every_token,
        }


@dataclass
class Trace:
    tokens: list[str]
    token_ids: list[int]
    layers: dict[str, LayerTrace] = field(default_factory=dict)

    def to_json(self) -> dict:
        """``{"tokens": [...], "token_ids": [...], "layers": {collection: {"ids": [[...] per
        token], "weights": [[...] per token], "contributions": ..., "selected", "every_token"}}}``."""
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "layers": {name: layer.to_json() for name, layer in self.layers.items()},
        }


@torch.no_grad()
def trace_prompt(mindset, prompt: str, layers: str | None = None, top: int | None = 8) -> Trace:
    """Trace ``prompt`` through the student; ``top`` rows per token and layer (None or 0: every
    row the forward read)."""
    if top is not None and top < 0:
        raise bad_parameter("top", f"must be >= 0, got {top}")
    chosen = mindset.select(layers)
    return _trace(mindset, chosen, mindset.encode(prompt), top)


@torch.no_grad()
def trace_tokens(mindset, token_ids: list[int], layers: str | None = None,
                 top: int | None = 8) -> Trace:  # fmt: skip
    """:func:`trace_prompt` of token ids rather than text: what the chat pane traces, a
    conversation and the reply the student generated, token for token (decoding the reply and
    encoding it again need not give back the same tokens)."""
    if top is not None and top < 0:
        raise bad_parameter("top", f"must be >= 0, got {top}")
    chosen = mindset.select(layers)
    if not token_ids:
        raise bad_parameter("token_ids", "is empty: give some tokens")
    if len(token_ids) > mindset.context:
        raise bad_parameter(
            "token_ids", f"is {len(token_ids)} tokens long; this model reads at most "
            f"{mindset.context}"
        )  # fmt: skip
    return _trace(mindset, chosen, list(token_ids), top)


def _trace(mindset, chosen, token_ids: list[int], top: int | None) -> Trace:
    """One forward over ``token_ids`` with the ``chosen`` layers recording their reads."""
    from memstore_torch.model_memory import recording_reads

    with recording_reads(mindset.model):
        mindset.model(input_ids=torch.tensor([token_ids]), use_cache=False)
        reads = {entry.name: entry.layer.last_read for entry in chosen}
    trace = Trace([mindset.token_text(t) for t in token_ids], list(token_ids))
    for entry in chosen:
        trace.layers[entry.name] = _layer_trace(entry.layer, reads[entry.name], top or None)
    return trace


def _layer_trace(layer, read, top: int | None) -> LayerTrace:
    """Merge heads, measure contributions, order and cut one layer's record."""
    n_tok, heads, k = read.ids.shape
    index = layer.index
    ids = read.ids
    weights = read.weights.float()
    present = ids >= 0
    slots = torch.zeros_like(ids)
    if bool(present.any()):
        slots[present] = index.slots_of(ids[present])
    per_head_path = _is_associative(layer)
    if per_head_path:  # each head reads through its own slice of the output projection
        contrib_vectors = _associative_contributions(layer, slots, weights, present)
    else:  # every head shares the out path: |sum of weights| x ||out path(value)||
        norms = _path_norms(layer, slots[present])  # (n,), measured for the rows read only
        if heads == 1:  # one top-k per token: every row at most once, no merging needed
            return _single_head_trace(index, ids[:, 0], slots[:, 0], weights[:, 0], norms, top)
    out_ids, out_w, out_c, sets = [], [], [], []
    for t in range(n_tok):
        mask = present[t].reshape(-1)
        row_ids = ids[t].reshape(-1)[mask]
        row_w = weights[t].reshape(-1)[mask]
        unique, inverse = torch.unique(row_ids, return_inverse=True)
        w_sum = torch.zeros(unique.shape[0]).index_add_(0, inverse, row_w)
        if per_head_path:
            vec = contrib_vectors[t].reshape(heads * k, -1)[mask]
            size = (
                torch.zeros(unique.shape[0], vec.shape[1]).index_add_(0, inverse, vec).norm(dim=1)
            )
        else:
            size = w_sum.abs() * norms[index.slots_of(unique)]
        order = size.argsort(descending=True, stable=True)
        if top is not None:
            order = order[:top]
        out_ids.append(unique[order].tolist())
        out_w.append(_rounded(w_sum[order][None])[0])
        out_c.append(_rounded(size[order][None])[0])
        sets.append(set(unique.tolist()))
    every = sorted(set.intersection(*sets)) if sets else []
    return LayerTrace(out_ids, out_w, out_c, heads * k, every)


def _single_head_trace(index, ids, slots, weights, norms, top: int | None) -> LayerTrace:
    """The common case (featural, one head), vectorised: ids, slots, weights are (T, k)."""
    n_tok, k = ids.shape
    size = weights.abs() * norms[slots]
    order = size.argsort(dim=1, descending=True, stable=True)[:, : top or k]
    counts = torch.bincount(slots.reshape(-1), minlength=index.n)
    every = index.ids[counts == n_tok].sort().values.tolist() if n_tok else []
    return LayerTrace(
        ids.gather(1, order).tolist(),
        _rounded(weights.gather(1, order)),
        _rounded(size.gather(1, order)),
        k,
        every,
    )


def _path_norms(layer, slots: torch.Tensor) -> torch.Tensor:
    """(n,) ``||out path(value)||`` of the rows at ``slots``, zero for every other row: a
    product-key layer may hold millions of rows, of which a prompt reads a few hundred."""
    index = layer.index
    norms = torch.zeros(index.n)
    read = torch.unique(slots)
    if read.numel():
        norms[read] = out_path(layer, index.values[read]).norm(dim=1).float()
    return norms


def _rounded(values: torch.Tensor) -> list[list[float]]:
    return values.double().round(decimals=5).tolist()


def _is_associative(layer) -> bool:
    from memstore_torch import AssociativeMemory

    return isinstance(layer, AssociativeMemory)


def _associative_contributions(layer, slots, weights, present) -> torch.Tensor:
    """(tokens, heads, k, d_model): each read's weight x its value through its head's slice."""
    heads, dv = layer.heads, layer.value_dim
    w_out = layer.out_proj.weight.detach().float()  # (d, heads * dv)
    values = layer.index.values.detach()[slots] * present[..., None]  # (T, H, k, dv)
    per_head = torch.stack(
        [values[:, h] @ w_out[:, h * dv : (h + 1) * dv].T for h in range(heads)], dim=1
    )  # (T, H, k, d)
    return per_head * weights[..., None]
