"""Knowledge packs behind ``memstore serve --pack``: each request chooses among the loaded packs
(``extra_body={"pack": [...]}``) inside one batch, and gets what a student with exactly those
packs attached at load computes; the choice is listed, counted and checked."""

from __future__ import annotations

import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")

from tests.distill.cli_results import error_line, last_json, run_cli  # noqa: E402
from tests.distill.packs.pack_helpers import copy_student, learn_tiny_pack  # noqa: E402
from tests.serve.server_process import API_KEY, serve_process  # noqa: E402
from tests.serve.test_server import _raw  # noqa: E402

PROMPT = "The for statement"
#: (extra_body, the packs it means) -- absent: every loaded pack; []: the bare student
CHOICES = [({}, ("alpha", "beta")), ({"pack": []}, ()), ({"pack": "alpha"}, ("alpha",)),
           ({"pack": ["beta"]}, ("beta",)), ({"pack": ["beta", "alpha"]}, ("beta", "alpha"))]  # fmt: skip


@pytest.fixture(scope="module")
def pack_student(student_dir, tmp_path_factory):
    """A copy of the serving student with two packs learnt on different help topics."""
    out = copy_student(student_dir, tmp_path_factory.mktemp("serve-packs") / "student")
    learn_tiny_pack(out, "alpha", 40)
    learn_tiny_pack(out, "beta", 60)
    return out


@pytest.fixture(scope="module")
def server(pack_student, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("pack-server")
    with serve_process(pack_student, log_dir, "--pack", "alpha", "--pack", "beta",
                       "--max-batch", 8) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=120)


def _prompt_logprobs(student_dir, packs, ids) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under the student loaded with exactly ``packs``."""
    from memstore_gpt2.student import load_student

    loaded = load_student(student_dir, packs=packs)
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        loaded.close()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_health_and_models_list_the_loaded_packs(server, client):
    assert _raw(server, "/health").json()["packs"] == ["alpha", "beta"]
    assert _raw(server, "/v1/models").json()["data"][0]["packs"] == ["alpha", "beta"]


def test_each_choice_scores_as_the_student_loaded_with_those_packs(pack_student, client):
    """echo + logprobs: the prompt's log-probabilities under each request's packs are what the
    student computes with exactly those packs attached at load (and the packs do change them)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(pack_student)(PROMPT)["input_ids"]
    scored = {}
    for extra, packs in CHOICES:
        reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=0,
                                          echo=True, logprobs=0, extra_body=extra)  # fmt: skip
        served = reply.choices[0].logprobs.token_logprobs[1:]
        expected = _prompt_logprobs(pack_student, packs, ids)
        assert served == pytest.approx(expected, abs=1e-4), packs
        scored[packs] = served
    assert scored[()] != pytest.approx(scored[("alpha",)], abs=1e-3)
    assert scored[("alpha",)] != pytest.approx(scored[("beta",)], abs=1e-3)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(client):
    """Requests with different packs decode in one batch (max batch 8) and each gets the tokens
    and log-probabilities it gets on its own."""

    def complete(extra):
        reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=10,
                                          temperature=0, logprobs=1, extra_body=extra)  # fmt: skip
        choice = reply.choices[0]
        return choice.text, choice.logprobs.token_logprobs

    requests = [extra for extra, _ in CHOICES] * 2
    alone = [complete(extra) for extra in requests]
    together: dict[int, tuple] = {}
    barrier = threading.Barrier(len(requests))

    def run(i):
        barrier.wait()
        together[i] = complete(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for i, (text, logprobs) in enumerate(alone):
        assert together[i][0] == text, requests[i]
        assert together[i][1] == pytest.approx(logprobs, abs=1e-4)
    assert alone[1][1] != pytest.approx(alone[2][1], abs=1e-3)  # the packs change the scores


def test_greedy_chat_with_a_pack_equals_memstore_generate_with_it(pack_student, client):
    result = run_cli(["generate", pack_student, "--prompt", PROMPT, "--device", "cpu",
                      "--temperature", 0, "--max-new-tokens", 12, "--pack", "beta", "--json"])  # fmt: skip
    expected = last_json(result)["text"][len(PROMPT) :]
    reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=12,
                                      temperature=0, extra_body={"pack": ["beta"]})  # fmt: skip
    assert reply.choices[0].text == expected


@pytest.mark.parametrize(
    ("pack", "message"),
    [("gamma", "pack 'gamma' is not loaded by this server; loaded: 'alpha', 'beta'"),
     (["alpha", 3], "pack must be a pack name or a list of pack names"),
     (["alpha", "alpha"], "names a pack twice")],
)  # fmt: skip
def test_a_bad_pack_choice_is_a_400_naming_it(server, pack, message):
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):  # fmt: skip
        reply = _raw(server, path, {**body, "max_tokens": 2, "pack": pack})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "pack" and message in error["message"]


