"""Mindset's chat pane: ``POST /api/chat`` (Flask's test client) and the pane in headless chromium.

A reply must be what ``memstore serve`` answers for the same messages (one template, one decoder),
and the rows shown for a reply token must be the trace of the same tokens (what ``memstore trace``
shows), not a second computation that could pick other rows.
"""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("flask", reason="the mindset extra (flask) is not installed")

from memstore_gpt2.mindset.web import MindsetService, create_app  # noqa: E402
from memstore_gpt2.serve.app import render_chat  # noqa: E402
from tests.distill.mindset.test_browser import (  # noqa: E402, F401 - the browser fixture reused
    _by_id,
    _open,
    _wait,
    browser,
)

QUESTION = "What is a list?"
MESSAGES = [{"role": "user", "content": QUESTION}]
SAMPLED = {"temperature": 0.9, "top_k": 50, "seed": 7}


@pytest.fixture(scope="module")
def service(featural_student_dir):
    """A read-only Mindset over the shared featural student (chat writes nothing)."""
    opened = MindsetService(str(featural_student_dir))
    yield opened
    opened.close()


@pytest.fixture
def client(service):
    return create_app(service).test_client()


def _chat(client, messages=MESSAGES, **body):
    reply = client.post("/api/chat", json={"messages": messages, **body})
    assert reply.status_code == 200, reply.get_json()
    return reply.get_json()


def _same_rows(chat: dict, trace: dict) -> None:
    """Per reply token, the chat's rows are the trace's rows at that token (ids, weights, sizes,
    labels)."""
    offset = chat["offset"]
    assert trace["tokens"][offset:] == chat["tokens"]
    assert set(chat["layers"]) == set(trace["layers"])
    for name, layer in chat["layers"].items():
        traced = trace["layers"][name]
        for key in ("ids", "weights", "contributions", "selected"):
            want = traced[key] if key == "selected" else traced[key][offset:]
            assert layer[key] == want, (name, key)
        shown = {i for row in layer["ids"] for i in row}
        assert {int(i) for i in chat["labels"][name]} == shown  # every row shown is labelled
        assert all(chat["labels"][name][str(i)]["promotes"] for i in shown)
        assert chat["labels"][name] == {str(i): trace["labels"][name][str(i)] for i in shown}


def _trace_of_ids(service, ids: list[int], top: int) -> dict:
    from memstore_gpt2.mindset.trace import trace_tokens

    with service.lock:
        trace = trace_tokens(service.mindset, ids, None, top)
        return {**trace.to_json(), "labels": service._labels(trace.layers, 5)}


def test_a_reply_its_tokens_and_their_rows_are_the_trace_of_that_text(client, service):
    chat = _chat(client, max_tokens=12, top=4)
    prompt = render_chat(MESSAGES)  # serve's template, not a copy
    assert chat["prompt"] == prompt and prompt.endswith("\n\nAssistant:")
    prompt_ids = service.mindset.encode(prompt)
    assert chat["prompt_tokens"] == chat["offset"] == len(prompt_ids)
    assert chat["finish_reason"] in ("stop", "length")
    tokens, ids = chat["tokens"], chat["token_ids"]
    assert tokens and len(tokens) == len(ids) <= 12
    assert tokens == [service.mindset.token_text(t) for t in ids]
    assert "".join(tokens).startswith(chat["reply"]) and chat["reply"]
    assert set(chat["layers"]) == {"layer0", "layer1"}
    assert all(len(row) == 4 for layer in chat["layers"].values() for row in layer["ids"])
    # the conversation and reply traced as text, as `memstore trace` would: the same tokens
    # (this reply encodes back to them), and per reply token the same rows
    text = prompt + "".join(tokens)
    assert service.mindset.encode(text) == prompt_ids + ids
    trace = client.post("/api/trace", json={"prompt": text, "top": 4}).get_json()
    _same_rows(chat, trace)


@pytest.mark.parametrize(("question", "sampling"), [("The for statement", {}), (QUESTION, SAMPLED)])
def test_the_tokens_shown_are_those_generated_and_their_rows_the_trace_of_them(
    client, service, question, sampling
):
    messages = [{"role": "user", "content": question}]
    chat = _chat(client, messages, max_tokens=12, top=6, **sampling)
    ids = chat["token_ids"]
    assert len(set(ids)) > 1  # a reply of more than one kind of token
    _same_rows(chat, _trace_of_ids(service, service.mindset.encode(chat["prompt"]) + ids, 6))
    if not sampling:
        # greedy here writes four one-space tokens, which the tokenizer would merge: the pane
        # shows the tokens the model generated, not those of its text encoded again
        text = chat["prompt"] + "".join(chat["tokens"])
        assert service.mindset.encode(text)[chat["offset"] :] != ids


