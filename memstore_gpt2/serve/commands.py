"""``memstore serve STUDENT``: the OpenAI-compatible server as a CLI command.

Imported by the CLI at every start, so torch and flask are imported only when the command runs.
The student is opened as ``memstore generate`` opens it (``--db``, ``--memory-budget``,
``--device``), then one scheduler thread decodes for all HTTP threads.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from memstore.errors import bad_parameter
from memstore_gpt2.commands import memory_budget_option, require_flask, require_torch

DEFAULT_PORT = 8000


class Server:
    """A loaded student behind the HTTP API: model, scheduler thread, werkzeug server."""

    def __init__(self, student_dir: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 db: str | None = None, memory_budget: str | None = None, device: str = "auto",
                 precision: str = "fp32", max_batch: int = 16, api_key: str | None = None,
                 packs: tuple[str, ...] = (), all_packs: bool = False,
                 threads: int | None = None) -> None:  # fmt: skip
        from werkzeug.serving import make_server

        from memstore_gpt2.commands import _open_for_run
        from memstore_gpt2.local_pages import LOOPBACK_NAMES
        from memstore_gpt2.serve.app import ServeState, create_app
        from memstore_gpt2.serve.decoding import Decoder, check_threads
        from memstore_gpt2.serve.pack_watch import PackWatcher
        from memstore_gpt2.serve.refresh import (
            REFRESH_INTERVAL_S,
            MemoryRefresher,
            versions_before_load,
        )
        from memstore_gpt2.serve.scheduler import Scheduler
        from memstore_torch.model_memory import memory_layers, paging_stats

        require_flask("serve")  # before the student loads: a missing extra is the first thing said
        check_threads(threads)
        if api_key is not None and not api_key.strip():
            raise bad_parameter("api_key", "is empty")
        if all_packs and packs:
            raise bad_parameter("all_packs", "serves every pack: give it or --pack, not both")
        known = versions_before_load(student_dir, db)  # edits during the load are applied after
        self.run = _open_for_run(student_dir, db, memory_budget, device, packs)
        try:
            model = self.run.model
            decoder = Decoder(model, precision, threads)
            self.state = None
            layers = list(memory_layers(model).values())  # found again when the packs change

            def snapshot() -> None:
                self.state.paging = paging_stats(model, layers)

            def packs_changed() -> None:
                """The attached packs were swapped: what holds the model's modules finds them."""
                decoder.refresh_packs()
                self.refresher.rebind(model)
                layers[:] = memory_layers(model).values()

            student = self.run.opened.student
            self.refresher = self.pack_watcher = None
            if student is not None:  # a plain GPT-2 directory has no memory to keep fresh
                self.refresher = MemoryRefresher(model, student.store, known=known)
                self.pack_watcher = PackWatcher(student, student_dir,
                                                None if all_packs else packs,
                                                self.run.budget)  # fmt: skip
                if self.pack_watcher.check(admitting=True):  # --all-packs: every finished one
                    packs_changed()
            elif all_packs:
                raise bad_parameter("all_packs", f"{student_dir} is not a memstore student")

            def refresh(admitting: bool) -> None:
                if self.pack_watcher.check(admitting):
                    packs_changed()
                self.refresher.check(admitting)

            self.scheduler = Scheduler(
                decoder, max_batch=max_batch, on_step=snapshot,
                refresh=None if self.refresher is None else refresh,
                refresh_interval=REFRESH_INTERVAL_S, tune_threads=threads is None,
            )  # fmt: skip
            name = Path(student_dir).resolve().name
            self.state = ServeState(name, self.run.tokenizer, self.scheduler, api_key=api_key,
                                    loopback_only=host in LOOPBACK_NAMES)  # fmt: skip
            if self.refresher is not None:
                self.state.refresh = self.refresher.stats
                self.state.pack_watch = self.pack_watcher.stats
            snapshot()
            try:
                self.http = make_server(host, port, create_app(self.state), threaded=True)
            except OSError as exc:
                raise bad_parameter(
                    "port", f"{port} cannot be used on {host} ({exc.strerror})"
                ) from None
            self.http.daemon_threads = True
            self.scheduler.start()
            self.scheduler.ready.wait()  # its threads measured: the first request meets them
        except BaseException:
            self.run.opened.close()
            raise
        self.host, self.port = host, self.http.server_port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"

    def serve_forever(self) -> None:
        self.http.serve_forever()

    def close(self) -> None:
        self.http.server_close()
        self.scheduler.stop()
        for watcher in (self.refresher, self.pack_watcher):
            if watcher is not None:
                watcher.close()
        self.run.opened.close()


