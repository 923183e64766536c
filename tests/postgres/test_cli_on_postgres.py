"""The CLI on postgresql:// URLs: store commands, and `memstore distill gpt2 --db postgresql://`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from memstore import Store
from memstore_gpt2.cli import main


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_store_commands_on_postgres(pg_url, tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q.npy", keys[:2])

    assert "0 collection(s)" in _run("init", pg_url)
    imported = json.loads(
        _run(
            "import",
            pg_url,
            "facts",
            "--keys",
            str(tmp_path / "k.npy"),
            "--metric",
            "ip",
            "--index",
            "rescore-bit",
            "--json",
        )  # fmt: skip
    )
    assert imported["inserted"] == 300 and imported["rows"] == 300
    hits = json.loads(_run("query", pg_url, "facts", "--queries", str(tmp_path / "q.npy"),
                           "-k", "3", "--json"))  # fmt: skip
    expected = np.argsort(-(keys[:2] @ keys.T), axis=1)[:, :3]
    assert hits["ids"] == expected.tolist()
    pruned = json.loads(_run("prune", pg_url, "facts", "--capacity", "100", "--json"))
    assert pruned["rows_after"] == 100 and pruned["evicted"] == 200
    assert "facts: 100 rows" in _run("inspect", pg_url)
    assert "already at schema" in _run("upgrade", pg_url)


def test_cli_error_on_postgres_is_one_line(pg_url, tmp_path):
    Store(pg_url).close()
    np.save(tmp_path / "q.npy", np.ones((1, 4), np.float32))
    result = CliRunner().invoke(
        main, ["query", pg_url, "missing", "--queries", str(tmp_path / "q.npy"), "-k", "1"]
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no collection named 'missing'"


@pytest.mark.slow
def test_distill_gpt2_with_memory_in_postgres(pg_url, tmp_path):
    pytest.importorskip("torch")
    from memstore_gpt2.teacher import TeacherSpec, train_teacher
    from memstore_gpt2.text_data import python_docs_corpus

    texts = python_docs_corpus()[:6]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts), encoding="utf-8")
    spec = TeacherSpec(layers=2, width=32, heads=2, context=32, inner=128, vocab=384, steps=5,
                       batch_size=4, lr=1e-2, warmup=1, dropout=0.0, seed=0)  # fmt: skip
    train_teacher(texts, tmp_path / "teacher", spec, progress=False)

    common = ["distill", "gpt2", "--teacher", str(tmp_path / "teacher"), "--data", str(corpus),
              "--db", pg_url, "--out", str(tmp_path / "student"), "--k", "16", "--context", "32",
              "--batch-size", "4", "--eval-blocks", "2", "--checkpoint-every", "2", "--json"]  # fmt: skip
    first = json.loads(_run(*common, "--steps", "2").strip().splitlines()[-1])
    assert first["steps"] == 2 and first["db"] == pg_url
    resumed = json.loads(_run(*common, "--steps", "4", "--resume").strip().splitlines()[-1])
    assert resumed["steps"] == 4

    with Store(pg_url) as store:
        collections = {c.name: c for c in store.list_collections()}
        assert len(collections) == 2  # one memory collection per replaced block
        for coll in collections.values():
            rows = coll.export_rows()
            assert len(rows) == 128  # the MLP's n_inner rows, written by flush()
            assert np.isfinite(rows.keys).all() and np.isfinite(rows.values).all()

    text = _run("generate", str(tmp_path / "student"), "--prompt", "The", "--max-new-tokens", "4",
                "--seed", "0")  # fmt: skip
    assert text.strip()