def test_metrics_count_the_requests_each_pack_acted_on(server, client):
    def counts():
        text = _raw(server, "/metrics").text
        return {name: float(line.split()[-1]) for name in ("alpha", "beta")
                for line in text.splitlines()
                if line.startswith(f'memstore_pack_requests_total{{pack="{name}"}}')}  # fmt: skip

    before = counts()
    client.completions.create(model="student", prompt=PROMPT, max_tokens=1,
                              extra_body={"pack": ["alpha"]})  # fmt: skip
    client.completions.create(model="student", prompt=PROMPT, max_tokens=1)
    after = counts()
    assert after["alpha"] - before["alpha"] == 2 and after["beta"] - before["beta"] == 1


def test_chat_on_a_url_sends_its_packs(server):
    from click.testing import CliRunner

    from memstore_gpt2.cli import main

    result = CliRunner().invoke(main, ["chat", server, "--api-key", API_KEY, "--pack", "gamma"],
                                input="hello\n")  # fmt: skip
    assert "pack 'gamma' is not loaded by this server" in error_line(result, exit_code=None)


def test_serve_refuses_a_pack_the_database_does_not_hold(pack_student):
    result = run_cli(["serve", pack_student, "--port", 0, "--pack", "nope"])
    assert "nope" in error_line(result, exit_code=None)


def _until(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server did not follow the database in time"
        time.sleep(0.2)


def _echo_scores(client, packs):
    reply = client.completions.create(model="student", prompt=PROMPT, max_tokens=0, echo=True,
                                      logprobs=0, extra_body={"pack": list(packs)})  # fmt: skip
    return reply.choices[0].logprobs.token_logprobs[1:]


def test_all_packs_follows_packs_learnt_and_dropped_while_serving(student_dir, tmp_path):
    """``--all-packs``: a pack learnt while the server runs joins between steps, is served as a
    student loaded with it computes, leaves when dropped, and its new version joins when it is
    learnt again -- no restart."""
    from transformers import AutoTokenizer

    student = copy_student(student_dir, tmp_path / "student")
    ids = AutoTokenizer.from_pretrained(student)(PROMPT)["input_ids"]
    with serve_process(student, tmp_path, "--all-packs") as url:
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
        assert _raw(url, "/health").json()["packs"] == []
        learn_tiny_pack(student, "fresh", 40)
        _until(lambda: _raw(url, "/health").json()["packs"] == ["fresh"])
        first = _echo_scores(client, ["fresh"])
        assert first == pytest.approx(_prompt_logprobs(student, ("fresh",), ids), abs=1e-4)
        assert run_cli(["packs", "drop", student, "fresh"]).exit_code == 0
        _until(lambda: _raw(url, "/health").json()["packs"] == [])
        gone = _raw(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "pack": "fresh"})
        assert gone.status_code == 400 and gone.json()["error"]["param"] == "pack"
        learn_tiny_pack(student, "fresh", 60, seed=1)  # another version under the same name
        _until(lambda: _raw(url, "/health").json()["packs"] == ["fresh"])
        second = _echo_scores(client, ["fresh"])
        assert second == pytest.approx(_prompt_logprobs(student, ("fresh",), ids), abs=1e-4)
        assert second != pytest.approx(first, abs=1e-3)
        swaps = [line for line in _raw(url, "/metrics").text.splitlines()
                 if line.startswith("memstore_pack_swaps_total ")]  # fmt: skip
        assert swaps == ["memstore_pack_swaps_total 3"]


def test_a_named_pack_is_followed_and_others_are_not(pack_student, tmp_path):
    """The watcher behind ``--pack``: a pack of the database it does not serve changes nothing;
    the served pack's new version is swapped in; a pack refused for this student is skipped."""
    from memstore_gpt2.packs.attach import attached_packs
    from memstore_gpt2.serve.pack_watch import PackWatcher
    from memstore_gpt2.student import load_student

    student = copy_student(pack_student, tmp_path / "student")
    loaded = load_student(student, packs=("alpha",))
    try:
        watcher = PackWatcher(loaded, str(student), ("alpha",))
        assert not watcher.check(admitting=True)
        learn_tiny_pack(student, "gamma", 50)
        assert not watcher.check(admitting=True)  # not a pack this server serves
        assert run_cli(["packs", "drop", student, "alpha"]).exit_code == 0
        assert watcher.check(admitting=True) and list(attached_packs(loaded.model)) == []
        learn_tiny_pack(student, "alpha", 50, seed=2)
        assert watcher.check(admitting=True)
        assert list(attached_packs(loaded.model)) == ["alpha"]
        assert watcher.stats.swaps == 2 and watcher.stats.failures == 0
    finally:
        loaded.close()


