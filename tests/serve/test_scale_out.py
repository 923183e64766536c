"""Several servers, one memory: an edit reaches every running server without a restart.

In-process first (the change log, and a loaded student refreshing exactly the changed rows,
resident and paged), then real ``memstore serve`` processes: two over one PostgreSQL database and
two over one SQLite file, edited with ``memstore edit``; each server's greedy completion changes
and equals that of a server started after the edit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from memstore import Store
from memstore_gpt2.memory_changes import ChangeFeed, record_change, versions
from tests.distill.cli_results import run_cli

PROMPT = "The for statement"
NEW_TOKENS = 12
STARTUP_S = 180
BUDGET = "10%"  # the extra rows page through a small cache


# -- the change log -------------------------------------------------------------------------------
def test_change_feed_returns_each_change_once_until_applied(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        feed = ChangeFeed(store)
        assert feed.poll() == []  # no table yet: nothing ever changed
        with store.transaction() as conn:
            assert record_change(conn, "a", [5, 3, 5]) == 1
        with store.transaction() as conn:
            assert record_change(conn, "a", np.array([1], np.int64)) == 2
            assert record_change(conn, "b") == 1
        changes = {c.collection: c for c in feed.poll()}
        assert changes["a"].ids == (1, 3, 5) and changes["a"].version == 2
        assert changes["b"].ids is None  # "any row": the reader reloads the collection
        feed.applied(changes["a"])
        again = feed.poll()  # b was not applied (say its refresh failed): returned again
        assert [(c.collection, c.version, c.ids) for c in again] == [("b", 1, None)]
        feed.applied(again[0])
        assert feed.poll() == []
        with store.read() as conn:
            assert versions(conn) == {"a": 2, "b": 1}
        assert ChangeFeed(store).poll() == []  # a new reader starts at the committed versions


def test_commit_probe_sees_what_other_connections_commit(tmp_path):
    """The check before a request joins skips reading versions only when SQLite says nothing
    was committed since its last look; elsewhere (or closed) it always looks."""
    import sqlalchemy as sa

    from memstore_gpt2.serve.refresh import CommitProbe

    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        probe = CommitProbe(store.url)
        assert probe.moved()  # the first look
        assert not probe.moved()  # nothing committed since
        with store.read() as conn:
            versions(conn)  # reading commits nothing
        assert not probe.moved()
        with store.transaction() as conn:
            record_change(conn, "a", [1])
        assert probe.moved() and not probe.moved()
        probe.forget()
        assert probe.moved()
        probe.close()
        assert probe.moved() and probe.moved()
    for url in ("postgresql://u@localhost/db", "sqlite://"):
        other = CommitProbe(sa.make_url(url))
        assert other.moved() and other.moved()
    # the clock each watcher keeps asks its probe before a request, its interval otherwise
    from memstore_gpt2.serve.refresh import CheckClock

    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        clock = CheckClock(3600, CommitProbe(store.url))
        assert clock.due(admitting=True) and not clock.due(admitting=True)
        assert not clock.due(admitting=False)  # the interval has not passed
        with store.transaction() as conn:
            record_change(conn, "a", [2])
        assert clock.due(admitting=True)
        clock.forget()  # a check failed
        assert clock.due(admitting=True) and not clock.due(admitting=True)
        clock.close()


def test_a_rolled_back_edit_announces_nothing(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        coll = store.create_collection("a", key_dim=2)
        ids = coll.insert(np.ones((2, 2), np.float32))
        feed = ChangeFeed(store)
        with pytest.raises(RuntimeError), store.transaction() as conn:
            coll.update(ids, values=np.zeros((2, 2), np.float32))
            record_change(conn, "a", ids)
            raise RuntimeError("the edit fails after writing")
        assert feed.poll() == []
        np.testing.assert_array_equal(coll.get(ids).values, np.ones((2, 2)))


# -- a loaded student refreshing ------------------------------------------------------------------
@pytest.fixture
def own_student(student_dir, tmp_path):
    """A copy of the session's student (these tests edit its memory)."""
    out = tmp_path / "student"
    shutil.copytree(student_dir, out)
    return out


def _load(path, budget=None):
    from memstore_gpt2.commands import parse_memory_budget
    from memstore_gpt2.student import load_student

    return load_student(path, memory_budget=parse_memory_budget(budget))


def _greedy(loaded) -> list[int]:
    from memstore_gpt2.serve.decoding import Decoder, greedy_decode

    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return greedy_decode(Decoder(loaded.model), ids, NEW_TOKENS)


