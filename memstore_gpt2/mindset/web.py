"""``memstore mindset``: a local web UI over one student (Flask; plain HTML and JavaScript).

The page (``static/``) talks to a small JSON API; every answer is computed by the same functions
as the command line (trace, rows, explain, edit), so the UI shows nothing the CLI could not.

Safety, because a local server is reachable by every page the user's browser opens:

* it listens on ``127.0.0.1`` only, and answers only requests whose ``Host`` is that address or
  ``localhost`` *with the port it listens on* (a DNS-rebinding page, or a page of another local
  server, gets 403), and whose ``Origin``, when the browser sends one, is that same origin;
* API calls that change anything are ``POST`` with a JSON body, which a foreign page cannot send
  without a CORS preflight this server never approves;
* it is read-only unless started with ``--allow-edits``; even then an edit is written only when
  the request confirms it (the page first shows a dry run and asks), and never while a training
  run holds the database (:mod:`memstore_gpt2.db_lock`).

Every parameter is checked here before it reaches the model or the database: a bad request is a
4xx JSON ``{"error": "<parameter> <problem>"}``, never a 500 (numbers must be finite whole numbers
in range, texts valid Unicode, row ids at most as many as the layer holds, counted before any range
is expanded).

Requests are served one model call at a time (one lock): the loaded model and its switched-off
rows are shared state. After an edit the student is loaded again, so the page sees what the next
load sees.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from memstore.errors import (
    InvalidInputError,
    MemstoreError,
    RowNotFoundError,
    bad_parameter,
)
from memstore_gpt2.commands import require_flask
from memstore_gpt2.errors import DatabaseInUseError
from memstore_gpt2.local_pages import is_loopback_host, is_loopback_origin
from memstore_gpt2.mindset.chat import ChatFailedError
from memstore_gpt2.mindset.session import (
    DEFAULT_NEW_TOKENS,
    Mindset,
    check_student,
    parse_ids,
    shown,
)

#: The most tokens one UI generation may ask for.
MAX_NEW_TOKENS = 200
EDITS_OFF = "edits are off: start the UI with `memstore mindset STUDENT --allow-edits` to edit"
#: The host names the UI answers to (it listens on 127.0.0.1 only).
#: Row ids are SQLite/PostgreSQL 64-bit integers; anything larger cannot name a row.


class EditsNotAllowedError(MemstoreError, PermissionError):
    """An edit was asked of a Mindset UI started without ``--allow-edits``."""


class MindsetService:
    """What the UI can ask, over one loaded student; thread-safe (one call at a time)."""

    def __init__(
        self,
        student_dir: str,
        *,
        db: str | None = None,
        allow_edits: bool = False,
        packs: Sequence[str] = (),
    ):
        self.student_dir = str(student_dir)
        self.db_url = check_student(student_dir, db)
        self.allow_edits = bool(allow_edits)
        self.packs = tuple(packs)  # attached again whenever the student is reloaded
        self.mindset = Mindset.open(student_dir, self.db_url, self.packs)
        self.lock = threading.Lock()
        self._chat = None  # serve's decoder and scheduler over the loaded model, made on first use

    def close(self) -> None:
        with self.lock:
            self._close_chat()
            self.mindset.close()

    def _close_chat(self) -> None:
        if self._chat is not None:
            self._chat.close()
            self._chat = None

    def info(self) -> dict:
        with self.lock:
            return {
                "student": self.student_dir,
                "database": self.db_url,
                "allow_edits": self.allow_edits,
                "context": self.mindset.context,
                "layers": [entry.describe() for entry in self.mindset.layers.values()],
                "packs": list(self.packs),
            }

    def trace(self, prompt: str, top: int = 8, promotes: int = 5) -> dict:
        """The trace, plus for each row shown what it promotes (``labels[layer][id]``)."""
        from memstore_gpt2.mindset.trace import trace_prompt

        prompt = _text(prompt, "prompt")
        top = _int(top, "top", 0, 256)
        with self.lock:
            trace = trace_prompt(self.mindset, prompt, None, top)
            out = trace.to_json()
            out["labels"] = self._labels(trace.layers, promotes)
            return out

    def _labels(self, layers: dict, promotes: int) -> dict:
        """What each row shown promotes, ``{layer: {id: row}}``, for ``{layer: LayerTrace}``."""
        from memstore_gpt2.mindset.rows import describe_rows, row_facts

        labels = {}
        for name, layer in layers.items():
            ids = sorted({i for row in layer.ids for i in row})
            entry = self.mindset.layer(name)
            block, clock, lam = row_facts(entry, ids) if ids else (None, 0, 0.0)
            rows = describe_rows(self.mindset, entry, block, clock, lam, promotes) if ids else []
            labels[name] = {str(r["id"]): r for r in rows}
        return labels

    def chat(self, messages, max_tokens=None, temperature=0.0, top_p=1.0, top_k=0, seed=None,
             top=8, promotes: int = 5, packs=None) -> dict:  # fmt: skip
        """The student's reply to ``messages`` (OpenAI's ``[{"role", "content"}]``), decoded as
        ``memstore serve`` decodes a chat completion (greedy unless ``temperature`` > 0), and per
        reply token the ``top`` rows each layer selected for it, labelled like :meth:`trace`.
        ``packs``: the session's knowledge packs that act on this reply, as serve's ``"pack"``
        (a name or a list; None: every one; ``[]``: the bare student).

        The rows are the trace of the conversation and reply as token ids
        (:mod:`memstore_gpt2.mindset.chat`), with the same packs acting (the layers of the packs
        left out are not shown); ``offset`` is where the reply starts in it."""
        from memstore_gpt2.mindset.chat import DEFAULT_REPLY_TOKENS, ChatEngine, chat_prompt
        from memstore_gpt2.mindset.trace import LayerTrace, trace_tokens
        from memstore_gpt2.packs.attach import chosen_packs, packs_acting
        from memstore_gpt2.packs.storage import owned_by
        from memstore_gpt2.serve.decoding import SamplingParams

        packs = chosen_packs(packs, self.packs, "this Mindset session")
        prompt = chat_prompt(messages)
        asked = DEFAULT_REPLY_TOKENS if max_tokens is None else max_tokens
        asked = _int(asked, "max_tokens", 1, MAX_NEW_TOKENS)
        sampling = SamplingParams(
            temperature=_real(temperature, "temperature", 0.0, 100.0),
            top_p=_real(top_p, "top_p", 0.0, 1.0),
            top_k=_int(top_k, "top_k", 0, 1 << 30) or None,
            seed=None if seed is None else _int(seed, "seed", 0, (1 << 63) - 1),
        )
        if sampling.top_p == 0:
            raise bad_parameter("top_p", "must be greater than 0 (1: no cut)")
        top = _int(top, "top", 0, 256)
        with self.lock:
            ms = self.mindset
            prompt_ids = ms.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            room = ms.context - len(prompt_ids)
            if room < 1:
                raise bad_parameter(
                    "messages", f"are {len(prompt_ids)} tokens with the chat template; this model "
                    f"reads at most {ms.context}, reply included: start a new chat"
                )  # fmt: skip
            if self._chat is None or self._chat.model is not ms.model:  # reloaded by an edit
                self._close_chat()
                self._chat = ChatEngine(ms.model, ms.tokenizer)
            reply = self._chat.reply(prompt, prompt_ids, min(asked, room), sampling, packs)
            out = {"reply": reply.text, "finish_reason": reply.finish_reason,
                   "prompt": reply.prompt, "prompt_tokens": len(reply.prompt_ids),
                   "offset": len(reply.prompt_ids),
                   "tokens": [ms.token_text(t) for t in reply.token_ids],
                   "token_ids": reply.token_ids, "max_tokens": min(asked, room),
                   "packs": list(self.packs if packs is None else packs),
                   "layers": {}, "labels": {}}  # fmt: skip
            if not reply.token_ids:
                return out
            left_out = [p for p in self.packs if p not in out["packs"]]
            shown = None if not left_out else ",".join(
                entry.name for entry in ms.layers.values()
                if not any(owned_by(entry.name, p) for p in left_out)
            )  # fmt: skip
            with packs_acting(ms.model, None if packs is None else [packs]):
                trace = trace_tokens(ms, reply.prompt_ids + reply.token_ids, shown, top)
            start = len(reply.prompt_ids)
            layers = {
                name: LayerTrace(layer.ids[start:], layer.weights[start:],
                                 layer.contributions[start:], layer.selected, [])
                for name, layer in trace.layers.items()
            }  # fmt: skip
            out["layers"] = {
                name: {key: value for key, value in layer.to_json().items() if key != "every_token"}
                for name, layer in layers.items()
            }
            out["labels"] = self._labels(layers, promotes)
            return out

    def generate(self, prompt: str, off: dict | None = None, max_new_tokens=DEFAULT_NEW_TOKENS):
        """Greedy text as stored, and with the rows in ``off`` ({layer: ids}) switched off."""
        from memstore_gpt2.mindset.edit import switched_off

        prompt = _text(prompt, "prompt")
        n = _int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        if off is None:
            off = {}
        if not isinstance(off, dict):
            raise bad_parameter(
                "off", f"must be a JSON object {{layer: row ids}}, got {type(off).__name__}"
            )
        with self.lock:
            chosen = {}
            for name, ids in off.items():
                if ids in (None, "", []):
                    continue
                entry = self.mindset.layer(name, parameter="off")
                chosen[entry.name] = row_ids(entry, ids, f"off[{name!r}]")
            off = chosen
            normal = self.mindset.greedy(prompt, n)
            if not off:
                return {"normal": normal, "ablated": normal, "off": {}}
            with switched_off(self.mindset, off):
                ablated = self.mindset.greedy(prompt, n)
            return {"normal": normal, "ablated": ablated, "off": off}

    def rows(self, layer: str, sort: str | None = None, promotes: str | None = None,
             limit=50, ascending: bool = False) -> dict:  # fmt: skip
        from memstore_gpt2.mindset.rows import list_rows

        limit = _int(limit, "limit", 0, 100_000)
        promotes = _text(promotes, "promotes") if promotes else None
        with self.lock:
            return list_rows(self.mindset, layer, promotes=promotes or None, sort=sort or None,
                             limit=limit, ascending=ascending)  # fmt: skip

    def explain(self, layer: str, ids) -> dict:
        from memstore_gpt2.mindset.explain import explain_rows

        with self.lock:
            entry = self.mindset.layer(layer)
            return explain_rows(self.mindset, entry.name, row_ids(entry, ids), top=10)

    def edit(self, layer, action, ids, factor=None, prompt=None, confirm=False, max_new_tokens=20):
        """Without ``confirm``: the dry run (what would change, text before and after). With it:
        the edit, written in one transaction, then the student loaded again."""
        from memstore_gpt2.db_lock import hold_database
        from memstore_gpt2.mindset.edit import make_edit, previewed, write

        if not self.allow_edits:
            raise EditsNotAllowedError(EDITS_OFF)
        n = _int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        prompt = _text(prompt, "prompt") if prompt else None
        if not isinstance(confirm, bool):  # "confirm": "no" must not write
            raise bad_parameter("confirm", f"must be true or false, got {confirm!r}")
        with self.lock:
            ms = self.mindset
            if prompt:
                ms.encode(prompt)
            ids = row_ids(ms.layer(layer), ids)
            edit = make_edit(ms, layer, action, ids, factor)
            entry = ms.layer(edit.layer)
            rows_before = len(entry.collection)
            before = ms.greedy(prompt, n) if prompt else None
            result = {"description": edit.describe(), "layer": edit.layer, "action": edit.action,
                      "ids": list(edit.ids), "factor": edit.factor, "rows_before": rows_before,
                      "before": before, "confirmed": bool(confirm)}  # fmt: skip
            if not confirm:
                with previewed(ms, edit):  # undone on the way out
                    result["after"] = ms.greedy(prompt, n) if prompt else None
                drop = len(edit.ids) if edit.action == "delete" else 0
                result["rows_after"] = rows_before - drop
                return result
            with hold_database(self.db_url, self.student_dir, "edit"):
                result["rows_changed"] = write(ms, edit)
            self._close_chat()  # its decoder holds the model about to be replaced
            self.mindset.close()
            self.mindset = Mindset.open(self.student_dir, self.db_url, self.packs)
            result["rows_after"] = len(self.mindset.layer(edit.layer).collection)
            result["after"] = self.mindset.greedy(prompt, n) if prompt else None
            return result


def _int(value, name: str, low: int, high: int) -> int:
    """A whole number in ``low..high`` from a JSON number or a query string. ``int()`` alone
    would raise OverflowError on JSON's ``Infinity`` (a 500), and silently read ``true`` as 1 and
    ``2.5`` as 2; all three are refused."""
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None  # inf and nan are not integers
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:  # also a string of more digits than Python converts
            number = None
    else:
        number = None
    if number is None:
        raise bad_parameter(name, f"must be a whole number, got {shown(value)}")
    if not low <= number <= high:
        raise bad_parameter(name, f"must be in {low}..{high}, got {shown(number)}")
    return number


def _real(value, name: str, low: float, high: float) -> float:
    """A finite number in ``low..high`` from JSON (``true`` is not 1, ``Infinity`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_parameter(name, f"must be a number, got {shown(value)}")
    if not low <= value <= high:  # also refuses nan and inf (and ints too large for a float)
        raise bad_parameter(name, f"must be in {low:g}..{high:g}, got {shown(value)}")
    return float(value)


def _text(value, name: str) -> str:
    """``value`` as text the tokenizer can read: a string of valid Unicode. JSON may carry a lone
    surrogate (``"\\ud800"``), which the tokenizer rejects with a TypeError (a 500)."""
    if not isinstance(value, str):
        raise bad_parameter(name, f"must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_parameter(
            name, f"is not valid Unicode: a lone surrogate {value[exc.start]!r} at character "
            f"{exc.start}"
        ) from None  # fmt: skip
    return value


def row_ids(entry, value, parameter: str = "ids") -> list[int]:
    """The row ids of ``entry`` (a MindsetLayer) a request names, counted against the layer before
    any range is expanded (see ``session.parse_ids``)."""
    return parse_ids(value, parameter, holds=(entry.name, len(entry.collection)))


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def create_app(service: MindsetService):
    """The Flask application over ``service`` (its static page and JSON API)."""
    require_flask("mindset")
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    static = Path(str(resources.files("memstore_gpt2.mindset") / "static"))
    app = Flask("memstore_mindset", static_folder=str(static), static_url_path="/static")
    app.json.sort_keys = False

    @app.before_request
    def only_local_pages():
        # the port this server answers on (the real one behind port 0; 80 under the test client)
        port = str(request.environ.get("SERVER_PORT", ""))
        if not is_loopback_host(request.host or "", port):
            return jsonify(
                error=f"host {request.host!r} refused: open http://127.0.0.1:{port}/"
            ), 403  # fmt: skip
        origin = request.headers.get("Origin")
        if origin is not None and not is_loopback_origin(origin, port):
            return jsonify(error=f"origin {origin!r} refused: only this page may call the API"), 403
        return None

    @app.errorhandler(HTTPException)
    def http_error(exc):  # unknown paths, wrong methods, bodies too large: JSON too
        return jsonify(error=f"{exc.code} {exc.name}: {request.method} {request.path}"), exc.code

    @app.errorhandler(MemstoreError)
    def memstore_error(exc):
        status = 400
        if isinstance(exc, EditsNotAllowedError):
            status = 403
        elif isinstance(exc, RowNotFoundError):
            status = 404
        elif isinstance(exc, DatabaseInUseError):
            status = 409
        elif isinstance(exc, ChatFailedError):
            status = 500
        return jsonify(error=str(exc).splitlines()[0]), status

    def body() -> dict:
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # JSON nested deeper than Python's decoder goes
            data = None
        if not isinstance(data, dict) or not request.is_json:
            raise InvalidInputError("send a JSON object (Content-Type: application/json)")
        return data

    @app.get("/")
    def index():
        return app.send_static_file("index.html")

    @app.get("/api/info")
    def info():
        return jsonify(service.info())

    @app.post("/api/trace")
    def trace():
        data = body()
        return jsonify(service.trace(data.get("prompt", ""), data.get("top", 8)))

    @app.post("/api/generate")
    def generate():
        data = body()
        return jsonify(service.generate(data.get("prompt", ""), data.get("off") or {},
                                        data.get("max_new_tokens", DEFAULT_NEW_TOKENS)))  # fmt: skip

    @app.post("/api/chat")
    def chat():
        data = body()
        return jsonify(service.chat(data.get("messages"), data.get("max_tokens"),
                                    data.get("temperature", 0.0), data.get("top_p", 1.0),
                                    data.get("top_k", 0), data.get("seed"),
                                    data.get("top", 8), packs=data.get("pack")))  # fmt: skip

    @app.get("/api/rows")
    def rows():
        args = request.args
        return jsonify(service.rows(args.get("layer", ""), args.get("sort"), args.get("promotes"),
                                    args.get("limit", 50), _truthy(args.get("ascending"))))  # fmt: skip

    @app.get("/api/explain")
    def explain():
        return jsonify(service.explain(request.args.get("layer", ""), request.args.get("ids", "")))

    @app.post("/api/edit")
    def edit():
        data = body()
        return jsonify(service.edit(data.get("layer", ""), data.get("action", ""),
                                    data.get("ids", ""), data.get("factor"), data.get("prompt"),
                                    data.get("confirm", False),
                                    data.get("max_new_tokens", 20)))  # fmt: skip

    return app


class MindsetServer:
    """The UI's HTTP server on 127.0.0.1 (werkzeug's threaded server), startable in a thread."""

    def __init__(self, service: MindsetService, port: int = 0) -> None:
        from werkzeug.serving import make_server

        self.service = service
        try:
            self._server = make_server("127.0.0.1", port, create_app(service), threaded=True)
        except OSError as exc:
            raise bad_parameter(
                "port", f"{port} cannot be used on 127.0.0.1 ({exc.strerror})"
            ) from None
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> MindsetServer:
        self._thread = threading.Thread(target=self.serve_forever, name="mindset", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.service.close()


def serve(
    student_dir: str,
    *,
    port: int = 8765,
    allow_edits: bool = False,
    db=None,
    packs: Sequence[str] = (),
    log=print,
):
    """Run the UI until Ctrl-C (``memstore mindset``)."""
    require_flask("mindset")  # before the student loads: a missing extra is the first thing said
    service = MindsetService(student_dir, db=db, allow_edits=allow_edits, packs=packs)
    try:
        server = MindsetServer(service, port)
    except BaseException:
        service.close()
        raise
    mode = "edits allowed" if allow_edits else "read-only"
    log(f"Mindset on {server.url} ({mode}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()
        service.close()