@pytest.mark.parametrize("sampling", [{}, SAMPLED])
def test_the_reply_is_what_serve_answers_for_the_same_chat(client, featural_student_dir, sampling):
    from memstore_gpt2.serve.app import ServeState
    from memstore_gpt2.serve.app import create_app as serve_app
    from memstore_gpt2.serve.decoding import Decoder
    from memstore_gpt2.serve.scheduler import Scheduler
    from memstore_gpt2.student import load_student

    chat = _chat(client, max_tokens=10, **sampling)
    loaded = load_student(featural_student_dir)
    scheduler = Scheduler(Decoder(loaded.model)).start()
    try:
        state = ServeState("student", loaded.tokenizer, scheduler)
        answer = serve_app(state).test_client().post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 10, "temperature": 0, **sampling,
        }).get_json()  # fmt: skip
    finally:
        scheduler.stop()
        loaded.close()
    assert answer["choices"][0]["message"]["content"] == chat["reply"]
    assert answer["choices"][0]["finish_reason"] == chat["finish_reason"]
    assert answer["usage"]["prompt_tokens"] == chat["prompt_tokens"]


@pytest.mark.parametrize("kind", ["featural", "associative", "grown"])
def test_every_kind_of_student_chats_and_its_rows_are_its_trace(request, kind):
    """Several heads (associative) and a grown block's two layers (product-key extra rows, two
    heads each) trace the same way; the KV-cache reply is the plain greedy continuation."""
    student_dir = request.getfixturevalue(f"{kind}_student_dir")
    opened = MindsetService(str(student_dir))
    try:
        chat = _chat(create_app(opened).test_client(), max_tokens=8, top=5)
        ids = chat["token_ids"]
        assert ids
        trace = _trace_of_ids(opened, opened.mindset.encode(chat["prompt"]) + ids, 5)
        assert set(trace["layers"]) == set(chat["layers"])
        if kind == "grown":
            assert set(chat["layers"]) == {"layer0", "layer0.extra", "layer1", "layer1.extra"}
        _same_rows(chat, trace)
        greedy = opened.mindset.greedy(chat["prompt"], len(ids))  # no KV cache, no scheduler
        assert greedy.startswith(chat["prompt"] + chat["reply"])
    finally:
        opened.close()


def test_a_conversation_is_sent_whole_and_rendered_by_the_template(client, service):
    opening = [{"role": "user", "content": "a"}]  # short: the tiny model reads 32 tokens
    first = _chat(client, opening, max_tokens=1)
    history = [*opening, {"role": "assistant", "content": first["reply"]},
               {"role": "user", "content": "b"}]  # fmt: skip
    second = _chat(client, history, max_tokens=2)
    assert second["prompt"] == render_chat(history)
    assert second["prompt"].startswith(first["prompt"] + " " + first["reply"] + "\n\nUser: b")
    assert second["prompt_tokens"] == len(service.mindset.encode(second["prompt"]))


def test_the_reply_is_cut_to_what_the_context_leaves(client, service):
    context = service.mindset.context
    chat = _chat(client, max_tokens=200)
    assert chat["max_tokens"] == context - chat["prompt_tokens"]
    assert chat["prompt_tokens"] + len(chat["token_ids"]) <= context


LONG = " ".join(["statement"] * 40)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({}, "messages must be a non-empty list"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": LONG}]}, "start a new chat"),
        ({"messages": [{"role": "user"}] * 501}, "at most 500"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens must be in 1..200"),
        ({"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens must be a whole number"),
        ({"messages": MESSAGES, "temperature": -1}, "temperature must be in 0..100"),
        ({"messages": MESSAGES, "temperature": True}, "temperature must be a number"),
        ({"messages": MESSAGES, "temperature": 10**400}, "temperature must be in 0..100"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p must be greater than 0"),
        ({"messages": MESSAGES, "top_p": 1.5}, "top_p must be in 0..1"),
        ({"messages": MESSAGES, "top_k": -1}, "top_k must be in 0..1073741824"),
        ({"messages": MESSAGES, "seed": -1}, "seed must be in 0.."),
        ({"messages": MESSAGES, "top": 1000}, "top must be in 0..256"),
    ],
)
def test_bad_chats_are_400s_naming_the_parameter(client, payload, words):
    reply = client.post("/api/chat", json=payload)
    assert reply.status_code == 400, reply.get_json()
    error = reply.get_json()["error"]
    assert words in error and "\n" not in error


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "not valid Unicode"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
         "temperature must be in"),
        ('{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "top_p must be in"),
        ("[1, 2]", "send a JSON object"),
        ("{not json", "send a JSON object"),
    ],
)  # fmt: skip
def test_raw_json_a_client_could_send_is_a_400(client, raw, words):
    reply = client.post("/api/chat", data=raw, content_type="application/json")
    assert reply.status_code == 400
    assert words in reply.get_json()["error"]


def test_a_model_that_fails_while_decoding_is_a_500_with_one_line(client, service, monkeypatch):
    _chat(client, max_tokens=1)  # the decoder exists once a chat ran

    def broken(ids, packs=None):
        raise RuntimeError("the memory database went away\nmore detail")

    monkeypatch.setattr(service._chat.scheduler.decoder, "prefill", broken)
    reply = client.post("/api/chat", json={"messages": MESSAGES})
    assert reply.status_code == 500
    assert reply.get_json()["error"] == (
        "the model failed: RuntimeError: the memory database went away"
    )
    monkeypatch.undo()
    assert _chat(client, max_tokens=1)["token_ids"]  # the next chat runs again


