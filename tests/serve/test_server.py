"""``memstore serve`` as a real process on a free port, driven by the official ``openai`` client
(and raw HTTP where the client hides the wire format): completions and chat, streamed and not,
logprobs/echo, the errors, the metrics, and greedy output identical to ``memstore generate``."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

openai = pytest.importorskip("openai")

from tests.distill.cli_results import last_json, run_cli  # noqa: E402
from tests.serve.server_process import API_KEY, serve_process  # noqa: E402

BUDGET = "10%"  # the extra rows page through a small cache: /metrics has paging to report
PROMPT = "The for statement"


@pytest.fixture(scope="module")
def server(student_dir, tmp_path_factory):
    """The server process and its base URL."""
    log_dir = tmp_path_factory.mktemp("server")
    with serve_process(student_dir, log_dir, "--memory-budget", BUDGET, "--max-batch", 4) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=120)


@dataclass
class Reply:
    """A raw HTTP answer (stdlib: the test needs no HTTP client of its own)."""

    status_code: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


def _raw(server, path, body=None, *, headers=None, content=None) -> Reply:
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    url = server.removesuffix("/v1") + path
    data = None
    if body is not None or content is not None:
        if content is None:
            content = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        data = content.encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read().decode())  # fmt: skip
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                     exc.read().decode())  # fmt: skip


def _generate(student_dir, *args) -> str:
    """What ``memstore generate`` continues ``PROMPT`` with (its text, prompt removed)."""
    result = run_cli(["generate", student_dir, "--prompt", PROMPT, "--device", "cpu",
                      "--memory-budget", BUDGET, "--json", *args])  # fmt: skip
    text = last_json(result)["text"]
    assert text.startswith(PROMPT)
    return text[len(PROMPT) :]


def test_health_and_models(server, client):
    health = _raw(server, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["student"]


def test_greedy_completion_equals_memstore_generate(student_dir, client):
    expected = _generate(student_dir, "--temperature", 0, "--max-new-tokens", 20)
    reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=20,
                                      temperature=0)  # fmt: skip
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 20 and reply.usage.prompt_tokens == 5


def test_seeded_sampling_equals_memstore_generate(student_dir, client):
    """``memstore generate``'s defaults (temperature 0.8, top-k 40) with seed 3."""
    expected = _generate(student_dir, "--seed", 3, "--max-new-tokens", 12)
    texts = [client.completions.create(model="student", prompt=PROMPT, max_tokens=12,
                                       temperature=0.8, seed=3,
                                       extra_body={"top_k": 40}).choices[0].text
             for _ in range(2)]  # fmt: skip
    assert texts == [expected, expected]


def test_concurrent_greedy_requests_equal_one_alone(client):
    """Eight clients at once (batches of up to four, joining and leaving) get what one gets."""
    prompts = [PROMPT, "A list is", "x = 1", "Functions"] * 2
    alone = [client.completions.create(model="student", prompt=p, max_tokens=6 + i % 3,
                                       temperature=0).choices[0].text
             for i, p in enumerate(prompts)]  # fmt: skip
    together: dict[int, str] = {}

    def ask(i: int) -> None:
        together[i] = client.completions.create(model="student", prompt=prompts[i],
                                                max_tokens=6 + i % 3,
                                                temperature=0).choices[0].text  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(len(prompts))] == alone


