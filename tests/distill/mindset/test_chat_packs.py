"""The chat pane's knowledge packs: each reply uses the packs ticked (serve's ``"pack"``), and the
rows it shows are the trace with those packs acting -- the bare student's rows when none is."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("flask", reason="the mindset extra (flask) is not installed")

from memstore_gpt2.mindset.web import MindsetServer, MindsetService, create_app  # noqa: E402
from tests.distill.mindset.test_browser import _by_id, _open, _wait, browser  # noqa: E402, F401
from tests.distill.packs.pack_helpers import copy_student, learn_tiny_pack  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def pack_student(featural_student_dir, tmp_path_factory):
    out = copy_student(featural_student_dir, tmp_path_factory.mktemp("chat-packs") / "student")
    learn_tiny_pack(out, "alpha", 40)
    return out


@pytest.fixture(scope="module")
def with_pack(pack_student):
    service = MindsetService(str(pack_student), packs=["alpha"])
    yield service
    service.close()


@pytest.fixture(scope="module")
def bare(pack_student):
    service = MindsetService(str(pack_student))
    yield service
    service.close()


def _student_layers(chat: dict) -> dict:
    return {name: layer for name, layer in chat["layers"].items() if not name.startswith("pack.")}


def test_no_pack_ticked_is_the_bare_student_with_its_rows(with_pack, bare):
    alone = with_pack.chat(MESSAGES, 10, packs=[])
    expected = bare.chat(MESSAGES, 10)
    assert alone["packs"] == [] and expected["packs"] == []
    assert alone["token_ids"] == expected["token_ids"] and alone["reply"] == expected["reply"]
    assert alone["layers"] == expected["layers"]  # the student's rows, and no pack's
    assert alone["labels"] == expected["labels"]


def test_a_pack_ticked_acts_and_its_rows_show(with_pack, pack_student):
    from memstore_gpt2.mindset.session import Mindset
    from memstore_gpt2.mindset.trace import trace_tokens

    default, ticked = with_pack.chat(MESSAGES, 10), with_pack.chat(MESSAGES, 10, packs=["alpha"])
    assert default["packs"] == ticked["packs"] == ["alpha"]
    assert default["token_ids"] == ticked["token_ids"]
    assert any(name.startswith("pack.alpha.") for name in ticked["layers"])
    # the rows are the trace of the same tokens by a session that attached the pack alone
    other = Mindset.open(pack_student, None, ["alpha"])
    try:
        trace = trace_tokens(other, other.encode(ticked["prompt"]) + ticked["token_ids"], None, 8)
    finally:
        other.close()
    offset = ticked["offset"]
    assert set(ticked["layers"]) == set(trace.layers)
    for name, layer in ticked["layers"].items():
        assert layer["ids"] == trace.layers[name].ids[offset:], name


def test_a_reply_with_the_pack_differs_from_one_without(with_pack):
    """The pack changes what the student predicts (its gate is open somewhere), so the reply's
    scores differ: compared through serve's decoder, token by token, on the same text."""
    import torch

    from memstore_gpt2.packs.attach import packs_acting

    ms = with_pack.mindset
    ids = torch.tensor([ms.encode("The for statement in Python")])
    with torch.no_grad(), packs_acting(ms.model, [[]]):
        without = ms.model(input_ids=ids).logits
    with torch.no_grad(), packs_acting(ms.model, [["alpha"]]):
        with_it = ms.model(input_ids=ids).logits
    assert not torch.allclose(without, with_it)


@pytest.mark.parametrize(
    ("pack", "words"),
    [("gamma", "pack 'gamma' is not loaded by this Mindset session; loaded: 'alpha'"),
     ([1], "pack must be a pack name or a list of pack names"),
     (["alpha", "alpha"], "names a pack twice")],
)  # fmt: skip
def test_a_bad_pack_choice_is_a_400_naming_it(with_pack, pack, words):
    reply = (
        create_app(with_pack)
        .test_client()
        .post("/api/chat", json={"messages": MESSAGES, "max_tokens": 2, "pack": pack})
    )
    assert reply.status_code == 400
    assert words in reply.get_json()["error"]


def test_the_pane_ticks_every_pack_and_sends_the_choice(browser, with_pack, bare):  # noqa: F811
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MindsetServer(with_pack, 0).start()
    try:
        _open(browser, server)
        boxes = browser.find_elements("css selector", "#chat-packs input[type=checkbox]")
        assert [b.get_attribute("value") for b in boxes] == ["alpha"]
        assert all(b.is_selected() for b in boxes) and _by_id(browser, "chat-packs").is_displayed()
        tokens = _by_id(browser, "chat-max-tokens")
        tokens.clear()
        tokens.send_keys("6")
        boxes[0].click()  # untick: the next reply is the bare student's
        _by_id(browser, "chat-input").send_keys(MESSAGES[0]["content"])
        _by_id(browser, "chat-send").click()
        _wait(browser, lambda d: d.find_elements("css selector", "#chat-log .msg.assistant .who"))
        who = browser.find_element("css selector", "#chat-log .msg.assistant .who").text
        assert "packs: none" in who
        chips = browser.find_elements("css selector", "#chat-log .msg.assistant .token")
        expected = bare.chat(MESSAGES, 6)
        assert len(chips) == len(expected["tokens"])
        chips[0].click()
        _wait(browser, lambda d: d.find_elements("css selector", "#chat-fired table.fired"))
        shown = [t.get_attribute("data-layer")
                 for t in browser.find_elements("css selector", "#chat-fired table.fired")]  # fmt: skip
        assert shown and not any(name.startswith("pack.") for name in shown)
    finally:
        server.stop()
