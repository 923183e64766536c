"""The Mindset UI's JSON API (Flask's test client): read-only by default, confirmed edits only."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flask", reason="the mindset extra (flask) is not installed")

from memstore import Store  # noqa: E402
from memstore_gpt2.db_lock import hold_database  # noqa: E402
from memstore_gpt2.mindset.session import check_student  # noqa: E402
from memstore_gpt2.mindset.web import MindsetService, create_app  # noqa: E402

PROMPT = "The for statement"


@pytest.fixture
def make_client(student):
    services = []

    def make(allow_edits: bool):
        service = MindsetService(str(student), allow_edits=allow_edits)
        services.append(service)
        return create_app(service).test_client()

    yield make
    for service in services:
        service.close()


def _rows(student):
    with Store(check_student(student)) as store:
        return store.collection("layer0").export_rows()


def test_page_info_and_trace(make_client):
    client = make_client(False)
    page = client.get("/")
    assert page.status_code == 200 and b"mindset.js" in page.data
    assert client.get("/static/mindset.js").status_code == 200
    info = client.get("/api/info").get_json()
    assert not info["allow_edits"] and [entry["name"] for entry in info["layers"]] == [
        "layer0",
        "layer1",
    ]
    trace = client.post("/api/trace", json={"prompt": PROMPT, "top": 4}).get_json()
    assert "".join(trace["tokens"]) == PROMPT
    for name, layer in trace["layers"].items():
        shown = {i for row in layer["ids"] for i in row}
        assert {int(i) for i in trace["labels"][name]} == shown  # every row shown is labelled
        assert all(trace["labels"][name][str(i)]["promotes"] for i in shown)


def test_switched_off_rows_change_only_that_generation(make_client):
    client = make_client(False)
    trace = client.post("/api/trace", json={"prompt": PROMPT, "top": 16}).get_json()
    off = {
        name: sorted({i for row in layer["ids"] for i in row})
        for name, layer in trace["layers"].items()
    }
    result = client.post("/api/generate", json={"prompt": PROMPT, "off": off}).get_json()
    assert result["normal"].startswith(PROMPT) and result["ablated"].startswith(PROMPT)
    assert result["normal"] != result["ablated"]  # every row the prompt read switched off
    again = client.post("/api/generate", json={"prompt": PROMPT}).get_json()
    assert again["normal"] == result["normal"] == again["ablated"]  # values restored


def test_read_only_refuses_edits(make_client, student):
    client = make_client(False)
    before = _rows(student)
    reply = client.post("/api/edit", json={"layer": "layer0", "action": "delete", "ids": "1",
                                           "confirm": True})  # fmt: skip
    assert reply.status_code == 403 and "--allow-edits" in reply.get_json()["error"]
    assert np.array_equal(_rows(student).ids, before.ids)


def test_preview_then_confirm(make_client, student):
    client = make_client(True)
    victim = int(_rows(student).ids[3])
    trace_before = client.post("/api/trace", json={"prompt": PROMPT, "top": 0}).get_json()
    request = {"layer": "layer0", "action": "delete", "ids": str(victim), "prompt": PROMPT}
    plan = client.post("/api/edit", json=request).get_json()
    assert not plan["confirmed"] and plan["rows_after"] == plan["rows_before"] - 1
    assert victim in _rows(student).ids  # a preview writes nothing ...
    trace_again = client.post("/api/trace", json={"prompt": PROMPT, "top": 0}).get_json()
    assert trace_again["layers"] == trace_before["layers"]  # ... and leaves the model as it was
    done = client.post("/api/edit", json={**request, "confirm": True}).get_json()
    assert done["confirmed"] and done["after"] == plan["after"]
    assert victim not in _rows(student).ids
    trace_after = client.post("/api/trace", json={"prompt": PROMPT, "top": 0}).get_json()
    assert all(victim not in row for row in trace_after["layers"]["layer0"]["ids"])


def test_edit_while_training_holds_the_database(make_client, student):
    client = make_client(True)
    with hold_database(check_student(student), student, "training"):
        reply = client.post("/api/edit", json={"layer": "layer0", "action": "zero", "ids": "1",
                                               "confirm": True})  # fmt: skip
    assert reply.status_code == 409 and "training run" in reply.get_json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "words"),
    [
        ("post", "/api/trace", {"prompt": ""}, 400, "prompt is empty"),
        ("post", "/api/trace", {"prompt": "x", "top": "many"}, 400, "top must be a whole number"),
        ("get", "/api/rows?layer=layer9", None, 400, "'layer9' is not a memory layer"),
        ("get", "/api/explain?layer=layer0&ids=99999", None, 404, "99999"),
        ("post", "/api/generate", {"prompt": "x", "off": {"layer0": [99999]}}, 404, "99999"),
        ("post", "/api/generate", {"prompt": "x", "max_new_tokens": 10**6}, 400, "max_new_tokens"),
    ],
)
def test_bad_requests_are_one_line_errors(make_client, method, path, payload, status, words):
    client = make_client(True)
    reply = (
        getattr(client, method)(path, json=payload) if payload else getattr(client, method)(path)
    )
    assert reply.status_code == status
    error = reply.get_json()["error"]
    assert words in error and "\n" not in error


def test_foreign_hosts_and_non_json_posts_are_refused(make_client):
    client = make_client(True)
    assert client.get("/api/info", headers={"Host": "evil.example:8765"}).status_code == 403
    form = client.post("/api/edit", data={"layer": "layer0", "action": "delete", "ids": "1"})
    assert form.status_code == 400 and "JSON" in form.get_json()["error"]
