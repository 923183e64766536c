"""Every class of bad input gets a specific error naming the problem, and the database is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from memstore import Store, errors


@pytest.fixture
def filled(store, rng):
    coll = store.create_collection("good", key_dim=4, value_dim=2, metric="cosine")
    coll.insert(
        rng.standard_normal((5, 4)).astype(np.float32),
        rng.standard_normal((5, 2)).astype(np.float32),
    )
    return store, coll


def snapshot(store):
    state = []
    for coll in store.list_collections():
        rows = coll.export_rows()
        state.append(
            (
                coll.name,
                coll.stats(),
                rows.ids.tolist(),
                rows.keys.tobytes(),
                rows.values.tobytes(),
                rows.crf.tolist(),
                rows.hits.tolist(),
            )
        )
    return state


GOOD_KEYS = np.ones((2, 4), np.float32)
GOOD_VALUES = np.ones((2, 2), np.float32)

CASES = [
    # (description, call, expected error, message fragment)
    (
        "wrong key dim",
        lambda c: c.insert(np.ones((2, 5), np.float32), GOOD_VALUES),
        errors.DimensionMismatchError,
        "dimension 5",
    ),
    (
        "wrong value dim",
        lambda c: c.insert(GOOD_KEYS, np.ones((2, 3), np.float32)),
        errors.DimensionMismatchError,
        "dimension 3",
    ),
    (
        "value rows",
        lambda c: c.insert(GOOD_KEYS, np.ones((3, 2), np.float32)),
        errors.InvalidInputError,
        "3 rows",
    ),
    (
        "NaN key",
        lambda c: c.insert(np.array([[1, np.nan, 0, 0]] * 2, np.float32), GOOD_VALUES),
        errors.InvalidInputError,
        "NaN",
    ),
    (
        "inf value",
        lambda c: c.insert(GOOD_KEYS, np.array([[np.inf, 0]] * 2, np.float32)),
        errors.InvalidInputError,
        "inf",
    ),
    (
        "float64 overflow",
        lambda c: c.insert(np.full((2, 4), 1e300), GOOD_VALUES),
        errors.InvalidInputError,
        "inf",
    ),
    (
        "int keys",
        lambda c: c.insert(np.ones((2, 4), np.int64), GOOD_VALUES),
        errors.InvalidInputError,
        "floating-point",
    ),
    (
        "object keys",
        lambda c: c.insert(np.array([["a"] * 4] * 2, object), GOOD_VALUES),
        errors.InvalidInputError,
        "floating-point",
    ),
    (
        "1-D keys",
        lambda c: c.insert(np.ones(4, np.float32), GOOD_VALUES),
        errors.InvalidInputError,
        "2-D",
    ),
    (
        "3-D queries",
        lambda c: c.search(np.ones((1, 2, 4), np.float32), 1),
        errors.InvalidInputError,
        "2-D",
    ),
    (
        "empty insert",
        lambda c: c.insert(np.ones((0, 4), np.float32)),
        errors.InvalidInputError,
        "empty",
    ),
    (
        "empty search",
        lambda c: c.search(np.ones((0, 4), np.float32), 1),
        errors.InvalidInputError,
        "empty",
    ),
    ("empty delete", lambda c: c.delete([]), errors.InvalidInputError, "empty"),
    ("empty get", lambda c: c.get(np.array([], np.int64)), errors.InvalidInputError, "empty"),
    ("k zero", lambda c: c.search(GOOD_KEYS, 0), errors.InvalidInputError, "k must be"),
    ("k negative", lambda c: c.search(GOOD_KEYS, -3), errors.InvalidInputError, "k must be"),
    ("k float", lambda c: c.search(GOOD_KEYS, 2.5), errors.InvalidInputError, "k must be"),
    (
        "zero vector for cosine",
        lambda c: c.insert(np.zeros((2, 4), np.float32), GOOD_VALUES),
        errors.InvalidInputError,
        "zero vector",
    ),
    ("negative id", lambda c: c.delete([-1]), errors.InvalidInputError, ">= 0"),
    ("float ids", lambda c: c.get(np.array([1.5])), errors.InvalidInputError, "integers"),
    (
        "missing ids on update",
        lambda c: c.update([77], values=np.ones((1, 2), np.float32)),
        errors.RowNotFoundError,
        "77",
    ),
    (
        "duplicate ids on update",
        lambda c: c.update([1, 1], values=np.ones((2, 2), np.float32)),
        errors.InvalidInputError,
        "duplicates",
    ),
    ("update nothing", lambda c: c.update([1]), errors.InvalidInputError, "keys, values"),
    (
        "NaN recombine threshold",
        lambda c: c.search(GOOD_KEYS, 1, recombine=float("nan")),
        errors.InvalidInputError,
        "recombine must be a finite number",
    ),
    (
        "NaN novel threshold",
        lambda c: c.search(GOOD_KEYS, 1, novel=float("nan")),
        errors.InvalidInputError,
        "novel must be a finite number",
    ),
    (
        "inf novel threshold",
        lambda c: c.search(GOOD_KEYS, 1, novel=float("inf")),
        errors.InvalidInputError,
        "novel must be a finite number",
    ),
    (
        "negative cosine recombine threshold",
        lambda c: c.search(GOOD_KEYS, 1, recombine=-0.5),
        errors.InvalidInputError,
        "recombine must be >= 0: cosine distances are never negative",
    ),
    (
        "NaN recombine() threshold",
        lambda c: c.recombine(GOOD_KEYS, float("nan")),
        errors.InvalidInputError,
        "threshold must be a finite number",
    ),
    (
        "text novel threshold",
        lambda c: c.search(GOOD_KEYS, 1, novel="near"),
        errors.InvalidInputError,
        "novel must be a finite number",
    ),
    (
        "key beyond the norm bound",
        lambda c: c.insert(np.full((2, 4), 3e38, np.float32), GOOD_VALUES),
        errors.InvalidInputError,
        "keys row 0 has norm 6e\\+38, above the limit 2\\*\\*62",
    ),
    (
        "query beyond the norm bound",
        lambda c: c.search(np.array([[1, 1, 1, 1], [3e38, 0, 0, 0]], np.float32), 1),
        errors.InvalidInputError,
        "queries row 1 has norm 3e\\+38, above the limit 2\\*\\*62",
    ),
    (
        "updated key beyond the norm bound",
        lambda c: c.update([1], keys=np.full((1, 4), -1e19, np.float32)),
        errors.InvalidInputError,
        "keys row 0 has norm 2e\\+19",
    ),
    (
        "1-D query of the wrong length",
        lambda c: c.search(np.ones(5, np.float32), 1),
        errors.DimensionMismatchError,
        "dimension 5",
    ),
    (
        "NaN novel threshold values",
        lambda c: c.search(
            GOOD_KEYS, 1, novel=0.1, novel_values=np.full((2, 2), np.nan, np.float32)
        ),
        errors.InvalidInputError,
        "NaN",
    ),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_batch_input_is_rejected_and_changes_nothing(filled, call, error, fragment):
    store, coll = filled
    before = snapshot(store)
    with pytest.raises(error, match=fragment):
        call(coll)
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1abc",
        "a b",
        "x; DROP TABLE memstore_collections",
        "Robert'); --",
        "a" * 65,
        "é",
        None,
        5,
        "a/b",
    ],
)
def test_invalid_collection_names_are_rejected(filled, name):
    store, _ = filled
    before = snapshot(store)
    for call in (
        lambda: store.create_collection(name, key_dim=2),
        lambda: store.collection(name),
        lambda: store.drop_collection(name),
    ):
        with pytest.raises(errors.InvalidNameError, match="invalid collection name"):
            call()
    assert snapshot(store) == before


def test_unknown_collection(filled):
    store, _ = filled
    with pytest.raises(errors.CollectionNotFoundError, match="'nope'"):
        store.collection("nope")
    with pytest.raises(errors.CollectionNotFoundError):
        store.drop_collection("nope")


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"key_dim": 0}, "key_dim"),
        ({"key_dim": 4, "value_dim": -1}, "value_dim"),
        ({"key_dim": 4, "metric": "dot"}, "unknown metric"),
        ({"key_dim": 4, "index": "annoy"}, "unknown index"),
        ({"key_dim": 4, "lrfu_lambda": 1.5}, "lrfu_lambda"),
        ({"key_dim": 4, "capacity": 0}, "capacity"),
        ({"key_dim": 4, "oversample": 0}, "oversample"),
        ({"key_dim": 100_000}, "key_dim must be at most 65536 \\(2\\*\\*16"),
        ({"key_dim": 4, "value_dim": 10**9}, "value_dim must be at most 65536"),
    ],
)
def test_bad_collection_options(filled, options, fragment):
    store, _ = filled
    before = snapshot(store)
    with pytest.raises(errors.InvalidInputError, match=fragment):
        store.create_collection("new", **options)
    assert snapshot(store) == before and not store.has_collection("new")


def test_non_database_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    original = path.read_bytes()
    with pytest.raises(errors.DatabaseError, match="not a database"):
        Store(f"sqlite:///{path}")
    assert path.read_bytes() == original


def test_foreign_sqlite_database_is_left_alone(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    original = path.read_bytes()
    with pytest.raises(errors.DatabaseError, match="not a memstore database"):
        Store(f"sqlite:///{path}")
    assert path.read_bytes() == original


def test_unsupported_url():
    with pytest.raises(errors.DatabaseError, match="unsupported database"):
        Store("mysql://user@localhost/x")
    with pytest.raises(errors.DatabaseError, match="not a database URL"):
        Store("::::")


def test_missing_file_without_create(tmp_path):
    with pytest.raises(errors.DatabaseError, match="no database file"):
        Store(f"sqlite:///{tmp_path / 'absent.db'}", create=False)
    assert not (tmp_path / "absent.db").exists()
