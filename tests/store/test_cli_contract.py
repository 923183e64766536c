"""The CLI keeps the API's contract: `query` pads like `search`, `prune` always gives free space
back, and a usage mistake is a one-line error like every other."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from memstore import Store
from memstore_gpt2.cli import main


@pytest.fixture
def db(tmp_path, rng):
    path = tmp_path / "m.db"
    with Store(path) as store:
        store.create_collection("c", key_dim=8).insert(
            rng.standard_normal((3, 8)).astype(np.float32)
        )
    np.save(tmp_path / "q.npy", rng.standard_normal((2, 8)).astype(np.float32))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_query_beyond_the_rows_pads_as_the_api_does(db, tmp_path):
    queries = np.load(tmp_path / "q.npy")
    out = invoke("query", db, "c", "--queries", tmp_path / "q.npy", "-k", 5, "--json", "--no-touch")
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    with Store(db) as store:
        expected = store.collection("c").search(queries, 5, touch=False)
    assert payload["ids"] == expected.ids.tolist()
    assert np.array(payload["ids"]).shape == (2, 5)
    assert [row[3:] for row in payload["ids"]] == [[-1, -1], [-1, -1]]
    assert [row[3:] for row in payload["distances"]] == [[None, None], [None, None]]  # +inf
    np.testing.assert_allclose(
        [row[:3] for row in payload["distances"]], expected.distances[:, :3], rtol=1e-6
    )
    text = invoke("query", db, "c", "--queries", tmp_path / "q.npy", "-k", 4)
    assert text.exit_code == 0, text.output
    assert all(line.endswith("-1:inf") for line in text.output.splitlines())


def test_prune_gives_free_space_back_even_when_it_evicts_nothing(tmp_path, rng):
    """Space freed outside prune (deletes, or a prune killed before its VACUUM) is returned by
    the next prune, whatever it evicts."""
    path = tmp_path / "free.db"
    with Store(path) as store:
        coll = store.create_collection("c", key_dim=64)
        coll.insert(rng.standard_normal((20_000, 64)).astype(np.float32))
        coll.delete(np.arange(19_000))
    size_before = os.path.getsize(path)  # closed: the WAL was checkpointed into the file
    out = invoke("prune", path, "c", "--capacity", 1_000_000, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["evicted"] == 0 and report["rows_after"] == 1_000
    assert report["size_after"] < report["size_before"] / 4
    assert os.path.getsize(path) < size_before / 4
    dry = json.loads(invoke("prune", path, "c", "--capacity", 10, "--dry-run", "--json").output)
    assert dry["size_after"] == dry["size_before"] and dry["rows_after"] == 1_000


def test_prune_without_a_limit_is_a_one_line_error(db):
    out = invoke("prune", db, "c")
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == [
        "Error: give exactly one of --capacity N or --min-score S"
    ]