def test_all_packs_is_refused_with_pack(pack_student):
    line = error_line(run_cli(["serve", pack_student, "--port", 0, "--all-packs", "--pack",
                               "alpha"]), exit_code=None)  # fmt: skip
    assert "all_packs" in line or "--all-packs" in line


def _table_bytes(configs) -> list[tuple[int, int]]:
    """(rows, bytes per cached row) of product-key configs, the arithmetic of a budget."""
    from memstore_torch import PagedRows, ProductKeyMemory

    out = []
    for saved in configs:
        config, _ = ProductKeyMemory.split_saved_config(saved)
        out.append((config.n_rows, PagedRows.bytes_per_slot(2, config.row_value_dim)))
    return out


def test_all_packs_under_bytes_share_what_the_student_leaves(student_dir, tmp_path):
    """``--all-packs --memory-budget BYTES``: the student takes what it takes alone (here all
    its rows, resident), a pack learnt later pages through caches that split the rest of the
    budget, and computes what it computes resident; with nothing left, the pack is refused
    once (counted, its reason kept) and the student serves on."""
    from memstore_gpt2.packs.attach import attached_packs
    from memstore_gpt2.packs.storage import read_pack
    from memstore_gpt2.serve.pack_watch import PackWatcher
    from memstore_gpt2.student import load_student, read_manifest
    from memstore_torch import PagedRows, ProductKeyMemory
    from memstore_torch.budget import MemoryBudget

    student = copy_student(student_dir, tmp_path / "student")
    own = []
    for entry in read_manifest(student)["layers"].values():
        own += [p["config"] for p in entry.get("parts", [entry])
                if p.get("class") == "ProductKeyMemory"]  # fmt: skip
    own_bytes = sum(rows * row_bytes for rows, row_bytes in _table_bytes(own))
    assert own_bytes > 0
    learn_tiny_pack(student, "fresh", 40)
    probe = load_student(student)
    try:
        pack_tables = _table_bytes(read_pack(probe.store, "fresh").manifest["memories"].values())
    finally:
        probe.close()
    pack_bytes = sum(rows * row_bytes for rows, row_bytes in pack_tables)
    budget = MemoryBudget(bytes=own_bytes + pack_bytes // 3)
    loaded = load_student(student, memory_budget=budget)
    try:
        assert not any(isinstance(m.index, PagedRows) for m in loaded.model.modules()
                       if isinstance(m, ProductKeyMemory))  # fmt: skip
        watcher = PackWatcher(loaded, str(student), None, budget)
        assert watcher.check(admitting=True) and list(attached_packs(loaded.model)) == ["fresh"]
        layers = [m for m in attached_packs(loaded.model)["fresh"].modules()
                  if isinstance(m, ProductKeyMemory)]  # fmt: skip
        assert layers and all(isinstance(m.index, PagedRows) for m in layers)
        cached = sum(m.index.capacity * row_bytes
                     for m, (_, row_bytes) in zip(layers, pack_tables, strict=True))  # fmt: skip
        assert 0 < cached <= pack_bytes // 3  # the rest of the budget, no more
        ids = torch.tensor([[5, 17, 42, 9, 100]])
        with torch.no_grad():
            got = loaded.model(input_ids=ids).logits
        resident = load_student(student, packs=("fresh",))
        try:
            with torch.no_grad():
                want = resident.model(input_ids=ids).logits
        finally:
            resident.close()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        loaded.close()
    tight = MemoryBudget(bytes=own_bytes)  # the student's rows take it all
    loaded = load_student(student, memory_budget=tight)
    try:
        watcher = PackWatcher(loaded, str(student), None, tight)
        assert not watcher.check(admitting=True) and list(attached_packs(loaded.model)) == []
        assert watcher.stats.failures == 1 and "no room for packs" in watcher.stats.last_error
        assert not watcher.check(admitting=True) and watcher.stats.failures == 1  # not retried
    finally:
        loaded.close()


def test_under_a_share_a_pack_learnt_later_pages_its_share_alone(student_dir, tmp_path):
    """``--all-packs --memory-budget 50%``: the watcher gives a pack learnt after the start half
    of each of its tables, leaves the student's caches as they were, and the pack computes what
    it computes resident."""
    import torch

    from memstore_gpt2.commands import parse_memory_budget
    from memstore_gpt2.packs.attach import attached_packs
    from memstore_gpt2.serve.pack_watch import PackWatcher
    from memstore_gpt2.student import load_student
    from memstore_torch import PagedRows, ProductKeyMemory

    student = copy_student(student_dir, tmp_path / "student")
    budget = parse_memory_budget("50%")
    loaded = load_student(student, memory_budget=budget)
    try:

        def caches():
            return {id(m): m.index.capacity for m in loaded.model.modules()
                    if isinstance(m, ProductKeyMemory) and isinstance(m.index, PagedRows)}  # fmt: skip

        before = caches()
        assert before  # the student's own product-key rows page too
        watcher = PackWatcher(loaded, str(student), None, budget)
        learn_tiny_pack(student, "fresh", 40)
        assert watcher.check(admitting=True) and list(attached_packs(loaded.model)) == ["fresh"]
        pack = attached_packs(loaded.model)["fresh"]
        paged = [m for m in pack.modules() if isinstance(m, ProductKeyMemory)]
        assert paged and all(isinstance(m.index, PagedRows) for m in paged)
        assert all(m.index.capacity == -(-m.n_rows // 2) for m in paged)
        after = caches()
        assert {k: after[k] for k in before} == before  # the student's caches did not move
        with torch.no_grad():
            got = loaded.model(input_ids=torch.tensor([[5, 17, 42, 9, 100]])).logits
        resident = load_student(student, packs=("fresh",))
        try:
            with torch.no_grad():
                want = resident.model(input_ids=torch.tensor([[5, 17, 42, 9, 100]])).logits
        finally:
            resident.close()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        loaded.close()


def test_a_pack_that_does_not_fit_is_skipped_once_and_the_rest_served(pack_student, tmp_path):
    """``--all-packs`` over a database holding a pack learnt for another student: it is refused
    (counted, its error kept), not retried at every check, and the other packs are served."""
    from memstore_gpt2.packs.attach import attached_packs
    from memstore_gpt2.serve.pack_watch import PackWatcher
    from memstore_gpt2.student import load_student

    student = copy_student(pack_student, tmp_path / "student")
    loaded = load_student(student)
    try:
        watcher = PackWatcher(loaded, str(student), None)
        real = watcher.fingerprint
        watcher.fingerprint = "another student"  # as if every stored pack were learnt elsewhere
        assert not watcher.check(admitting=True)  # nothing served: nothing changed
        assert watcher.stats.failures == 2 and "another student" in watcher.stats.last_error
        assert not watcher.check(admitting=True) and watcher.stats.failures == 2  # not retried
        watcher.fingerprint, watcher.refused = real, {"beta": watcher.refused["beta"]}
        watcher.clock.forget()  # changed here, not by a commit its probe would see: look again
        assert watcher.check(admitting=True)
        assert list(attached_packs(loaded.model)) == ["alpha"]
    finally:
        loaded.close()


def test_an_edit_of_a_packs_rows_reaches_a_running_server(pack_student, tmp_path):
    """``memstore edit --pack``: a pack's product-key rows are zeroed in one transaction, and the
    memory refresher of a server serving the pack reads them again between steps: it then
    computes what a student loaded with the edited pack computes."""
    import numpy as np

    from memstore_gpt2.serve.refresh import MemoryRefresher
    from memstore_gpt2.student import load_student

    student = copy_student(pack_student, tmp_path / "student")
    loaded = load_student(student, packs=("alpha",))
    try:
        refresher = MemoryRefresher(loaded.model, loaded.store)
        store = loaded.store
        names = [c.name for c in store.list_collections()]
        layer = sorted(n for n in names if n.startswith("pack.alpha."))[0]
        block = store.collection(layer).export_rows()
        every = block.ids  # ids r + 1 of rows 0..n-1: the whole layer, as a range
        ids = f"{int(every.min())}-{int(every.max())}"
        refused = run_cli(["edit", student, layer, "--zero", ids])  # the pack is not attached
        assert "--pack alpha" in error_line(refused)
        edited = last_json(run_cli(["edit", student, layer, "--pack", "alpha", "--zero", ids,
                                    "--prompt", PROMPT, "--max-new-tokens", 4, "--json"]))  # fmt: skip
        assert edited["layer"] == layer and edited["rows_changed"] == len(every)
        assert np.abs(store.collection(layer).get(every).values).max() == 0
        prompt = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
        fresh = load_student(student, packs=("alpha",))
        with torch.no_grad():
            try:
                want = fresh.model(input_ids=prompt).logits
            finally:
                fresh.close()
            stale = loaded.model(input_ids=prompt).logits  # the rows as loaded before the edit
            assert (stale - want).abs().max() > 1e-4  # the edit changes what the pack predicts
            assert refresher.check(admitting=True) >= 1
            got = loaded.model(input_ids=prompt).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        loaded.close()