def _rows_read(loaded, collection: str, ids: list[int]) -> list[int]:
    """The ids of ``collection`` that a forward of tokens ``ids`` reads (the layer's own
    selection)."""
    from memstore_torch.model_memory import recording_reads

    with torch.no_grad(), recording_reads(loaded.model) as layers:
        loaded.model(torch.tensor([ids]))
        read = next(layer.last_read for layer in layers.values()
                    if layer.collection_name == collection)  # fmt: skip
    return sorted({int(i) for i in read.ids.reshape(-1).tolist() if i >= 0})


def _edit(student, layer: str, action: str, ids, factor=None, db=None) -> dict:
    from memstore_gpt2.mindset.edit import run_edit

    spec = ",".join(map(str, ids))
    return run_edit(str(student), layer, action, spec, factor, db=db)


@pytest.mark.parametrize("budget", [None, BUDGET], ids=["resident", "paged"])
def test_loaded_student_refreshes_exactly_the_edited_rows(own_student, budget):
    from memstore_gpt2.serve.refresh import MemoryRefresher
    from memstore_torch.model_memory import memory_layers
    from memstore_torch.paged_rows import PagedRows

    loaded = _load(own_student, budget)
    try:
        refresher = MemoryRefresher(loaded.model, loaded.store)
        before = _greedy(loaded)  # a paged layer now caches the rows the prompt reads
        extra = _rows_read(loaded, "layer1.extra", before)
        featural = _rows_read(loaded, "layer0", before)[:8]
        layers = {m.collection_name: m for m in memory_layers(loaded.model).values()}
        index = layers["layer1.extra"].index
        assert isinstance(index, PagedRows) == (budget is not None)
        # rows of the table the refresh has to touch: all edited ones, or those cached
        touched = len(extra)
        if budget is not None:  # the edited rows are cached: a stale copy would be served
            touched = int((index._slot[torch.tensor(extra) - 1] >= 0).sum())
            assert touched == len(extra)
        assert refresher.check(admitting=True) == 0  # nothing changed yet
        _edit(own_student, "layer1.extra", "scale", extra, -20.0)
        _edit(own_student, "layer0", "delete", featural)
        assert _greedy(loaded) == before  # not refreshed yet: the old rows still answer
        assert refresher.check(admitting=True) == 2
        assert refresher.stats.rows == touched + len(featural)
        assert refresher.stats.reloads == refresher.stats.failures == 0
        assert len(layers["layer0"].index) == len(loaded.store.collection("layer0"))
        after = _greedy(loaded)
        assert refresher.check(admitting=True) == 0  # each change is applied once
    finally:
        loaded.close()
    fresh = _load(own_student, budget)
    try:
        assert _greedy(fresh) == after
    finally:
        fresh.close()
    assert after != before  # the edit changed the completion, so the comparison can fail


def test_rows_a_layer_does_not_hold_and_any_row_changes_reload(own_student):
    """A change that adds a row the resident layer does not hold, and one recorded for "any
    row", both leave the layer holding exactly the stored rows."""
    from memstore_gpt2.serve.refresh import MemoryRefresher
    from memstore_torch.model_memory import memory_layers

    loaded = _load(own_student)
    try:
        refresher = MemoryRefresher(loaded.model, loaded.store)
        layer = next(m for m in memory_layers(loaded.model).values()
                     if m.collection_name == "layer0")  # fmt: skip
        coll = loaded.store.collection("layer0")
        gone = coll.export_rows().ids[:3]
        with loaded.store.transaction() as conn:
            coll.delete(gone)
            first = coll.get(coll.export_rows().ids[:1])
            new = coll.insert(first.keys, first.values)
            record_change(conn, "layer0", [*gone.tolist(), *new.tolist()])
        assert refresher.check(admitting=True) == 1
        assert sorted(layer.index.ids.tolist()) == coll.export_rows().ids.tolist()
        with loaded.store.transaction() as conn:
            coll.update(new, values=np.full((1, coll.value_dim), 0.25, np.float32))
            record_change(conn, "layer0")  # any row
        assert refresher.check(admitting=True) == 1 and refresher.stats.reloads == 1
        slot = layer.index.slots_of(new)
        assert torch.equal(layer.index.values[slot], torch.full((1, coll.value_dim), 0.25))
    finally:
        loaded.close()