def test_streamed_completion_equals_the_whole_one(server, client):
    whole = client.completions.create(model="student", prompt=PROMPT, max_tokens=10,
                                      temperature=0).choices[0].text  # fmt: skip
    chunks = list(client.completions.create(model="student", prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    raw = _raw(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"


def test_stop_sequence_cuts_the_text(client):
    """Seeded draws: the tokens before the stop string are those of the run without it."""
    sampling = dict(model="student", prompt="A list is", max_tokens=20, temperature=1.0, seed=1)
    whole = client.completions.create(**sampling).choices[0].text
    at = next(i for i in range(1, len(whole) - 1) if not whole[i : i + 2].isspace())
    stop = whole[at : at + 2]
    for stream in (False, True):
        reply = client.completions.create(**sampling, stop=[stop], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (whole[: whole.index(stop)], "stop")


def test_echo_logprobs_score_the_prompt(student, client):
    """``echo`` with ``max_tokens`` 0, as evaluation harnesses ask: the prompt's log-probabilities
    are the model's own."""
    import torch

    reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=0, echo=True,
                                      logprobs=2, temperature=0)  # fmt: skip
    choice = reply.choices[0]
    ids = student.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_logprobs_of_generated_tokens_and_prompt_lists(client):
    reply = client.completions.create(model="student", prompt=[PROMPT, "A list is"],
                                      max_tokens=4, logprobs=1, temperature=0)  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == 4 and "".join(lp.tokens) == choice.text
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert top == {token: pytest.approx(value)}  # greedy: the likeliest token
    assert reply.usage.completion_tokens == 8


def test_chat_completion_and_its_stream(client):
    messages = [{"role": "user", "content": "Hi"}]  # the tiny model reads 32 tokens
    reply = client.chat.completions.create(model="student", messages=messages, max_tokens=8,
                                           temperature=0)  # fmt: skip
    message = reply.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert reply.object == "chat.completion" and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="student", messages=messages,
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == message.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == reply.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_errors_are_openai_json_with_4xx(server, client):
    bad_json = _raw(server, "/v1/completions", content="{bad",
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert _error(bad_json, 400)["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="student", prompt="word " * 40, max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_long_chat:
        client.chat.completions.create(model="student", max_tokens=2,
                                       messages=[{"role": "user", "content": "word " * 40}])  # fmt: skip
    assert too_long_chat.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="student", prompt=PROMPT, max_tokens=30)
    big = _raw(server, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert _error(big, 413)["code"] == "request_too_large"
    wrong_key = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    _error(_raw(server, "/v1/models", headers={"Authorization": ""}), 401)
    for field, value in (("temperature", "hot"), ("max_tokens", -1), ("top_p", 2),
                         ("logprobs", 99), ("stop", 3), ("prompt", None), ("n", 2),
                         ("pack", ["python"])):  # fmt: skip
        body = {"prompt": PROMPT, "max_tokens": 2, field: value}
        assert _error(_raw(server, "/v1/completions", body), 400)["param"] == field, field
    _error(_raw(server, "/v1/chat/completions", {"messages": [{"role": "robot"}]}), 400)
    _error(_raw(server, "/v1/completions", content="prompt=x",
                headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)  # fmt: skip
    _error(_raw(server, "/v1/nothing"), 404)
    refused = _raw(server, "/health", headers={"Host": "evil.example"})
    assert _error(refused, 403)["code"] == "host_refused"
    assert client.completions.create(model="student", prompt=PROMPT, max_tokens=1).choices


def test_metrics_report_requests_tokens_and_paging(server, client):
    client.completions.create(model="student", prompt=PROMPT, max_tokens=4)
    text = _raw(server, "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['memstore_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["memstore_generation_tokens_total"] >= 4
    assert values['memstore_request_duration_seconds_count{endpoint="/v1/completions"}'] >= 1
    assert values["memstore_memory_paged_layers"] == 2
    assert values["memstore_memory_rows_paged_total"] > 0
    assert 0 < values["memstore_memory_cache_hit_rate"] < 1
    assert values["memstore_memory_rows_paged_per_token"] > 0
    # the threads it measured at start for 1 and 4 sequences per step (--max-batch 4)
    threads = [values[f'memstore_decode_threads{{sequences="{n}"}}'] for n in (1, 4)]
    assert all(1 <= t <= os.cpu_count() for t in threads), threads


def test_bad_threads_are_refused_before_loading(student_dir):
    from tests.distill.cli_results import error_line

    for value in ("0", "-2"):
        line = error_line(run_cli(["serve", student_dir, "--port", 0, "--threads", value]))
        assert f"threads must be >= 1, got {value}" in line
