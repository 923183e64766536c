"""A bounded load test: 16 concurrent clients (the official ``openai`` client, one per thread)
against one real ``memstore serve`` process on loopback for 30 s of wall clock, mixing streamed
and whole completions and chat. Every request must succeed with a well-formed answer, and the
server's ``/metrics`` must count exactly the requests sent (none lost, none counted twice)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import pytest

openai = pytest.importorskip("openai")

from tests.serve.test_server import API_KEY, _raw, server  # noqa: E402, F401 - fixture reused

CLIENTS = 16
DURATION_S = 30.0
MAX_REQUESTS_PER_CLIENT = 400  # a bound on the loop even if the server answered instantly
MAX_TOKENS = 4
PROMPTS = ["The for statement", "A list is", "x = 1", "Functions"]
KINDS = ("completion", "completion_stream", "chat", "chat_stream")
ENDPOINT = {"completion": "/v1/completions", "completion_stream": "/v1/completions",
            "chat": "/v1/chat/completions", "chat_stream": "/v1/chat/completions"}  # fmt: skip


def _requests_total(base_url: str) -> Counter:
    """``memstore_requests_total`` by (endpoint, status), read from ``/metrics``."""
    reply = _raw(base_url, "/metrics")
    assert reply.status_code == 200
    pattern = re.compile(r'^memstore_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\d+)$')
    counts: Counter = Counter()
    for line in reply.text.splitlines():
        match = pattern.match(line)
        if match:
            counts[(match[1], int(match[2]))] = int(match[3])
    return counts


def _check_completion(reply, max_tokens: int) -> None:
    assert reply.object == "text_completion" and reply.id
    choice = reply.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    assert 1 <= reply.usage.completion_tokens <= max_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def _check_completion_stream(chunks) -> None:
    assert chunks and len({c.id for c in chunks}) == 1
    assert all(isinstance(c.choices[0].text, str) for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def _check_chat(reply, max_tokens: int) -> None:
    assert reply.object == "chat.completion" and reply.id
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 1 <= reply.usage.completion_tokens <= max_tokens


def _check_chat_stream(chunks) -> None:
    assert chunks and len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.slow
def test_sixteen_clients_for_thirty_seconds(server):  # noqa: F811 - the fixture
    before = _requests_total(server)
    sent: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            kind = KINDS[(index + n) % len(KINDS)]
            prompt = PROMPTS[(index * 7 + n) % len(PROMPTS)]
            max_tokens = 1 + (index + n) % MAX_TOKENS
            sampling = dict(model="student", max_tokens=max_tokens, temperature=0.8,
                            seed=index * 1000 + n)  # fmt: skip
            messages = [{"role": "user", "content": prompt}]
            with lock:
                sent[ENDPOINT[kind]] += 1
            try:
                if kind == "completion":
                    _check_completion(client.completions.create(prompt=prompt, **sampling),
                                      max_tokens)  # fmt: skip
                elif kind == "completion_stream":
                    _check_completion_stream(list(client.completions.create(
                        prompt=prompt, stream=True, **sampling)))  # fmt: skip
                elif kind == "chat":
                    _check_chat(client.chat.completions.create(messages=messages, **sampling),
                                max_tokens)  # fmt: skip
                else:
                    _check_chat_stream(list(client.chat.completions.create(
                        messages=messages, stream=True, **sampling)))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                with lock:
                    errors.append(f"client {index} request {n} ({kind}): {exc!r}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(CLIENTS)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DURATION_S + 90)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert errors == [], errors[:5]
    assert sum(sent.values()) >= CLIENTS  # every client got at least one answer in
    after = _requests_total(server)
    for endpoint, n in sent.items():
        assert after[(endpoint, 200)] - before[(endpoint, 200)] == n, (endpoint, n, after)
    others = {k: v - before[k] for k, v in after.items()
              if k[0] in sent and k[1] != 200 and v != before[k]}  # fmt: skip
    assert others == {}
