"""The modules of a knowledge pack: product-key memories that read the student, a vocabulary
delta, and one gate that mixes the pack's next-token distribution with the student's.

A pack never writes into the student's stream (docs/design.md, Knowledge packs). It *reads* what
the frozen student computes -- each block's MLP input ``x_l``, the residual ``r`` entering the
final layer norm, the token ids -- and builds its own prediction from them::

    r_pack   = r + sum_l memory_l(x_l) + delta_in[ids]          # (B, T, d)
    logits_p = lm_head(ln_f(r_pack)) + ln_f(r_pack) . delta_out  # at the pack's token columns
    p        = w_s * p_student + sum_i w_i * p_pack_i            # w = softmax([0, a_1, ...])

with ``a_i = gate_i(student's final hidden state)`` a per-token logit. One pack alone mixes with
weight ``sigmoid(a)``.

Why a mixture and not an added delta. An additive change to the student's stream or logits is
unbounded where its gate is only partly closed: with gates in the stream the old domain's
perplexity rose 1.46x while a pack was attached, because every partly open gate moved every
later layer. A mixture bounds the harm on any token by ``-ln w_s`` whatever the pack predicts, so
a gate that is *mostly* closed is enough; several packs compose as a mixture (each pack's weight
grows only against the student's, so a pack quiet on a text stays quiet beside another); and
learning needs no backward pass through the student (its forward runs without autograd).

Why the vocabulary delta. With the student's embeddings frozen, a new domain's tokens keep the
meaning the old domain gave them: the prototype reached 86 % of full fine-tuning's gain by
training the token embeddings alone. The delta covers only the tokens the pack's text selects
(ranked TF-IDF against background text), so it stays small and sparse.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from memstore_torch import ProductKeyMemory

#: Statistics of the two next-token distributions the gate reads beside the hidden state.
GATE_STATISTICS = 5


def distribution_statistics(logp_student: torch.Tensor, logp_pack: torch.Tensor) -> torch.Tensor:
    """``(..., V), (..., V) -> (..., GATE_STATISTICS)``, each about O(1): the entropies and the
    top log-probabilities of the student's and the pack's distributions, and the student's
    log-probability of the pack's top token. Which of two predictors to trust shows in how sure
    each is and whether they agree -- far more than in one hidden state read linearly (a gate on
    the hidden state alone read 0.30 on old text and 0.62 on the pack's)."""
    scale = 1.0 / math.log(logp_student.shape[-1])
    entropy_s = -(logp_student.exp() * logp_student).sum(-1)
    entropy_p = -(logp_pack.exp() * logp_pack).sum(-1)
    top_p, top_ids = logp_pack.max(-1)
    top_s = logp_student.max(-1).values
    agreement = logp_student.gather(-1, top_ids.unsqueeze(-1)).squeeze(-1)
    return torch.stack([entropy_s, entropy_p, top_s, top_p, agreement], -1) * scale


class TokenGate(nn.Module):
    """``(..., d), (..., GATE_STATISTICS) -> (..., 1)``: the pack's mixing logit, read from the
    normalised hidden state and the two distributions' statistics. Starts at ``bias``: a new
    pack mixes in with weight ``sigmoid(bias)``."""

    def __init__(self, d_model: int, bias: float = 0.0, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model + GATE_STATISTICS, hidden)
        self.read = nn.Linear(hidden, 1)
        nn.init.zeros_(self.read.weight)
        nn.init.constant_(self.read.bias, bias)

    def forward(self, x: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:])
        features = torch.cat([normed, statistics.to(normed.dtype)], dim=-1)
        return self.read(F.gelu(self.hidden(features)))


