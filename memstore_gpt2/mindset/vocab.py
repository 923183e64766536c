"""What a memory row says in words: its value projected onto the vocabulary.

A feed-forward layer adds ``weight x value`` to the residual stream for every row it reads, so a
row's value is a direction in the model's output space, and reading it through the unembedding
shows which next tokens it pushes up (promotes) and down (suppresses) -- Geva et al. 2022,
"Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space";
LM-Debugger does the same for GPT-2's MLP rows. Exactly, for a row with value ``v``:

1. **out path**: ``r = W_o v`` where the layer has an output projection ``W_o``, else ``r = v``.
   An associative row is read by any of its heads, each through its own slice of the output
   projection; it is projected as read by every head with weight 1 (``r = sum_h W_o[:, h] v``).
   The rest of the residual stream is ignored.
2. **final layer norm without its shift**: ``h = gamma * (r - mean(r)) / sqrt(var(r) + eps)`` with
   ``ln_f``'s ``gamma`` and ``eps``. Its shift ``beta`` is left out: it is the same vector for
   every row and would push the same tokens up in every row's list. Normalising makes the numbers
   comparable from row to row (a row's ranking does not depend on its norm).
3. **unembedding**: ``logits = W_U h`` with the model's output embedding ``W_U`` (GPT-2's
   ``lm_head``, tied to the token embedding).

The tokens with the largest logits are what the row promotes, the smallest what it suppresses. A
row with a negative weight at some token does the opposite there; the weights ``memstore trace``
shows say which way it was read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: Rows projected per matrix product (bounds memory: rows x vocabulary floats at a time).
CHUNK_ROWS = 512


def out_path(layer, values: torch.Tensor) -> torch.Tensor:
    """(n, row value width) values -> (n, d_model): what each row adds when read with weight 1."""
    from memstore_torch import AssociativeMemory

    values = values.detach().float()
    if isinstance(layer, AssociativeMemory):
        dv, heads = layer.value_dim, layer.heads
        w = layer.out_proj.weight.detach().float()  # (d, heads * dv)
        return sum(values @ w[:, h * dv : (h + 1) * dv].T for h in range(heads))
    if layer.out_proj is not None:
        return layer.out_proj(values).detach()
    return values


def vocab_logits(model, residual: torch.Tensor) -> torch.Tensor:
    """(n, d_model) residual-stream vectors -> (n, vocabulary) logits, as steps 2-3 above."""
    ln = model.transformer.ln_f
    r = residual.float()
    h = (r - r.mean(-1, keepdim=True)) / torch.sqrt(
        r.var(-1, unbiased=False, keepdim=True) + ln.eps
    )
    h = h * ln.weight.detach().float()
    return h @ model.get_output_embeddings().weight.detach().float().T


@dataclass
class Projection:
    """Per row: the ``top`` promoted and suppressed token ids with their logits, best first, and
    (when asked) the logit and rank (1 = most promoted) of one chosen token."""

    promote_ids: torch.Tensor  # (n, top)
    promote_logits: torch.Tensor  # (n, top)
    suppress_ids: torch.Tensor  # (n, top), most suppressed first
    suppress_logits: torch.Tensor  # (n, top)
    token_logit: torch.Tensor | None = None  # (n,)
    token_rank: torch.Tensor | None = None  # (n,)

    def joined(self, other: Projection) -> Projection:
        """This projection's rows, then ``other``'s."""
        return Projection(
            *(
                None if a is None else torch.cat([a, b])
                for a, b in ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
            )
        )

    def take(self, positions) -> Projection:
        """The rows at ``positions`` (a sequence or array of row positions)."""
        index = torch.as_tensor(positions, dtype=torch.long)
        return Projection(
            *(
                None if t is None else t[index]
                for t in (getattr(self, f.name) for f in fields(self))
            )
        )


@torch.no_grad()
def project_rows(
    model, layer, values: torch.Tensor, top: int = 10, token_id: int | None = None
) -> Projection:
    """Project rows' values (n, width) through ``layer``'s out path onto the vocabulary."""
    parts: list[tuple] = []
    for start in range(0, max(values.shape[0], 1), CHUNK_ROWS):  # an empty input: one empty chunk
        logits = vocab_logits(model, out_path(layer, values[start : start + CHUNK_ROWS]))
        t = min(top, logits.shape[1])
        up = logits.topk(t, dim=1)
        down = logits.topk(t, dim=1, largest=False)
        if token_id is None:
            tok_logit = tok_rank = None
        else:
            tok_logit = logits[:, token_id]
            tok_rank = (logits > tok_logit[:, None]).sum(1) + 1
        parts.append((up.indices, up.values, down.indices, down.values, tok_logit, tok_rank))
    columns = zip(*parts, strict=True)
    return Projection(*(None if c[0] is None else torch.cat(c) for c in columns))


def token_list(mindset, ids: torch.Tensor, logits: torch.Tensor) -> list[dict]:
    """``[{"token": text, "id": id, "logit": value}, ...]`` for one row."""
    return [
        {"token": mindset.token_text(int(i)), "id": int(i), "logit": round(float(v), 4)}
        for i, v in zip(ids.tolist(), logits.tolist(), strict=True)
    ]