def test_idle_scheduler_looks_for_changes_and_before_admitting(student):
    """Idle, the scheduler still calls its refresh; before a request joins it calls it with
    ``admitting`` (and before the request's first token)."""
    from memstore_gpt2.serve.decoding import Decoder
    from memstore_gpt2.serve.scheduler import Request, Scheduler, Token

    calls: list[tuple[bool, int]] = []
    request = Request(student.tokenizer("x", add_special_tokens=False)["input_ids"], 2)
    scheduler = Scheduler(Decoder(student.model), refresh=lambda admitting: calls.append(
        (admitting, request.events.qsize())), refresh_interval=0.01)  # fmt: skip
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls and calls[0] == (False, 0)  # woke up with nothing to run
        scheduler.submit(request)
        events = list(request.stream(timeout=60))
    finally:
        scheduler.stop()
    assert sum(isinstance(e, Token) for e in events) == 2
    assert (True, 0) in calls  # once, before the first token was handed over


# -- real servers ---------------------------------------------------------------------------------
class ServerProcess:
    """``memstore serve`` in a process of its own on a free port (``--port 0``: it prints the
    port), its log in a file so no pipe can fill up."""

    def __init__(self, student, log_path, *args: str) -> None:
        code = "from memstore_gpt2.cli import main; main()"
        argv = [sys.executable, "-c", code, "serve", str(student), "--port", "0",
                "--device", "cpu", *args]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - open for the server's whole life
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, env=env)  # fmt: skip
        self._lines: list[str] = []
        threading.Thread(target=lambda: self._lines.extend(iter(self.process.stdout.readline, "")),
                         daemon=True).start()  # fmt: skip
        self.url = ""

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + STARTUP_S
        while not self._lines and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self._lines:
            self.stop()
            pytest.fail(f"the server did not start: {self.log_path.read_text()[-2000:]}")
        self.url = self._lines[0].split()[2].removesuffix("/v1")
        return self

    def complete(self) -> str:
        """The greedy completion of :data:`PROMPT`."""
        body = json.dumps({"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
        request = urllib.request.Request(f"{self.url}/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())["choices"][0]["text"]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith(name + " ")))  # fmt: skip

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()


def _copy_memory(sqlite_url: str, url: str) -> None:
    """Every collection of the student's SQLite memory, copied into the database at ``url``."""
    import dataclasses

    from memstore.types import CollectionOptions

    with Store(sqlite_url, create=False) as source, Store(url) as target:
        for coll in source.list_collections():
            spec = dataclasses.asdict(coll.spec)
            options = CollectionOptions(
                **{k: v for k, v in spec.items() if k not in ("id", "name")}
            )
            copy = target.create_collection(coll.name, options)
            copy.apply_changes(upserts=coll.export_rows(), clock=coll.clock)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_an_edit_reaches_every_running_server(own_student, tmp_path, request, backend):
    loaded = _load(own_student)
    try:
        before_ids = _greedy(loaded)
        extra = _rows_read(loaded, "layer1.extra", before_ids)
        featural = _rows_read(loaded, "layer0", before_ids)[:8]
    finally:
        loaded.close()
    db: list[str] = []
    if backend == "postgresql":
        url = request.getfixturevalue("fresh_postgres_url")  # skipped when there is no server
        _copy_memory(f"sqlite:///{own_student / 'memory.db'}", url)
        db = ["--db", url]
    servers = [ServerProcess(own_student, tmp_path / "paged.log", "--memory-budget", BUDGET, *db),
               ServerProcess(own_student, tmp_path / "resident.log", *db)]  # fmt: skip
    try:
        for server in servers:
            server.wait_ready()
        before = [server.complete() for server in servers]
        assert before[0] == before[1]
        for args in (["layer1.extra", "--scale", ",".join(map(str, extra)), "-20"],
                     ["layer0", "--delete", ",".join(map(str, featural))]):  # fmt: skip
            result = run_cli(["edit", own_student, *args, *db])
            assert result.exit_code == 0, result.output
        after = [server.complete() for server in servers]  # no restart
        assert after[0] == after[1] != before[0]
        for server in servers:
            assert server.metric("memstore_memory_refreshes_total") == 2
            assert server.metric("memstore_memory_reloads_total") == 0
            assert server.metric("memstore_memory_refresh_failures_total") == 0
        fresh = ServerProcess(own_student, tmp_path / "fresh.log", *db)
        servers.append(fresh)
        assert fresh.wait_ready().complete() == after[0]
        assert fresh.metric("memstore_memory_refreshes_total") == 0  # started after the edits
    finally:
        for server in servers:
            server.stop()