def test_only_this_page_may_chat(client):
    form = client.post("/api/chat", data={"messages": "hi"})
    assert form.status_code == 400 and "JSON" in form.get_json()["error"]
    for origin in ("http://evil.example", "http://127.0.0.1:3000", "null"):
        reply = client.post("/api/chat", json={"messages": MESSAGES}, headers={"Origin": origin})
        assert reply.status_code == 403 and "refused" in reply.get_json()["error"]
    rebound = client.post(
        "/api/chat", json={"messages": MESSAGES}, headers={"Host": "evil.example"}
    )
    assert rebound.status_code == 403 and "host" in rebound.get_json()["error"]
    same = client.post("/api/chat", json={"messages": MESSAGES, "max_tokens": 2},
                       headers={"Origin": "http://127.0.0.1"})  # fmt: skip
    assert same.status_code == 200  # this page (port 80 under the test client)
    assert client.get("/api/chat").status_code == 405
    assert "error" in client.get("/api/chat").get_json()


def test_after_an_edit_the_chat_runs_the_reloaded_student(student):
    edited = MindsetService(str(student), allow_edits=True)
    try:
        app = create_app(edited).test_client()
        before = _chat(app, max_tokens=8, top=16)
        fired = sorted({i for row in before["layers"]["layer0"]["ids"] for i in row})
        done = app.post("/api/edit", json={"layer": "layer0", "action": "delete",
                                           "ids": fired, "confirm": True})  # fmt: skip
        assert done.status_code == 200, done.get_json()
        after = _chat(app, max_tokens=8, top=16)
        assert edited._chat.model is edited.mindset.model  # not the model before the reload
        assert not set(fired) & {i for row in after["layers"]["layer0"]["ids"] for i in row}
    finally:
        edited.close()
    fresh = MindsetService(str(student))
    try:
        assert _chat(create_app(fresh).test_client(), max_tokens=8, top=16) == after
    finally:
        fresh.close()


# ---------------------------------------------------------------- the pane in a real browser
def test_chat_in_the_browser_and_open_a_reply_tokens_rows(browser, featural_student_dir):  # noqa: F811
    from memstore_gpt2.mindset.web import MindsetServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MindsetServer(MindsetService(str(featural_student_dir)), 0).start()
    try:
        _open(browser, server)
        max_tokens = _by_id(browser, "chat-max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("8")
        _by_id(browser, "chat-input").send_keys(QUESTION)
        _by_id(browser, "chat-send").click()
        _wait(browser, lambda d: d.find_elements("css selector", "#chat-log .msg.assistant"))
        expected = server.service.chat(MESSAGES, 8)
        user = browser.find_element("css selector", "#chat-log .msg.user .text")
        assert user.text == QUESTION
        assert _by_id(browser, "chat-input").get_attribute("value") == ""
        chips = browser.find_elements("css selector", "#chat-log .msg.assistant .token")
        assert [c.get_attribute("textContent") for c in chips] == [
            t.replace("\n", "↵").replace("\t", "→") or "∅" for t in expected["tokens"]
        ]
        chips[2].click()
        _wait(browser, lambda d: "reply token 2" in _by_id(d, "chat-picked").text)
        tables = browser.find_elements("css selector", "#chat-fired table.fired")
        assert [t.get_attribute("data-layer") for t in tables] == ["layer0", "layer1"]
        for table in tables:
            name = table.get_attribute("data-layer")
            shown = [int(r.get_attribute("data-id"))
                     for r in table.find_elements("css selector", "tbody tr")]  # fmt: skip
            assert shown == expected["layers"][name]["ids"][2]
            weights = [float(c.text) for c in table.find_elements("css selector", "tbody td.num")]
            assert weights[::2] == pytest.approx(expected["layers"][name]["weights"][2], abs=6e-4)
            assert not table.find_elements("css selector", ".off-box")  # chat switches nothing
        assert "picked" in chips[2].get_attribute("class")
        # a row id opens the row, as in the trace panel
        tables[0].find_element("css selector", "a.rid").click()
        _wait(browser, lambda d: "LRFU score" in _by_id(d, "explain").text)
        # a new chat starts empty
        _by_id(browser, "chat-reset").click()
        assert not browser.find_elements("css selector", "#chat-log .msg")
        assert not _by_id(browser, "error").is_displayed()
        # a refused message says why and goes back to the box, leaving the conversation as it was
        _by_id(browser, "chat-input").send_keys(LONG)
        _by_id(browser, "chat-send").click()
        _wait(browser, lambda d: _by_id(d, "error").is_displayed())
        assert "start a new chat" in _by_id(browser, "error").text
        assert _by_id(browser, "chat-input").get_attribute("value") == LONG
        assert not browser.find_elements("css selector", "#chat-log .msg")
        scripts = [e for e in browser.get_log("browser") if e.get("source") == "javascript"]
        assert not scripts, json.dumps(scripts)[:500]  # no script error on the page
    finally:
        server.stop()
