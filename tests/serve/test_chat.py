"""``memstore chat`` with stdin piped, in both modes: against the real server process (a URL)
and with the student directory loaded in-process. Greedy replies must equal the server's own
chat completion for the same messages, history included; ``/reset`` and ``/exit`` work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")

from memstore_gpt2.cli import main  # noqa: E402
from tests.distill.cli_results import error_line  # noqa: E402
from tests.serve.test_server import API_KEY, BUDGET, _raw, client, server  # noqa: E402, F401

MAX_TOKENS = 2  # the tiny student's context is 32 (near-character) tokens: two turns fit
STDIN = "a\nb\n/reset\na\n/exit\nnever answered\n"


def _expected(openai_client, *, usage: list | None = None) -> str:
    """What the chat must print for ``STDIN``: the server's greedy chat completions; ``usage``
    collects each request's ``prompt_tokens``."""

    def reply(messages: list[dict]) -> str:
        answer = openai_client.chat.completions.create(model="student", messages=messages,
                                                       max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
        if usage is not None:
            usage.append(answer.usage.prompt_tokens)
        return answer.choices[0].message.content

    first = reply([{"role": "user", "content": "a"}])
    second = reply([{"role": "user", "content": "a"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "b"}])  # fmt: skip
    return f"{first}\n{second}\n(history cleared)\n{first}\n"


def _prompt_tokens(base_url: str) -> int:
    """``memstore_prompt_tokens_total`` from the server's ``/metrics``."""
    text = _raw(base_url, "/metrics").text
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("memstore_prompt_tokens_total ")))  # fmt: skip


def _chat(*args, stdin: str = STDIN) -> object:
    return CliRunner().invoke(main, ["chat", *map(str, args), "--max-tokens", MAX_TOKENS,
                                     "--temperature", 0], input=stdin,
                              catch_exceptions=False)  # fmt: skip


def test_chat_with_a_url_streams_the_servers_replies(server, client):  # noqa: F811
    result = _chat(server, "--api-key", API_KEY)
    assert result.exit_code == 0, result.output
    assert result.stdout == _expected(client)


def test_chat_sends_the_history(server, client):  # noqa: F811
    """The server prefills exactly the prompts of the conversation with its history (the
    greedy replies alone cannot show it: the tiny student answers much the same to anything),
    and ``/reset`` starts over with the first prompt."""
    usage: list[int] = []
    expected = _expected(client, usage=usage)
    before = _prompt_tokens(server)
    result = _chat(server, "--api-key", API_KEY)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert usage[1] > usage[0] + 2  # the history is in the second prompt
    assert _prompt_tokens(server) - before == usage[0] + usage[1] + usage[0]


def test_chat_with_a_student_directory_runs_the_same_code_in_process(student_dir, client):  # noqa: F811
    result = _chat(student_dir, "--memory-budget", BUDGET)
    assert result.exit_code == 0, result.output
    assert result.stdout == _expected(client)


def test_system_message_starts_the_conversation(server, client):  # noqa: F811
    """One turn (two with a system message overflow the tiny student's 32-token context)."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]
    answer = client.chat.completions.create(model="student", messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
    result = _chat(server, "--api-key", API_KEY, "--system", "S", stdin="a\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == answer.choices[0].message.content + "\n"


def test_chat_errors_are_one_line(server):  # noqa: F811
    line = error_line(_chat("http://127.0.0.1:1/v1"))
    assert line.startswith("Error: cannot reach http://127.0.0.1:1/v1 (")
    assert "HTTP 401" in error_line(_chat(server, "--api-key", "wrong"))
    line = error_line(_chat(server, "--db", "x.db"), exit_code=None)
    assert "--db" in line


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"data: {not json\n\n", "sent a stream event that is not JSON"),
        (
            b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
            "ended its stream without [DONE]",
        ),
    ],
)
def test_a_broken_stream_is_one_line(body, expected):
    """A server (here a stand-in on loopback) whose stream is not OpenAI's SSE: one line."""
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        line = error_line(_chat(f"http://127.0.0.1:{httpd.server_port}/v1"))
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
    assert expected in line
