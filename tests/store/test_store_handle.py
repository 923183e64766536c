"""The Store object itself: what it accepts as a database (the same as the CLI), and that a closed
store stays closed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from memstore import Store, errors
from memstore.url import normalise_url


def test_a_bare_path_or_a_pathlib_path_is_a_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Store("rel.db") as store:
        store.create_collection("c", key_dim=2)
    with Store(Path("rel.db")) as store:
        assert store.has_collection("c")
    with Store(tmp_path / "rel.db") as store:
        assert store.has_collection("c")
        assert str(store.url) == f"sqlite:///{tmp_path / 'rel.db'}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["rel.db"]


def test_the_store_and_the_cli_read_urls_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = str(Path("~").expanduser())
    assert normalise_url("x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert normalise_url(Path("x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    assert normalise_url("~/x.db") == f"sqlite:///{os.path.join(home, 'x.db')}"
    for url in ("sqlite:///a.db", "sqlite://", "postgresql://u@h/db"):
        assert normalise_url(url) == url
    for bad in ("", "sqlite:/x.db", "::::"):
        with pytest.raises(errors.DatabaseError, match="not a database URL"):
            Store(bad)
    assert list(tmp_path.iterdir()) == []  # no file named after a mistyped URL


def test_a_closed_store_raises_instead_of_reopening(tmp_path):
    store = Store(tmp_path / "c.db")
    coll = store.create_collection("c", key_dim=2)
    coll.insert(np.ones((2, 2), np.float32))
    store.close()
    store.close()  # closing twice is fine
    assert store.closed
    calls = [
        lambda: store.collection("c"),
        lambda: store.list_collections(),
        lambda: store.create_collection("d", key_dim=2),
        lambda: store.size_bytes(),
        lambda: store.schema_revision(),
        lambda: store.upgrade(),
        lambda: len(coll),
        lambda: coll.insert(np.ones((1, 2), np.float32)),
        lambda: coll.search(np.ones((1, 2), np.float32), 1),
        lambda: coll.compact(),
        lambda: store.__enter__(),
    ]
    for call in calls:
        with pytest.raises(errors.StoreClosedError, match="is closed"):
            call()
    with Store(tmp_path / "c.db") as again:
        assert len(again.collection("c")) == 2 and not again.has_collection("d")


def test_a_read_only_store_refuses_writes_clearly(tmp_path):
    path = tmp_path / "r.db"
    with Store(path) as store:
        store.create_collection("c", key_dim=2).insert(np.ones((2, 2), np.float32))
    before = path.read_bytes()
    with Store(path, read_only=True) as store:
        coll = store.collection("c")
        assert len(coll) == 2 and coll.search(np.ones((1, 2)), 1, touch=False).ids[0, 0] >= 0
        for call in (
            lambda: coll.insert(np.ones((1, 2), np.float32)),
            lambda: coll.search(np.ones((1, 2), np.float32), 1),  # a touch is a write
            lambda: store.create_collection("d", key_dim=2),
            lambda: coll.compact(),
        ):
            with pytest.raises(errors.DatabaseError, match="read_only"):
                call()
    assert path.read_bytes() == before
    with pytest.raises(errors.DatabaseError, match="no database file"):
        Store(tmp_path / "absent.db", read_only=True)
    assert not (tmp_path / "absent.db").exists()
