"""What a row promotes (the vocabulary projection), the rows listing, and explain's contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import lrfu
from memstore.errors import InvalidInputError, RowNotFoundError
from memstore_gpt2.mindset.explain import explain_rows
from memstore_gpt2.mindset.rows import PROMOTES_WITHIN, list_rows
from memstore_gpt2.mindset.vocab import project_rows


def _by_hand(model, value: torch.Tensor) -> torch.Tensor:
    """The documented projection, written out: LN_f without its shift, then the unembedding."""
    ln = model.transformer.ln_f
    centred = value - value.mean()
    normed = centred / torch.sqrt((centred**2).mean() + ln.eps) * ln.weight.detach()
    return model.lm_head.weight.detach() @ normed


def test_projection_is_the_documented_one(mindset):
    entry = mindset.layer("layer0")
    values = entry.layer.index.values.detach()[:5]
    projection = project_rows(mindset.model, entry.layer, values, top=7)
    for i in range(5):
        logits = _by_hand(mindset.model, values[i])
        assert projection.promote_ids[i].tolist() == logits.topk(7).indices.tolist()
        assert projection.suppress_ids[i].tolist() == logits.topk(7, largest=False).indices.tolist()
        torch.testing.assert_close(projection.promote_logits[i], logits.topk(7).values)
    # the shift of ln_f is left out on purpose: with it, every row's list would move alike
    assert float(mindset.model.transformer.ln_f.bias.detach().abs().sum()) > 0


def test_rows_sorted_by_hits_score_and_age(mindset):
    coll = mindset.layer("layer0").collection
    block, clock = coll.export_rows(), coll.clock
    result = list_rows(mindset, "layer0", sort="hits", limit=10)
    assert result["total"] == len(block) == 128 and result["matched"] == 128
    assert [r["id"] for r in result["rows"]] == [
        int(i) for i in block.ids[np.argsort(-block.hits, kind="stable")][:10]
    ]
    scores = [r["score"] for r in list_rows(mindset, "layer0", sort="score", limit=0)["rows"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 128
    expected = lrfu.order_key(block.crf, block.last_tick, clock, coll.lrfu_lambda).max()
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    ascending = list_rows(mindset, "layer0", sort="hits", ascending=True, limit=5)["rows"]
    assert [r["hits"] for r in ascending] == sorted(block.hits.tolist())[:5]
    ages = [r["age"] for r in list_rows(mindset, "layer0", sort="age", limit=0)["rows"]]
    assert ages == sorted(ages, reverse=True) and max(ages) == clock


def test_rows_that_promote_a_token(mindset):
    entry = mindset.layer("layer1")
    token = mindset.tokenizer.decode(
        project_rows(mindset.model, entry.layer, entry.layer.index.values.detach()[:1], 1)
        .promote_ids[0]
        .tolist()
    )  # a token some row surely promotes
    result = list_rows(mindset, "layer1", promotes=token, limit=0)
    token_id = mindset.token_id(token)
    everything = project_rows(
        mindset.model, entry.layer, entry.layer.index.values.detach(), 1, token_id=token_id
    )
    assert result["matched"] == int((everything.token_rank <= PROMOTES_WITHIN).sum()) >= 1
    logits = [r["token_logit"] for r in result["rows"]]
    assert logits == sorted(logits, reverse=True)
    assert all(1 <= r["token_rank"] <= PROMOTES_WITHIN for r in result["rows"])


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"layer": "nope"}, "layer"),
        ({"layer": "layer0", "promotes": "for statement"}, "promotes"),
        ({"layer": "layer0", "promotes": ""}, "promotes"),
        ({"layer": "layer0", "sort": "size"}, "sort"),
        ({"layer": "layer0", "limit": -1}, "limit"),
    ],
)
def test_rows_bad_input(mindset, kwargs, parameter):
    with pytest.raises(InvalidInputError) as info:
        list_rows(mindset, **kwargs)
    assert info.value.parameter == parameter


def test_explain_facts_match_the_database(mindset):
    coll = mindset.layer("0").collection
    ids = [int(i) for i in coll.export_rows().ids[:2]]
    result = explain_rows(mindset, "0", ids, top=4)
    assert result["layer"] == "layer0"
    rows = coll.get(ids)
    for row, hits, created in zip(result["rows"], rows.hits, rows.created_tick, strict=True):
        assert row["hits"] == int(hits) and row["age"] == coll.clock - int(created)
        assert len(row["promotes"]) == len(row["suppresses"]) == 4
        assert row["promotes"][0]["logit"] > row["suppresses"][0]["logit"]


def test_explain_unknown_ids_name_them(mindset):
    with pytest.raises(RowNotFoundError, match="99999"):
        explain_rows(mindset, "layer0", [1, 99999])


def test_explain_contexts_are_where_the_row_fired_most(mindset, corpus_dir):
    from memstore_torch.model_memory import recording_reads

    path = sorted(corpus_dir.glob("*.txt"))[0]
    entry = mindset.layer("layer0")
    busiest = list_rows(mindset, "layer0", sort="hits", limit=1)["rows"][0]["id"]
    result = explain_rows(mindset, "layer0", [busiest], data=str(path), contexts=3, max_tokens=300)
    row = result["rows"][0]
    assert result["data_tokens"] == 300
    assert 0 < row["density"] <= 1 and 1 <= len(row["contexts"]) <= 3
    weights = [c["weight"] for c in row["contexts"]]
    assert weights == sorted(weights, reverse=True)
    # re-read the block holding the best context: the row was read there with that weight
    tokens = mindset.tokenizer(path.read_text(), add_special_tokens=False)["input_ids"][:300]
    best = row["contexts"][0]["position"]
    start = best - best % mindset.context
    with recording_reads(mindset.model), torch.no_grad():
        mindset.model(input_ids=torch.tensor([tokens[start : start + mindset.context]]))
        read = entry.layer.last_read
    at = best - start
    hit = read.ids[at] == busiest
    assert bool(hit.any())
    assert float(read.weights[at][hit].sum()) == pytest.approx(weights[0], abs=1e-4)


def test_explain_data_errors(mindset, tmp_path):
    with pytest.raises(InvalidInputError) as info:
        explain_rows(mindset, "layer0", [1], data=str(tmp_path / "missing.txt"))
    assert info.value.parameter == "data"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InvalidInputError, match="no text"):
        explain_rows(mindset, "layer0", [1], data=str(tmp_path / "empty.txt"))


def test_associative_rows_are_projected_per_head_and_listed(associative_student_dir):
    from memstore_gpt2.mindset.session import Mindset
    from memstore_gpt2.mindset.vocab import out_path

    with Mindset.open(associative_student_dir) as mindset:
        entry = mindset.layer("layer0")
        layer = entry.layer
        values = layer.index.values.detach()[:3]
        w = layer.out_proj.weight.detach()
        dv = layer.value_dim
        by_hand = sum(values @ w[:, h * dv : (h + 1) * dv].T for h in range(layer.heads))
        torch.testing.assert_close(out_path(layer, values), by_hand)
        listed = list_rows(mindset, "layer0", sort="hits", limit=3)
        assert len(listed["rows"]) == 3 and listed["total"] == len(entry.collection)
        explained = explain_rows(mindset, "layer0", [listed["rows"][0]["id"]], top=3)
        assert explained["rows"][0]["promotes"] == listed["rows"][0]["promotes"][:3]