@click.command("serve")
@click.argument("student_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; a non-loopback address exposes the model.")  # fmt: skip
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int,
              help="0: any free port (the first line printed names it).")  # fmt: skip
@click.option("--db", default=None, help="Use this memory database instead of the saved one.")
@click.option(
    "--pack",
    "packs",
    multiple=True,
    help="Attach this knowledge pack (repeatable); a request chooses among them with "
    '"pack" (default: all). Learnt or imported again, it is served anew; '
    "dropped, no more (no restart).",
)
@click.option("--all-packs", is_flag=True,
              help="Serve every finished pack of the database, and those learnt or imported "
                   "while the server runs.")  # fmt: skip
@memory_budget_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: CUDA when available, else CPU.")  # fmt: skip
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="bf16/fp16: forwards under torch.autocast.")  # fmt: skip
@click.option("--max-batch", default=16, show_default=True, type=int,
              help="Sequences decoded together per step (1: batching off).")  # fmt: skip
@click.option("--threads", default=None, type=int,
              help="CPU threads per forward [default: measured at start for 1, 4, 16 "
                   "sequences per step; larger steps one per 16M multiply-adds].")  # fmt: skip
@click.option("--api-key", default=None, envvar="MEMSTORE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ (or set MEMSTORE_API_KEY).")  # fmt: skip
def serve_command(student_dir, host, port, db, packs, all_packs, memory_budget, device, precision,
                  max_batch, threads, api_key) -> None:  # fmt: skip
    """Serve a student (or any GPT-2 directory) over the OpenAI HTTP API.

    \b
    Endpoints: GET /health, GET /v1/models, POST /v1/completions,
    POST /v1/chat/completions (both stream with "stream": true), GET /metrics.
    Example:
      memstore serve student/ --port 8000
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
          -d '{"prompt": "The for statement", "max_tokens": 20}'
      memstore serve student/ --pack python --pack notes   # a request picks: "pack": ["notes"]
    """
    if max_batch < 1:
        raise bad_parameter("max_batch", f"must be >= 1, got {max_batch}")
    if not 0 <= port <= 65535:
        raise bad_parameter("port", f"must be within [0, 65535], got {port}")
    require_torch()
    server = Server(student_dir, host=host, port=port, db=db, memory_budget=memory_budget,
                    device=device, precision=precision, max_batch=max_batch,
                    api_key=api_key, packs=tuple(packs), all_packs=all_packs,
                    threads=threads)  # fmt: skip

    def stop(signum, frame) -> None:  # SIGTERM ends the server as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    loaded = f", packs {', '.join(server.state.packs)}" if server.state.packs else ""
    threads = server.scheduler.decoder.describe_threads()
    threads = f", {threads}" if threads else ""
    click.echo(f"memstore serve: {server.url}/v1 (model {server.state.model_name!r}, "
               f"device {server.run.device}{threads}, max batch {max_batch}{loaded}); "
               "Ctrl-C stops it")  # fmt: skip
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def add_serve_commands(group: click.Group) -> None:
    """Register ``serve`` and ``chat`` on the ``memstore`` group (called by
    ``memstore_gpt2.cli``)."""
    from memstore_gpt2.serve.chat import chat_command

    group.add_command(serve_command)
    group.add_command(chat_command)
