"""``memstore mindset``: a local web UI over one student (Flask; plain HTML and JavaScript).

The page (``static/``) talks to a small JSON API; every answer is computed by the same functions
as the command line (trace, rows, explain, edit), so the UI shows nothing the CLI could not.

Safety, because a local server is reachable by every page the user's browser opens:

* it listens on ``127.0.0.1`` only, and answers only requests whose ``Host`` is that address or
  ``localhost`` with its port (a DNS-rebinding page gets 403);
* API calls that change anything are ``POST`` with a JSON body, which a foreign page cannot send
  without a CORS preflight this server never approves;
* it is read-only unless started with ``--allow-edits``; even then an edit is written only when
  the request confirms it (the page first shows a dry run and asks), and never while a training
  run holds the database (:mod:`memstore_gpt2.db_lock`).

Requests are served one model call at a time (one lock): the loaded model and its switched-off
rows are shared state. After an edit the student is loaded again, so the page sees what the next
load sees.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path

from memstore.errors import (
    InvalidInputError,
    MemstoreError,
    MissingDependencyError,
    RowNotFoundError,
    bad_parameter,
)
from memstore_gpt2.errors import DatabaseInUseError
from memstore_gpt2.mindset.session import DEFAULT_NEW_TOKENS, Mindset, check_student, parse_ids

FLASK_HINT = "pip install 'memstore[mindset]'"
#: The most tokens one UI generation may ask for.
MAX_NEW_TOKENS = 200
EDITS_OFF = "edits are off: start the UI with `memstore mindset STUDENT --allow-edits` to edit"


class EditsNotAllowedError(MemstoreError, PermissionError):
    """An edit was asked of a Mindset UI started without ``--allow-edits``."""


class MindsetService:
    """What the UI can ask, over one loaded student; thread-safe (one call at a time)."""

    def __init__(self, student_dir: str, *, db: str | None = None, allow_edits: bool = False):
        self.student_dir = str(student_dir)
        self.db_url = check_student(student_dir, db)
        self.allow_edits = bool(allow_edits)
        self.mindset = Mindset.open(student_dir, self.db_url)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.mindset.close()

    def info(self) -> dict:
        with self.lock:
            return {
                "student": self.student_dir,
                "database": self.db_url,
                "allow_edits": self.allow_edits,
                "context": self.mindset.context,
                "layers": [entry.describe() for entry in self.mindset.layers.values()],
            }

    def trace(self, prompt: str, top: int = 8, promotes: int = 5) -> dict:
        """The trace, plus for each row shown what it promotes (``labels[layer][id]``)."""
        from memstore_gpt2.mindset.rows import describe_rows, row_facts
        from memstore_gpt2.mindset.trace import trace_prompt

        top = _int(top, "top", 0, 256)
        with self.lock:
            trace = trace_prompt(self.mindset, prompt, None, top)
            out = trace.to_json()
            out["labels"] = {}
            for name, layer in trace.layers.items():
                ids = sorted({i for row in layer.ids for i in row})
                entry = self.mindset.layer(name)
                block, clock, lam = row_facts(entry, ids) if ids else (None, 0, 0.0)
                rows = (
                    describe_rows(self.mindset, entry, block, clock, lam, promotes) if ids else []
                )
                out["labels"][name] = {str(r["id"]): r for r in rows}
            return out

    def generate(self, prompt: str, off: dict | None = None, max_new_tokens=DEFAULT_NEW_TOKENS):
        """Greedy text as stored, and with the rows in ``off`` ({layer: ids}) switched off."""
        from memstore_gpt2.mindset.edit import switched_off

        n = _int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        off = {name: parse_ids(ids) for name, ids in (off or {}).items() if ids}
        with self.lock:
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
        with self.lock:
            return list_rows(self.mindset, layer, promotes=promotes or None, sort=sort or None,
                             limit=limit, ascending=ascending)  # fmt: skip

    def explain(self, layer: str, ids) -> dict:
        from memstore_gpt2.mindset.explain import explain_rows

        with self.lock:
            return explain_rows(self.mindset, layer, parse_ids(ids), top=10)

    def edit(self, layer, action, ids, factor=None, prompt=None, confirm=False, max_new_tokens=20):
        """Without ``confirm``: the dry run (what would change, text before and after). With it:
        the edit, written in one transaction, then the student loaded again."""
        from memstore_gpt2.db_lock import hold_database
        from memstore_gpt2.mindset.edit import make_edit, previewed, write

        if not self.allow_edits:
            raise EditsNotAllowedError(EDITS_OFF)
        n = _int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        with self.lock:
            ms = self.mindset
            if prompt:
                ms.encode(prompt)
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
            self.mindset.close()
            self.mindset = Mindset.open(self.student_dir, self.db_url)
            result["rows_after"] = len(self.mindset.layer(edit.layer).collection)
            result["after"] = self.mindset.greedy(prompt, n) if prompt else None
            return result


def _int(value, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise bad_parameter(name, f"must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise bad_parameter(name, f"must be in {low}..{high}, got {number}")
    return number


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def require_flask() -> None:
    """One clear line when the ``mindset`` extra (Flask) is not installed."""
    try:
        import flask  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"memstore mindset needs flask: {FLASK_HINT}") from None


def create_app(service: MindsetService):
    """The Flask application over ``service`` (its static page and JSON API)."""
    require_flask()
    from flask import Flask, jsonify, request

    static = Path(str(resources.files("memstore_gpt2.mindset") / "static"))
    app = Flask("memstore_mindset", static_folder=str(static), static_url_path="/static")
    app.json.sort_keys = False

    @app.before_request
    def only_local_pages():
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost"):
            return jsonify(error=f"host {request.host!r} refused: open http://127.0.0.1"), 403
        return None

    @app.errorhandler(MemstoreError)
    def memstore_error(exc):
        status = 400
        if isinstance(exc, EditsNotAllowedError):
            status = 403
        elif isinstance(exc, RowNotFoundError):
            status = 404
        elif isinstance(exc, DatabaseInUseError):
            status = 409
        return jsonify(error=str(exc).splitlines()[0]), status

    def body() -> dict:
        data = request.get_json(silent=True)
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
                                    bool(data.get("confirm")),
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


def serve(student_dir: str, *, port: int = 8765, allow_edits: bool = False, db=None, log=print):
    """Run the UI until Ctrl-C (``memstore mindset``)."""
    require_flask()  # before the student loads: a missing extra is the first thing said
    service = MindsetService(student_dir, db=db, allow_edits=allow_edits)
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
