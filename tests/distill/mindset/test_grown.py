"""Mindset on a grown student (``distill --memory-rows``): each block's featural rows (``layer0``)
and product-key extra rows (``layer0.extra``) are traced, explained, listed and edited; the extra
rows are read by id, never as a whole collection."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from memstore import Store
from memstore.collection import Collection
from memstore.errors import InvalidInputError
from memstore_gpt2.cli import main
from memstore_gpt2.mindset import rows as rows_module
from memstore_gpt2.mindset.edit import run_edit
from memstore_gpt2.mindset.explain import explain_rows
from memstore_gpt2.mindset.rows import list_rows
from memstore_gpt2.mindset.session import Mindset, check_student
from memstore_gpt2.mindset.trace import trace_prompt
from tests.distill.mindset.layer_io import layer_io

PROMPT = "The for statement is used to iterate"
NAMES = ["layer0", "layer0.extra", "layer1", "layer1.extra"]


@pytest.fixture
def grown(grown_student_dir):
    with Mindset.open(grown_student_dir) as opened:
        yield opened


@pytest.fixture
def no_whole_extra_reads(monkeypatch):
    """Reading a product-key collection whole fails the test, except where a layer is built (the
    model keeps its rows resident: that is loading the student, not Mindset); the sizes of the
    ``Collection.get`` calls on them are kept."""
    sizes: list[int] = []
    export, get = Collection.export_rows, Collection.get

    def export_rows(self):
        loading = any(frame.function == "_bind" for frame in inspect.stack(0))
        assert loading or not self.name.endswith(".extra"), f"{self.name} was read whole"
        return export(self)

    def counted_get(self, ids):
        if self.name.endswith(".extra"):
            sizes.append(len(np.asarray(ids).reshape(-1)))
        return get(self, ids)

    monkeypatch.setattr(Collection, "export_rows", export_rows)
    monkeypatch.setattr(Collection, "get", counted_get)
    return sizes


def _extra_rows(student, name="layer0.extra"):
    with Store(check_student(student)) as store:
        return store.collection(name).get(np.arange(1, 65))  # ids 1..64, never deleted


# -- layers ----------------------------------------------------------------------------------------
def test_layers_are_named_by_block_and_part(grown):
    assert list(grown.layers) == NAMES
    described = [grown.layers[n].describe() for n in NAMES]
    assert [(d["block"], d["part"], d["title"], d["kind"]) for d in described] == [
        (0, "base", "block 0", "FeaturalMemory"),
        (0, "extra", "block 0 extra", "ProductKeyMemory"),
        (1, "base", "block 1", "FeaturalMemory"),
        (1, "extra", "block 1 extra", "ProductKeyMemory"),
    ]
    assert described[1]["rows"] == 64 and described[1]["k"] == 4 and described[1]["heads"] == 2
    assert grown.layer("0").name == "layer0"  # a block index alone: the block's featural rows
    assert grown.layer("block 1 extra").name == "layer1.extra"
    assert grown.layer("transformer.h.1.mlp.extras.0").name == "layer1.extra"
    assert [e.name for e in grown.select("1")] == ["layer1", "layer1.extra"]  # the whole block
    assert [e.name for e in grown.select("layer0.extra,0")] == ["layer0.extra", "layer0"]


def test_a_database_without_the_extra_rows_is_one_clear_error(grown_student):
    from memstore_gpt2.errors import StudentFormatError

    with Store(check_student(grown_student)) as store:
        store.drop_collection("layer1.extra")
    with pytest.raises(StudentFormatError, match=r"no collection 'layer1.extra' \(the extra rows"):
        check_student(grown_student)


# -- trace -----------------------------------------------------------------------------------------


def test_trace_lists_the_extra_rows_the_forward_read(grown):
    trace = trace_prompt(grown, PROMPT, top=0)
    assert list(trace.layers) == NAMES  # per block: featural rows, then extra rows
    caught = layer_io(grown, PROMPT)
    for name in ("layer0.extra", "layer1.extra"):
        layer = grown.layer(name).layer
        read = trace.layers[name]
        assert read.selected == 2 * 4  # heads x k
        values = layer.memory_values.detach()
        x_in, out = caught[name]
        _, rows = layer.search(x_in)  # an independent search: the same rows
        for t, ids in enumerate(read.ids):
            assert set(ids) == set((rows[t] + 1).reshape(-1).tolist())
            # heads share the values, so the summed weights rebuild the output exactly
            rebuilt = sum(w * values[i - 1] for i, w in zip(ids, read.weights[t], strict=True))
            torch.testing.assert_close(rebuilt, out[t], atol=1e-4, rtol=0)
            sizes = read.contributions[t]
            assert sizes == sorted(sizes, reverse=True)
            assert sizes[0] == pytest.approx(
                abs(read.weights[t][0]) * float(values[ids[0] - 1].norm()), rel=1e-3, abs=1e-5
            )
    assert trace.layers["layer0"].selected == 16  # the featural rows as before


def test_cli_trace_names_the_extra_rows(grown_student_dir):
    args = ["trace", str(grown_student_dir), "--prompt", "The for", "--layers", "1", "--top", "2"]
    text = CliRunner().invoke(main, args, catch_exceptions=False).output
    assert "layer1: 16 of 128 rows, layer1.extra: 8 of 64 rows" in text
    lines = text.splitlines()
    token = next(i for i, line in enumerate(lines) if "'The'" in line)
    assert "layer1: " in lines[token] and lines[token + 1].lstrip().startswith("layer1.extra: ")
    data = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False).output
    assert list(json.loads(data.strip().splitlines()[-1])["layers"]) == ["layer1", "layer1.extra"]


# -- explain and rows ------------------------------------------------------------------------------
def test_explain_a_product_key_row(grown, no_whole_extra_reads):
    entry = grown.layer("layer0.extra")
    busiest = int(entry.layer.index.ids[entry.layer.index.hits.argmax()])
    result = explain_rows(grown, "layer0.extra", [busiest], top=5)
    row = result["rows"][0]
    n = entry.layer.config.n_keys
    assert row["address"] == [(busiest - 1) // n, (busiest - 1) % n]
    assert no_whole_extra_reads == [1]  # one row read, by id
    stored = entry.collection.get([busiest])
    assert row["hits"] == int(stored.hits[0]) > 0
    # the documented projection: out path (no out_proj here), ln_f without its shift, unembedding
    value = torch.from_numpy(stored.values[0])
    ln = grown.model.transformer.ln_f
    centred = value - value.mean()
    logits = grown.model.lm_head.weight.detach() @ (
        centred / torch.sqrt((centred**2).mean() + ln.eps) * ln.weight.detach()
    )
    assert [t["id"] for t in row["promotes"]] == logits.topk(5).indices.tolist()
    args = ["explain", str(grown.student_dir), "layer0.extra", str(busiest)]
    text = CliRunner().invoke(main, args, catch_exceptions=False).output
    assert text.startswith(f"layer0.extra row {busiest} (product key {row['address']}): LRFU")


def test_explain_contexts_of_an_extra_row(grown, corpus_dir):
    path = sorted(corpus_dir.glob("*.txt"))[0]
    entry = grown.layer("layer1.extra")
    busiest = int(entry.layer.index.ids[entry.layer.index.hits.argmax()])
    row = explain_rows(grown, "layer1.extra", [busiest], data=str(path), max_tokens=200)["rows"][0]
    assert 0 < row["density"] <= 1 and row["contexts"]
    weights = [c["weight"] for c in row["contexts"]]
    assert weights == sorted(weights, reverse=True) and 0 < weights[0] <= 2  # 2 heads, softmax


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sort": "hits", "limit": 7},
        {"sort": "score", "limit": 5, "ascending": True},
        {"sort": "age", "limit": 0},
        {"promotes": "TOKEN", "limit": 4},
    ],
)
def test_extra_rows_are_listed_page_by_page(grown, monkeypatch, no_whole_extra_reads, kwargs):
    entry = grown.layer("layer0.extra")
    if kwargs.get("promotes") == "TOKEN":  # a (whole) token the busiest row promotes
        busiest = list_rows(grown, "layer0.extra", sort="hits", limit=1)["rows"][0]
        token = next(t["token"] for t in busiest["promotes"] if _one_token(grown, t["token"]))
        kwargs = {**kwargs, "promotes": token}
    whole = list_rows(grown, "layer0.extra", **kwargs)  # one page of 8192 holds all 64 rows
    assert no_whole_extra_reads == [64] * (2 if "promotes" in kwargs else 1)
    no_whole_extra_reads.clear()
    monkeypatch.setattr(rows_module, "PAGE_ROWS", 10)
    paged = list_rows(grown, "layer0.extra", **kwargs)
    assert no_whole_extra_reads == [10] * 6 + [4]
    # the same rows in the same order (ties still broken by id); promoted-token logits come
    # from vocabulary projections of different batch sizes, so they may differ in the last bit
    assert _without_logits(paged) == _without_logits(whole)
    assert _logits(paged) == pytest.approx(_logits(whole), abs=2e-4)
    assert whole["total"] == 64 == len(entry.collection) and whole["rows"]
    assert all("address" in r for r in whole["rows"])


def _one_token(mindset, text: str) -> bool:
    try:
        mindset.token_id(text)
    except InvalidInputError:
        return False
    return True


def test_paged_listing_equals_sorting_every_row(grown):
    coll = grown.layer("layer1.extra").collection
    block = coll.get(np.arange(1, 65))
    expected = block.ids[np.argsort(-block.hits, kind="stable")][:9].tolist()
    listed = list_rows(grown, "layer1.extra", sort="hits", limit=9)
    assert [r["id"] for r in listed["rows"]] == expected
    assert listed["matched"] == 64


# -- edits -----------------------------------------------------------------------------------------
def test_product_key_rows_cannot_be_deleted(grown_student):
    before = _extra_rows(grown_student)
    with pytest.raises(InvalidInputError) as info:
        run_edit(str(grown_student), "layer0.extra", "delete", "3,5")
    assert info.value.parameter == "ids"
    message = str(info.value)
    assert "product-key rows" in message and "cannot be deleted" in message
    assert "[r // 8, r % 8]" in message and "zero them instead" in message
    after = _extra_rows(grown_student)
    assert np.array_equal(after.ids, before.ids) and np.array_equal(after.values, before.values)
    result = CliRunner().invoke(main, ["edit", str(grown_student), "layer0.extra", "--delete", "3"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("Error: --delete 3: layer0.extra holds product-key rows")


def test_zero_and_scale_extra_rows(grown_student, no_whole_extra_reads):
    before = _extra_rows(grown_student)
    busy = before.ids[np.argsort(-before.hits, kind="stable")][:3].tolist()
    dry = run_edit(str(grown_student), "layer0.extra", "zero", busy[:2], prompt="The for",
                   dry_run=True)  # fmt: skip
    assert np.array_equal(_extra_rows(grown_student).values, before.values)  # nothing written
    real = run_edit(str(grown_student), "layer0.extra", "zero", busy[:2], prompt="The for")
    assert real["after"] == dry["after"] and real["rows_after"] == real["rows_before"] == 64
    run_edit(str(grown_student), "layer0.extra", "scale", str(busy[2]), factor=-2.0)
    after = _extra_rows(grown_student)
    assert np.array_equal(after.keys, before.keys) and np.array_equal(after.hits, before.hits)
    at = {int(i): n for n, i in enumerate(before.ids)}
    assert not after.values[[at[busy[0]], at[busy[1]]]].any()
    np.testing.assert_array_equal(after.values[at[busy[2]]], before.values[at[busy[2]]] * -2)
    untouched = np.ones(64, bool)
    untouched[[at[i] for i in busy]] = False
    assert np.array_equal(after.values[untouched], before.values[untouched])
    with Mindset.open(grown_student) as again:  # the next load sees the edit
        values = again.layer("layer0.extra").layer.memory_values.detach()
        assert not values[busy[0] - 1].any()
        assert again.greedy("The for") == real["after"]


def test_web_preview_of_an_extra_row_is_undone(grown_student, no_whole_extra_reads):
    pytest.importorskip("flask", reason="the mindset extra (flask) is not installed")
    from memstore_gpt2.mindset.web import MindsetService

    service = MindsetService(str(grown_student), allow_edits=True)
    try:
        info = service.info()
        assert [(entry["name"], entry["title"]) for entry in info["layers"]][:2] == [
            ("layer0", "block 0"),
            ("layer0.extra", "block 0 extra"),
        ]
        trace = service.trace("The for statement", 4)
        shown = {i for row in trace["layers"]["layer0.extra"]["ids"] for i in row}
        labels = trace["labels"]["layer0.extra"]
        assert {int(i) for i in labels} == shown and all("address" in r for r in labels.values())
        values = service.mindset.layer("layer0.extra").layer.memory_values.detach().clone()
        plan = service.edit("layer0.extra", "scale", sorted(shown), 0.0, "The for statement")
        assert not plan["confirmed"] and plan["rows_after"] == 64
        assert torch.equal(service.mindset.layer("layer0.extra").layer.memory_values, values)
        with pytest.raises(InvalidInputError, match="cannot be deleted"):
            service.edit("layer0.extra", "delete", "1")
    finally:
        service.close()


def _without_logits(listing: dict) -> dict:
    rows = [
        {**r, "promotes": [{k: v for k, v in t.items() if k != "logit"} for t in r["promotes"]]}
        if "promotes" in r
        else r
        for r in listing["rows"]
    ]
    return {**listing, "rows": rows}


def _logits(listing: dict) -> list[float]:
    return [t["logit"] for r in listing["rows"] for t in r.get("promotes", [])]