class VocabularyDelta(nn.Module):
    """Input and output rows for ``token_ids`` of the vocabulary, in the pack's own prediction.

    ``embed(ids)`` is what the pack adds to the residual it reads at those tokens; ``logits(h)``
    adds ``h . delta_out`` to its logits at their columns only (cost ``tokens x len(token_ids)``).
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

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., d): the delta rows of the pack's tokens, zero elsewhere."""
        slots = self.slot_of[ids]
        # F.embedding, not delta_in[slots]: on CPU the backward of advanced indexing (an
        # accumulating index_put) adds a token's repeats in a thread-dependent order, and a
        # seeded learn then differs between runs in the last bits
        rows = F.embedding(slots.clamp(min=0), self.delta_in)
        return rows * (slots >= 0).unsqueeze(-1).to(rows.dtype)

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (..., V) with ``h . delta_out`` added at the pack's token columns."""
        added = hidden @ self.delta_out.to(hidden.dtype).t()  # (..., R)
        return logits.index_add(-1, self.token_ids, added.to(logits.dtype))


class Pack(nn.Module):
    """One pack: its block memories (``blocks[str(i)]`` reads block ``i``'s MLP input), its
    vocabulary delta and its mixing gate."""

    def __init__(
        self,
        name: str,
        blocks: dict[int, ProductKeyMemory],
        vocabulary: VocabularyDelta | None,
        d_model: int,
        gate_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleDict({str(i): m for i, m in sorted(blocks.items())})
        self.vocabulary = vocabulary
        self.gate = TokenGate(d_model, gate_bias)
        #: (B,) 1/0 per batch row: whether this pack acts on that sequence (None: on all); set by
        #: :func:`memstore_gpt2.packs.attach.select_packs` for batches that mix packs.
        self.row_mask: torch.Tensor | None = None
        #: The pack's mixture weight at each position of the last forward, (B, T, 1): what
        #: ``learn`` keeps low on background text and Mindset shows.
        self.last_weight: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.blocks]

    def rows(self) -> int:
        return sum(m.n_rows for m in self.blocks.values())

    def predict(
        self,
        block_inputs: dict[str, torch.Tensor],
        residual: torch.Tensor,
        ids: torch.Tensor | None,
        ln_f: nn.LayerNorm,
        head_weight: torch.Tensor,
        student_logits: torch.Tensor,
        student_logp: torch.Tensor,
        hidden: torch.Tensor,
        *,
        gate_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pack's mixing logit ``(B, T, 1)`` and its next-token log-probabilities
        ``(B, T, V)`` (fp32) from the student's states at the same positions (``hidden``: the
        student's ``lm_head`` input, ``student_logp`` its log-softmax).

        ``gate_only``: the prediction is computed without autograd (only the gate trains on
        ``learn``'s background text), which spares its backward pass.
        """
        with torch.no_grad() if gate_only else nullcontext():
            logp = self.propose(block_inputs, residual, ids, ln_f, head_weight, student_logits,
                                hidden)  # fmt: skip
        statistics = distribution_statistics(student_logp, logp.detach())
        return self.gate(hidden, statistics), logp

    def propose(self, block_inputs, residual, ids, ln_f, head_weight, student_logits, hidden):
        """The pack's next-token log-probabilities (fp32): the student's head over the
        student's final residual plus what the pack's memories and input deltas add.

        ``student_logits + lm_head(ln_f(r_pack) - hidden)`` equals ``lm_head(ln_f(r_pack))``
        (the head is linear) and keeps the student's own rounding where the pack adds nothing.
        """
        added = torch.zeros_like(residual)
        for key, memory in self.blocks.items():
            added = added + memory(block_inputs[key]).to(residual.dtype)
        if self.vocabulary is not None:
            if ids is None:
                raise RuntimeError("a pack's vocabulary delta needs the input ids (not embeddings)")
            added = added + self.vocabulary.embed(ids).to(residual.dtype)
        mine = F.layer_norm(residual + added, ln_f.normalized_shape, ln_f.weight, ln_f.bias,
                            ln_f.eps)  # fmt: skip
        logits = student_logits + F.linear(mine - hidden, head_weight.to(mine.dtype))
        if self.vocabulary is not None:
            logits = self.vocabulary.logits(mine, logits)
        return torch.log_softmax(logits.float(), dim=-1)
