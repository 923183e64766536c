"""Schema creation, version checks (newer -> refuse, older -> `memstore upgrade`), Alembic hygiene."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from memstore import Store, errors, migrate
from memstore.schema import metadata


def test_new_file_is_created_at_head(tmp_path):
    path = tmp_path / "new.db"
    with Store(f"sqlite:///{path}") as store:
        assert store.schema_revision() == migrate.head_revision() == "0002_keys_stored_once"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_scripts_are_found_through_the_package():
    from importlib import resources

    location = resources.files("memstore.migrations")
    assert (location / "env.py").is_file() and (location / "versions" / "0001_initial.py").is_file()


def test_autogenerate_sees_no_difference_and_no_runtime_tables(store):
    """The catalog metadata equals the migration, and vec0 shadow tables are invisible."""
    for index in ("exact", "rescore-bit", "rescore-int8"):
        coll = store.create_collection(f"c_{index}", key_dim=8, metric="ip", index=index)
        coll.insert(np.ones((3, 8), np.float32))
    with store.read() as conn:
        names = set(sa.inspect(conn).get_table_names())
        if conn.dialect.name == "sqlite":  # sqlite-vec's shadow tables exist and must be ignored
            assert any(n.endswith("_chunks") for n in names) and any("rescore" in n for n in names)
        context = MigrationContext.configure(
            conn,
            opts={"include_name": migrate.include_name, "include_object": migrate.include_object},
        )
        assert compare_metadata(context, metadata) == []
    assert all(migrate.is_runtime_table(n) for n in names if n.startswith(("vec_", "rows_")))
    assert not migrate.is_runtime_table("memstore_collections")


def _set_revision(path, revision):
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    conn.close()  # the last connection to close checkpoints the WAL into the file


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    with Store(f"sqlite:///{path}") as store:
        store.create_collection("c", key_dim=2).insert(np.ones((1, 2), np.float32))
    _set_revision(path, "9999_from_the_future")
    original = path.read_bytes()
    with pytest.raises(errors.SchemaTooNewError, match="newer memstore"):
        Store(f"sqlite:///{path}")
    with pytest.raises(errors.SchemaTooNewError):
        Store(f"sqlite:///{path}", upgrade=True)
    assert path.read_bytes() == original


def test_older_schema_needs_upgrade(tmp_path):
    """A database at the base revision (version table, no catalog) is 'older than the code'."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    with pytest.raises(errors.SchemaOutdatedError, match="memstore upgrade"):
        Store(f"sqlite:///{path}")
    with Store(f"sqlite:///{path}", upgrade=True) as store:
        assert store.schema_revision() == migrate.head_revision()
        store.create_collection("c", key_dim=2)
    with Store(f"sqlite:///{path}") as store:
        assert [c.name for c in store.list_collections()] == ["c"]


def _empty_version_table(url: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM alembic_version"))
    engine.dispose()


def test_an_emptied_version_table_is_restored_by_upgrade(db_url, rng):
    """An emptied ``alembic_version`` in front of memstore's tables: plain open asks for an
    upgrade, the upgrade checks the catalog against the latest revision and records it; no row
    is lost (before the fix the upgrade re-ran the first migration: 'table ... already exists')."""
    keys = rng.standard_normal((20, 4)).astype(np.float32)
    with Store(db_url) as store:
        store.create_collection("c", key_dim=4, metric="ip").insert(keys)
    _empty_version_table(db_url)
    with pytest.raises(
        errors.SchemaOutdatedError, match="empty 'alembic_version'.*memstore upgrade"
    ):
        Store(db_url)
    with Store(db_url, upgrade=True) as store:
        assert store.schema_revision() == migrate.head_revision()
        coll = store.collection("c")
        assert len(coll) == 20 and coll.stats()["inserts"] == 20
        np.testing.assert_array_equal(coll.get(list(range(20))).keys, keys)
        coll.insert(keys[:2])
    with Store(db_url) as store:  # opens without upgrade from now on
        assert len(store.collection("c")) == 22


def test_upgrade_command_restores_an_emptied_version_table(tmp_path):
    from click.testing import CliRunner

    from memstore_gpt2.cli import main

    url = f"sqlite:///{tmp_path / 'm.db'}"
    with Store(url) as store:
        store.create_collection("c", key_dim=2).insert(np.ones((3, 2), np.float32))
    _empty_version_table(url)
    out = CliRunner().invoke(main, ["upgrade", url, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["to"] == migrate.head_revision()
    assert len(Store(url).collection("c")) == 3


def test_an_emptied_version_table_with_a_changed_catalog_is_refused_untouched(tmp_path):
    """If the catalog is not exactly the latest revision's, its revision cannot be told: the
    upgrade refuses with a repair hint and writes nothing."""
    path = tmp_path / "changed.db"
    with Store(f"sqlite:///{path}") as store:
        store.create_collection("c", key_dim=2).insert(np.ones((1, 2), np.float32))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM alembic_version")
        conn.execute("ALTER TABLE memstore_collections ADD COLUMN from_elsewhere INTEGER")
    conn.close()
    original = path.read_bytes()
    with pytest.raises(errors.DatabaseError, match="revision cannot be told.*INSERT INTO"):
        Store(f"sqlite:///{path}", upgrade=True)
    assert path.read_bytes() == original


def test_an_emptied_version_table_without_the_catalog_is_refused_untouched(tmp_path):
    """Other tables behind an empty version table and no catalog: not ours to migrate."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes VALUES (1, 'keep me')")
    conn.close()
    original = path.read_bytes()
    with pytest.raises(errors.DatabaseError, match="refusing to modify it"):
        Store(f"sqlite:///{path}", upgrade=True)
    assert path.read_bytes() == original


def test_a_file_of_the_first_revision_upgrades_and_its_rows_read(tmp_path, rng):
    """A file at ``0001_initial`` (every key and value in the row table) is asked to upgrade;
    ``0002_keys_stored_once`` rewrites nothing, and its rows read the same afterwards."""
    path = tmp_path / "first.db"
    keys = rng.standard_normal((6, 4)).astype(np.float32)
    values = rng.standard_normal((6, 4)).astype(np.float32)
    with Store(f"sqlite:///{path}") as store:
        ids = store.create_collection("c", key_dim=4, value_dim=4).insert(keys, values)
    conn = sqlite3.connect(path)
    with conn:  # the first revision's layout: both blobs in the row table
        (table,) = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'rows_%'")
        ]
        conn.executemany(
            f"UPDATE {table} SET key = ?, value = ? WHERE id = ?",
            [(k.tobytes(), v.tobytes(), int(i)) for k, v, i in zip(keys, values, ids, strict=True)],
        )
    conn.close()
    _set_revision(path, "0001_initial")
    with pytest.raises(errors.SchemaOutdatedError, match="memstore upgrade"):
        Store(f"sqlite:///{path}")
    with Store(f"sqlite:///{path}", upgrade=True) as store:
        assert store.schema_revision() == "0002_keys_stored_once"
        rows = store.collection("c").export_rows()
        np.testing.assert_array_equal(rows.keys, keys)
        np.testing.assert_array_equal(rows.values, values)
        assert store.collection("c").search(keys[:1], 1, touch=False).ids[0, 0] == ids[0]
