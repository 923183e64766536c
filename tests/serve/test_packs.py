"""Knowledge packs behind ``memstore serve --pack``: each request chooses among the loaded packs
(``extra_body={"pack": [...]}``) inside one batch, and gets what a student with exactly those
packs attached at load computes; the choice is listed, counted and checked."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

openai = pytest.importorskip("openai")

from tests.distill.cli_results import error_line, last_json, run_cli  # noqa: E402
from tests.serve.server_process import API_KEY, serve_process  # noqa: E402
from tests.serve.test_server import _raw  # noqa: E402

PROMPT = "The for statement"
#: (extra_body, the packs it means) -- absent: every loaded pack; []: the bare student
CHOICES = [({}, ("alpha", "beta")), ({"pack": []}, ()), ({"pack": "alpha"}, ("alpha",)),
           ({"pack": ["beta"]}, ("beta",)), ({"pack": ["beta", "alpha"]}, ("beta", "alpha"))]  # fmt: skip


@pytest.fixture(scope="module")
def pack_student(student_dir, tmp_path_factory):
    """A copy of the serving student with two packs learnt on different help topics."""
    from memstore_gpt2.packs.learn import LearnOptions, learn_pack
    from memstore_gpt2.student import STUDENT_FILE, default_db_url
    from memstore_gpt2.text_data import python_docs_corpus

    root = tmp_path_factory.mktemp("serve-packs")
    out = root / "student"
    shutil.copytree(student_dir, out)
    manifest = json.loads((out / STUDENT_FILE).read_text())
    manifest["db"] = default_db_url(out)
    (out / STUDENT_FILE).write_text(json.dumps(manifest))
    topics = python_docs_corpus()
    options = LearnOptions(steps=6, rows=64, k=4, key_dim=16, batch_size=4, background_blocks=8,
                           background_batch=2, warmup=1, vocab_rows=64, block_len=32)  # fmt: skip
    for name, first in (("alpha", 40), ("beta", 60)):
        text = root / f"{name}.txt"
        text.write_text("\n\n".join(topics[first : first + 4]), encoding="utf-8")
        learn_pack(out, text, name, options)
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
