"""``memstore chat STUDENT_OR_URL``: a terminal chat over the server's ``/v1/chat/completions``.

With an http(s) URL it talks to a running ``memstore serve``; with a student directory it starts
the same server in-process on a free loopback port (behind a random API key), so both modes run
one code path: the app, the scheduler and the chat template. The client is the standard library
(``http.client`` and SSE parsing by hand): the ``openai`` package is a dev extra only.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
import sys
import threading
import urllib.parse
from collections.abc import Iterator

import click

from memstore.errors import InvalidInputError, bad_parameter
from memstore_gpt2.commands import memory_budget_option, require_torch

TIMEOUT_S = 600


class ChatClient:
    """Streams chat completions from one server (``base_url`` ends in ``/v1`` or is the root)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 packs: tuple[str, ...] | None = None) -> None:  # fmt: skip
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidInputError(f"not an http(s) URL: {base_url!r}", parameter="student_or_url")
        self.url = base_url
        self.scheme, self.host, self.port = parsed.scheme, parsed.hostname, parsed.port
        path = parsed.path.rstrip("/")
        self.path = (path if path.endswith("/v1") else path + "/v1") + "/chat/completions"
        self.api_key = api_key
        #: The server's packs each reply uses (None: the server's default, all it loaded).
        self.packs = packs

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=TIMEOUT_S)

    def stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        """The reply's text pieces as the server streams them (SSE ``data:`` lines)."""
        fields = {k: v for k, v in sampling.items() if v is not None}
        if self.packs is not None:
            fields["pack"] = list(self.packs)
        body = json.dumps({"model": "student", "messages": messages, "stream": True, **fields})
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connection = self._connection()
        try:
            try:
                connection.request("POST", self.path, body=body.encode(), headers=headers)
                response = connection.getresponse()
            except OSError as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise InvalidInputError(f"cannot reach {self.url} ({reason})",
                                        parameter="student_or_url") from None  # fmt: skip
            if response.status != 200:
                raise InvalidInputError(f"{self.url} answered HTTP {response.status}: "
                                        f"{_error_message(response.read())}")  # fmt: skip
            for data in self._events(response):
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise InvalidInputError(
                        f"{self.url} sent a stream event that is not JSON: {data[:80]!r}"
                    ) from None
                if not isinstance(event, dict):
                    raise InvalidInputError(f"{self.url} sent a stream event that is not an object")
                if "error" in event:
                    raise InvalidInputError(f"{self.url}: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        yield piece
        finally:
            connection.close()

    def _events(self, response) -> Iterator[str]:
        """The ``data:`` payloads of an SSE response; a connection that drops mid-reply is one
        line naming the server, not a traceback from deep inside http.client."""
        try:
            for raw in response:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    yield line[5:].strip()
        except (OSError, http.client.HTTPException) as exc:
            raise InvalidInputError(
                f"the connection to {self.url} broke mid-reply ({type(exc).__name__})"
            ) from None
        raise InvalidInputError(f"{self.url} ended its stream without [DONE]")


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's first line."""
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return (text.strip().splitlines() or ["(empty body)"])[0][:200]


def chat_loop(client: ChatClient, lines, out, *, system: str | None, **sampling) -> None:
    """Read user lines, keep the history, print each streamed reply; ``/reset`` clears the
    history, ``/exit`` or EOF quits. Blank lines are skipped (nothing to answer)."""
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(base)
            out.write("(history cleared)\n")
            out.flush()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in client.stream(messages, **sampling):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except InvalidInputError:
            if pieces:  # the error line must not run on after half a reply
                out.write("\n")
                out.flush()
            raise
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})


@click.command("chat")
@click.argument("student_or_url")
@click.option("--max-tokens", default=128, show_default=True, type=int,
              help="Most tokens per reply.")  # fmt: skip
@click.option("--temperature", default=0.8, show_default=True, type=float,
              help="0: greedy (the same reply every time).")  # fmt: skip
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible replies).")
@click.option("--system", default=None, help="A system message that starts the conversation.")
@click.option("--api-key", default=None, envvar="MEMSTORE_API_KEY",
              help="Bearer key of the server (a URL only; or set MEMSTORE_API_KEY).")  # fmt: skip
@click.option("--db", default=None, help="Use this memory database (a student directory only).")
@click.option("--pack", "packs", multiple=True,
              help="Knowledge pack the replies use (repeatable): attached to a student directory, "
                   "chosen among a server's loaded packs for a URL [default: the server's all].")  # fmt: skip
@memory_budget_option
def chat_command(student_or_url, max_tokens, temperature, seed, system, api_key, db, packs,
                 memory_budget) -> None:  # fmt: skip
    """Chat in the terminal with a student directory or a running `memstore serve` URL.

    \b
    One line per message; /reset clears the history, /exit or end of input quits.
    Examples:
      memstore chat student/
      memstore chat http://127.0.0.1:8000/v1 --temperature 0
      memstore chat student/ --pack python-help
    """
    if max_tokens < 1:
        raise bad_parameter("max_tokens", f"must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise bad_parameter("temperature", f"must be >= 0, got {temperature}")
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    lines = iter(sys.stdin.readline, "")
    out = sys.stdout
    if student_or_url.startswith(("http://", "https://")):
        if db is not None or memory_budget is not None:
            raise InvalidInputError("--db and --memory-budget apply to a student directory, "
                                    "not a URL", parameter="db")  # fmt: skip
        client = ChatClient(student_or_url, api_key, tuple(packs) if packs else None)
        chat_loop(client, lines, out, system=system, **sampling)
        return
    require_torch()
    from memstore_gpt2.serve.commands import Server

    # werkzeug's access lines would interleave with the replies on the terminal
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    key = secrets.token_urlsafe(16)  # the loopback port is reachable by this machine's users
    server = Server(student_or_url, host="127.0.0.1", port=0, db=db,
                    memory_budget=memory_budget, device="auto", api_key=key,
                    packs=tuple(packs))  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        chat_loop(ChatClient(f"{server.url}/v1", key), lines, out, system=system, **sampling)
    finally:
        server.http.shutdown()
        thread.join(timeout=30)
        server.close()


def add_chat_commands(group: click.Group) -> None:
    """Register ``chat`` on the ``memstore`` group (called by ``memstore_gpt2.cli``)."""
    group.add_command(chat_command)
