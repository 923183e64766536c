"""The Mindset UI's JSON API (Flask's test client): read-only by default, confirmed edits only."""

from __future__ import annotations

import json
import math

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


# ---------------------------------------------------------------- adversarial requests (issue 18)
# Each of these answered 500 (or, for the range, a 404 after expanding and looking up a million
# ids) before the API checked its parameters itself.
HUGE = 2**70  # beyond SQLite's 64-bit integers


@pytest.fixture(scope="module")
def read_only_service(featural_student_dir):
    """One read-only service over the shared student (nothing these requests do can write)."""
    service = MindsetService(str(featural_student_dir))
    yield service
    service.close()


@pytest.fixture
def read_only_client(read_only_service):
    return create_app(read_only_service).test_client()


def _post_raw(client, path: str, payload) -> object:
    """POST ``payload`` as JSON text exactly as Python writes it: ``Infinity`` and lone
    surrogates (``"\\ud800"``) included, which a browser's JSON.stringify never sends but any
    other client can."""
    return client.post(path, data=json.dumps(payload), content_type="application/json")


@pytest.mark.parametrize(
    ("path", "payload", "words"),
    [
        ("/api/trace", {"prompt": "x", "top": math.inf}, "top must be a whole number, got inf"),
        ("/api/trace", {"prompt": "x", "top": -math.inf}, "top must be a whole number"),
        ("/api/trace", {"prompt": "x", "top": True}, "top must be a whole number"),
        ("/api/trace", {"prompt": "x", "top": 2.5}, "top must be a whole number"),
        ("/api/generate", {"prompt": "x", "max_new_tokens": math.inf}, "max_new_tokens must be"),
        ("/api/generate", {"prompt": "x", "off": [1, 2]}, "off must be a JSON object"),
        ("/api/generate", {"prompt": "x", "off": "layer0"}, "off must be a JSON object"),
        ("/api/generate", {"prompt": "x", "off": {"layer0": [HUGE]}}, "off['layer0']"),
        ("/api/generate", {"prompt": "x", "off": {"layer0": f"{HUGE}"}}, "out of range"),
        ("/api/generate", {"prompt": "x", "off": {"layer9": [1]}}, "off 'layer9' is not"),
        ("/api/generate", {"prompt": "x", "off": {"layer0": "0-1000000"}}, "holds 128"),
        ("/api/trace", {"prompt": "a \ud800 b"}, "prompt is not valid Unicode"),
        ("/api/generate", {"prompt": "x\udc00"}, "prompt is not valid Unicode"),
        ("/api/trace", {"prompt": ["The"]}, "prompt must be text"),
    ],
)
def test_bad_json_values_are_400s_naming_the_parameter(read_only_client, path, payload, words):
    reply = _post_raw(read_only_client, path, payload)
    assert reply.status_code == 400, reply.get_data(as_text=True)[:200]
    error = reply.get_json()["error"]
    assert words in error and "\n" not in error


@pytest.mark.parametrize(
    ("query", "words"),
    [
        (f"ids={HUGE}", "ids '1180591620717411303424' is out of range"),
        (f"ids=-{HUGE}", "out of range"),
        (f"ids=1,{HUGE}", "out of range"),
        # refused by counting, before a million ids are expanded and looked up (it took 15 s)
        ("ids=0-1000000", "ids names 1,000,001 rows but layer0 holds 128"),
        ("ids=1-100,50-150", "names 150 rows but layer0 holds 128"),  # overlaps counted once
        ("ids=9-5", "a range goes from low to high"),
    ],
)
def test_bad_row_ids_are_400s_before_any_lookup(read_only_client, query, words):
    reply = read_only_client.get(f"/api/explain?layer=layer0&{query}")
    assert reply.status_code == 400
    assert words in reply.get_json()["error"]


def test_overlapping_ranges_within_the_table_still_explain(read_only_client):
    reply = read_only_client.get("/api/explain?layer=layer0&ids=1-100,1-100,2")
    assert reply.status_code == 200
    assert [row["id"] for row in reply.get_json()["rows"]] == list(range(1, 101))


def test_deep_json_and_unknown_paths_are_json_4xx(read_only_client):
    deep = read_only_client.post("/api/trace", data="[" * 100_000, content_type="application/json")
    assert deep.status_code == 400 and "JSON object" in deep.get_json()["error"]
    missing = read_only_client.get("/api/nothing")
    assert missing.status_code == 404 and "/api/nothing" in missing.get_json()["error"]
    wrong = read_only_client.get("/api/trace")
    assert wrong.status_code == 405 and "GET /api/trace" in wrong.get_json()["error"]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"ids": [HUGE]}, "ids '1180591620717411303424' is out of range"),
        ({"ids": "1", "max_new_tokens": -math.inf}, "max_new_tokens must be a whole number"),
        ({"ids": "1", "prompt": "\ud800"}, "prompt is not valid Unicode"),
        ({"ids": "0-1000000"}, "ids names 1,000,001 rows but layer0 holds 128"),
        ({"ids": "1", "confirm": "no"}, "confirm must be true or false"),  # was read as true
    ],
)
def test_bad_edits_are_400s_and_write_nothing(make_client, student, payload, words):
    client = make_client(True)
    before = _rows(student)
    reply = _post_raw(client, "/api/edit", {"layer": "layer0", "action": "zero", **payload})
    assert reply.status_code == 400 and words in reply.get_json()["error"]
    after = _rows(student)
    assert np.array_equal(after.ids, before.ids) and np.array_equal(after.values, before.values)


def test_host_must_name_the_port_and_origin_must_be_the_page(read_only_service):
    client = create_app(read_only_service).test_client()
    on_8765 = {"base_url": "http://127.0.0.1:8765"}  # the server listens on 8765 (SERVER_PORT)
    assert client.get("/api/info", **on_8765).status_code == 200
    assert client.get("/api/info", headers={"Host": "localhost:8765"}, **on_8765).status_code == 200
    for host in ("127.0.0.1:8766", "localhost:3000", "127.0.0.1", "evil.example:8765"):
        reply = client.get("/api/info", headers={"Host": host}, **on_8765)
        assert reply.status_code == 403 and "refused" in reply.get_json()["error"], host
    trace = {"prompt": PROMPT, "top": 0}
    page = {"Origin": "http://127.0.0.1:8765"}
    assert client.post("/api/trace", json=trace, headers=page, **on_8765).status_code == 200
    for origin in ("http://127.0.0.1:3000", "http://evil.example:8765", "null",
                   "https://127.0.0.1:8765", "http://127.0.0.1:x"):  # fmt: skip
        reply = client.post("/api/trace", json=trace, headers={"Origin": origin}, **on_8765)
        assert reply.status_code == 403 and "origin" in reply.get_json()["error"], origin


def test_the_real_server_checks_its_own_port(student):
    """Behind port 0 the server learns its port when it binds; a Host naming another is 403."""
    import http.client

    from memstore_gpt2.mindset.web import MindsetServer

    server = MindsetServer(MindsetService(str(student)), 0).start()
    try:
        replies = []
        for port in (server.port, server.port + 1):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            connection.request("GET", "/api/info", headers={"Host": f"127.0.0.1:{port}"})
            replies.append(connection.getresponse().status)
            connection.close()
    finally:
        server.stop()
    assert replies == [200, 403]
