"""Everything about a few rows: what they promote, their LRFU facts, and where they fire.

With a text (``--data FILE``), the student reads it in blocks of its context length with read
recording on (the same record ``memstore trace`` shows), and for each row keeps the positions
where it got the largest weight: the contexts that fire it most (Neuronpedia's "top
activations"), and its density -- the share of the text's tokens at which it was read at all. A
row read at nearly every token is a constant of the layer, not a memory of something.
"""

from __future__ import annotations

import heapq

import torch

from memstore.errors import bad_parameter
from memstore_gpt2.mindset.rows import describe_rows, row_facts

#: Tokens of ``--data`` read at most (the start of the text), so that explain stays quick.
DEFAULT_MAX_TOKENS = 20_000
#: Tokens shown before the firing token in a context.
CONTEXT_BEFORE = 12


def explain_rows(
    mindset,
    layer: str,
    ids: list[int],
    *,
    data: str | None = None,
    top: int = 10,
    contexts: int = 5,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict:
    """``{"layer", "rows": [{id, score, hits, age, idle, promotes, suppresses, [density,
    contexts]}]}`` for rows ``ids`` of ``layer``; unknown ids are one RowNotFoundError."""
    if not ids:
        raise bad_parameter("ids", "is empty: give at least one row id")
    if top < 1:
        raise bad_parameter("top", f"must be >= 1, got {top}")
    entry = mindset.layer(layer)
    block, clock, lam = row_facts(entry, ids)
    rows = describe_rows(mindset, entry, block, clock, lam, top)
    result = {"layer": entry.name, "rows": rows}
    if data is not None:
        firing, read_tokens = firing_contexts(mindset, entry, ids, data, contexts, max_tokens)
        for row in rows:
            row.update(firing[row["id"]])
        result["data_tokens"] = read_tokens
    return result


@torch.no_grad()
def firing_contexts(mindset, entry, ids, path: str, contexts: int, max_tokens: int):
    """Per row id: ``{"density", "contexts": [{"text", "token", "weight"}]}`` over the start of
    the text file ``path``; also returns how many tokens were read."""
    from memstore_torch.model_memory import recording_reads

    if max_tokens < 1:
        raise bad_parameter("max_tokens", f"must be >= 1, got {max_tokens}")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_parameter("data", f"{path!r} cannot be read as UTF-8 text ({exc})") from None
    tokens = mindset.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if not tokens:
        raise bad_parameter("data", f"{path!r} holds no text")
    context = mindset.context
    wanted = torch.tensor(sorted(set(ids)), dtype=torch.long)
    best: dict[int, list] = {i: [] for i in wanted.tolist()}  # min-heaps of (weight, position)
    counts = dict.fromkeys(wanted.tolist(), 0)
    batch = 16
    starts = list(range(0, len(tokens), context))
    with recording_reads(mindset.model):
        for b in range(0, len(starts), batch):
            chunk = [tokens[s : s + context] for s in starts[b : b + batch]]
            width = max(len(c) for c in chunk)
            inputs = torch.tensor([c + [0] * (width - len(c)) for c in chunk])
            mindset.model(input_ids=inputs, use_cache=False)
            read = entry.layer.last_read
            rid = read.ids.reshape(len(chunk), width, -1)  # heads and k together
            w = read.weights.reshape(len(chunk), width, -1).float()
            for row, offset in enumerate(starts[b : b + batch]):
                n = len(chunk[row])  # padding positions are not text
                hit = torch.isin(rid[row, :n], wanted)  # (n, H*k)
                if not bool(hit.any()):
                    continue
                pos, col = hit.nonzero(as_tuple=True)
                row_ids = rid[row, :n][pos, col].tolist()
                weights = w[row, :n][pos, col].tolist()
                seen: dict[tuple[int, int], float] = {}
                for p, i, x in zip(pos.tolist(), row_ids, weights, strict=True):
                    seen[(i, p)] = seen.get((i, p), 0.0) + x  # heads of one token summed
                for (i, p), x in seen.items():
                    counts[i] += 1
                    item = (x, offset + p)
                    if len(best[i]) < contexts:
                        heapq.heappush(best[i], item)
                    elif item > best[i][0]:
                        heapq.heapreplace(best[i], item)
    out = {}
    for i in wanted.tolist():
        top = sorted(best[i], reverse=True)
        out[i] = {
            "density": round(counts[i] / len(tokens), 5),
            "contexts": [_context(mindset, tokens, p, x) for x, p in top],
        }
    return out, len(tokens)


def _context(mindset, tokens: list[int], position: int, weight: float) -> dict:
    start = max(0, position - CONTEXT_BEFORE)
    return {
        "text": mindset.tokenizer.decode(tokens[start:position]),
        "token": mindset.token_text(tokens[position]),
        "position": int(position),
        "weight": round(float(weight), 5),
    }
