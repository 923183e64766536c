"""The modules of a knowledge pack: gated product-key memories and a gated vocabulary delta.

A pack adds to a frozen student; it never replaces anything of it (docs/design.md, Knowledge
packs). Per block it reads in, a :class:`PackMemory` adds ``gate(x) * memory(x)`` to the block's
MLP output; on the vocabulary side a :class:`VocabularyDelta` adds rows to the input embeddings
of the tokens the pack's text uses and ``gate(h) * h . delta_out`` to their logits.

Why the gates. A pack learnt on one text must be quiet on text it is not about, or attaching it
(or composing it with another pack) degrades what the student already knew: the prototype without
gates raised the old domain's perplexity 2.7x while attached. A gate is a per-token scalar in
(0, 1) read from the hidden state the pack sees; ``memstore learn`` trains it to close on
background text (docs/design.md, What a pack learns), so it is the pack's own "is this text mine"
detector.

Why the vocabulary delta. With the student's embeddings frozen, a new domain's tokens keep the
meaning the old domain gave them: the prototype reached 86 % of full fine-tuning's gain by
training the token embeddings alone. The delta covers only the tokens the pack's text selects
(ranked TF-IDF against background text), so it stays small and sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memstore_torch import ProductKeyMemory


class TokenGate(nn.Module):
    """``(..., d) -> (..., 1)``: sigmoid of a linear read of the normalised hidden state."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.read = nn.Linear(d_model, 1)
        nn.init.zeros_(self.read.weight)
        nn.init.zeros_(self.read.bias)  # half open at the start; learning decides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:])
        return torch.sigmoid(self.read(normed))


class PackMemory(nn.Module):
    """``(..., d) -> (..., d)``: ``gate(x) * memory(x)``, a pack's rows in one block. The memory's
    values start at zero, so a new pack changes nothing until it learns."""

    def __init__(self, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.memory = memory
        self.gate = TokenGate(memory.config.d_model)
        #: The gate values of the last forward, (..., 1): what `learn` regularises and Mindset shows.
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x)
        self.last_gate = gate
        return gate * self.memory(x)


class VocabularyDelta(nn.Module):
    """Input-embedding and (gated) output-embedding rows for ``token_ids`` of the vocabulary.

    ``embed(ids)`` is what the pack adds to ``wte(ids)``; ``logits(h)`` is what it adds to
    ``lm_head(h)`` -- only at the columns of its tokens, so its cost is ``tokens x len(token_ids)``.
    """

    def __init__(self, vocab_size: int, d_model: int, token_ids: torch.Tensor) -> None:
        super().__init__()
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        self.register_buffer("token_ids", token_ids)
        slot_of = torch.full((vocab_size,), -1, dtype=torch.long)
        slot_of[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.delta_in = nn.Parameter(torch.zeros(len(token_ids), d_model))
        self.delta_out = nn.Parameter(torch.zeros(len(token_ids), d_model))
        self.gate = TokenGate(d_model)
        self.last_gate: torch.Tensor | None = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., d): the delta rows of the pack's tokens, zero elsewhere."""
        slots = self.slot_of[ids]
        rows = self.delta_in[slots.clamp(min=0)]
        return rows * (slots >= 0).unsqueeze(-1).to(rows.dtype)

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (..., V) with ``gate(h) * h . delta_out`` added at the pack's token columns."""
        gate = self.gate(hidden)
        self.last_gate = gate
        added = gate * (hidden @ self.delta_out.to(hidden.dtype).t())  # (..., R)
        return logits.index_add(-1, self.token_ids, added.to(logits.dtype))


class Pack(nn.Module):
    """One attached pack: its block memories (``blocks[str(i)]``) and its vocabulary delta."""

    def __init__(
        self, name: str, blocks: dict[int, PackMemory], vocabulary: VocabularyDelta | None
    ) -> None:
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleDict({str(i): m for i, m in sorted(blocks.items())})
        self.vocabulary = vocabulary
        #: (B,) 1/0 per batch row: whether this pack acts on that sequence (None: on all); set by
        #: :func:`memstore_gpt2.packs.attach.select_packs` for batches that mix packs.
        self.row_mask: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.blocks]

    def gates(self) -> list[torch.Tensor]:
        """The gate values of the last forward (one (..., 1) tensor per part that ran)."""
        parts = [*self.blocks.values(), self.vocabulary]
        return [p.last_gate for p in parts if p is not None and p.last_gate is not None]

    def rows(self) -> int:
        return sum(m.memory.n_rows for m in self.blocks.values())
