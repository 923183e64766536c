"""benchmarks/knowledge.py --json at toy sizes (a smoke run, no target values): the issue's keys,
that every figure is finite and follows from the per-arm table, that detaching the packs gives the
base's logits bit for bit and that no arm changed the base student; plus the benchmark's own
pieces (the split by document, the n-gram overlap, the kNN-LM interpolation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark

ISSUE_KEYS = (
    "learn_gain_share", "lora_gain_share", "knn_gain_share", "learn_a_ratio_attached",
    "full_ft_a_ratio", "detach_identical", "compose_a_ratio", "compose_b_ratio", "step_time_ratio",
)  # fmt: skip
ARMS = ("base student", "full fine-tune", "LoRA r=4", "embeddings only", "kNN-LM k=8",
        "learn (pack 'python')")  # fmt: skip
CONTEXT = 16


@pytest.fixture
def knowledge(monkeypatch):
    import torch

    module = load_benchmark(monkeypatch, "knowledge.py", cpu_env=True)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def domain_a(tmp_path_factory) -> tuple[Path, Path]:
    """Domain A for the toy run: the plain-text help of two stdlib modules (offline, and not
    the help topics domain B is made of)."""
    import argparse
    import json as json_module
    import pydoc

    root = tmp_path_factory.mktemp("domain_a")
    train, test = root / "train.txt", root / "test.txt"
    train.write_text(pydoc.render_doc(argparse, renderer=pydoc.plaintext), encoding="utf-8")
    test.write_text(pydoc.render_doc(json_module, renderer=pydoc.plaintext), encoding="utf-8")
    return train, test


def toy_flags(domain_a: tuple[Path, Path], work: Path) -> list[str]:
    return [
        "--a-train", str(domain_a[0]), "--a-test", str(domain_a[1]), "--work", str(work),
        "--width", "32", "--vocab", "384", "--context", str(CONTEXT), "--teacher-steps", "4",
        "--memory-rows", "256", "--distill-steps", "2", "--steps", "3", "--batch-size", "2",
        "--warmup", "1", "--lora-r", "4", "--knn-k", "8", "--pack-rows", "64",
        "--b-documents", "10", "--a-test-blocks", "16", "--threads", "1", "--json",
    ]  # fmt: skip


def test_toy_run_keys_and_consistent_figures(knowledge, domain_a, tmp_path, capsys):
    assert knowledge.main(toy_flags(domain_a, tmp_path / "work")) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    for key in ISSUE_KEYS:
        assert key in out, key
        if key != "detach_identical":
            assert isinstance(out[key], float) and math.isfinite(out[key]), key
    assert out["detach_identical"] is True  # a guarantee of packs, not a target
    assert out["base_unchanged"] is True  # no arm wrote into the base student
    arms = {a["arm"]: a for a in out["arms"]}
    assert tuple(arms) == ARMS
    base, full = arms["base student"], arms["full fine-tune"]
    assert out["base_b_test_ppl"] == base["b_test_ppl"] and base["a_ratio"] == 1.0
    assert full["gain_share"] == 1.0 and out["full_ft_a_ratio"] == full["a_ratio"]

    def share(arm: dict) -> float:
        return (math.log(base["b_test_ppl"]) - math.log(arm["b_test_ppl"])) / (
            math.log(base["b_test_ppl"]) - math.log(full["b_test_ppl"])
        )

    learn, lora, knn = arms["learn (pack 'python')"], arms["LoRA r=4"], arms["kNN-LM k=8"]
    assert out["learn_gain_share"] == pytest.approx(share(learn), rel=1e-12)
    assert out["lora_gain_share"] == pytest.approx(share(lora), rel=1e-12)
    assert out["knn_gain_share"] == pytest.approx(share(knn), rel=1e-12)
    assert out["learn_a_ratio_attached"] == learn["a_test_ppl"] / base["a_test_ppl"]
    assert out["step_time_ratio"] == learn["step_time_s"] / full["step_time_s"]
    compose = out["compose"]
    assert out["compose_a_ratio"] == compose["both_a_test_ppl"] / compose["a_pack_a_test_ppl"]
    assert out["compose_b_ratio"] == compose["both_b_test_ppl"] / compose["b_pack_b_test_ppl"]
    assert compose["b_pack_b_test_ppl"] == learn["b_test_ppl"]  # the same pack, loaded twice
    for arm in out["arms"]:
        assert math.isfinite(arm["b_test_ppl"]) and math.isfinite(arm["a_test_ppl"])
    for arm in (full, lora, arms["embeddings only"], learn):
        assert arm["trainable_parameters"] > 0 and arm["step_time_s"] > 0
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert learn["rows"] == learn["extra"]["summary"]["rows"] > 0
    # the datastore holds one entry per predicted B-train token
    tokens = out["tokens"]
    assert knn["rows"] == tokens["b_train"] // CONTEXT * (CONTEXT - 1)
    assert 0 < knn["extra"]["knn_lambda"] < 1 and knn["extra"]["knn_temperature"] > 0
    assert out["b_documents"] == [8, 2] and 0.0 <= out["ngram_overlap"] <= 1.0
    assert out["steps"] == 3 and learn["extra"]["summary"]["steps"] == 3
    assert "machine: " in captured.out and "| learn (pack 'python')" in captured.out


def test_documents_split_by_document_and_seeded(knowledge):
    documents = [f"document {i}" for i in range(20)]
    train, test = knowledge.split_documents(documents, 0.2, seed=3)
    assert len(test) == 4 and len(train) == 16
    assert sorted(train + test) == sorted(documents) and not set(train) & set(test)
    assert knowledge.split_documents(documents, 0.2, seed=3) == (train, test)
    assert knowledge.split_documents(documents, 0.2, seed=4) != (train, test)
    with pytest.raises(knowledge.BenchmarkError, match="at least 2 documents"):
        knowledge.split_documents(["one"], 0.2, seed=0)


def test_ngram_overlap_counts_test_ngrams_seen_in_training(knowledge):
    train = np.array([1, 2, 3, 4, 5, 6])
    test = np.array([2, 3, 4, 9, 4, 5, 6])  # 3-grams: 234 (seen), 349, 494, 945, 456 (seen)
    assert knowledge.ngram_overlap(train, test, n=3) == 2 / 5
    assert knowledge.ngram_overlap(train, train, n=3) == 1.0
    assert knowledge.ngram_overlap(train, np.array([1, 2]), n=3) == 0.0


@pytest.mark.parametrize("faiss", ["installed", "absent"])
def test_knn_interpolation_and_search(knowledge, faiss, monkeypatch):
    import sys

    import torch

    if faiss == "absent":
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    else:
        pytest.importorskip("faiss")
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    dists, idx = knowledge.knn_search(torch.tensor([[0.9, 0.0]]), keys, k=2)
    assert idx.tolist() == [[1, 0]] and idx.dtype == torch.int64
    assert dists[0].tolist() == pytest.approx([0.01, 0.81])
    assert knowledge.knn_search(torch.tensor([[0.9, 0.0]]), keys, k=5)[1].shape == (1, 3)
    lm_logp = torch.log(torch.tensor([0.25]))
    match = torch.tensor([[True, False]])
    got = knowledge.knn_logp(lm_logp, dists, match, lam=0.5, temp=1.0)
    weights = torch.softmax(-dists[0], -1)
    assert float(got.exp()) == pytest.approx(0.5 * float(weights[0]) + 0.5 * 0.25)
    # no neighbour with the true token: only the model's share is left
    none = knowledge.knn_logp(lm_logp, dists, ~torch.ones_like(match), lam=0.2, temp=1.0)
    assert float(none.exp()) == pytest.approx(0.8 * 0.25)


def test_a_missing_text_is_one_error_json_line(knowledge, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    flags = ["--a-train", str(missing), "--a-test", str(missing), "--work", str(tmp_path), "--json"]
    assert knowledge.main(flags) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "error": f"--a-train {missing}: no such file"
    }
    assert "Traceback" not in captured.err
