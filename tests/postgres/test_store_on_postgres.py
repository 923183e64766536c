"""The whole Store API on PostgreSQL behaves exactly like on SQLite, transactionally, migrated."""

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from memstore import RowBlock, Store, migrate
from memstore.errors import DatabaseError, SchemaTooNewError
from memstore.naming import ROWS_PREFIX, rows_table


def _scenario(store: Store, metric: str) -> dict:
    """A fixed mix of every Collection operation; returns everything observable."""
    rng = np.random.default_rng(7)
    out = {}
    coll = store.create_collection("mem", key_dim=8, value_dim=5, metric=metric, lrfu_lambda=0.4)
    keys = rng.standard_normal((60, 8)).astype(np.float32)
    keys[20:24] = keys[10:14] + 0.01 * rng.standard_normal((4, 8)).astype(np.float32)  # near-dupes
    values = rng.standard_normal((60, 5)).astype(np.float32)
    out["ids"] = coll.insert(keys, values)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    out["search"] = coll.search(queries, 7)
    out["search2"] = coll.search(queries[:3], 4, touch=False)
    coll.update([3, 5], keys=rng.standard_normal((2, 8)).astype(np.float32))
    coll.update([4], values=np.ones((1, 5), np.float32))
    out["deleted"] = coll.delete([0, 1, 2, 999])
    out["evicted"] = coll.evict(45)
    out["merged"] = coll.search(keys[10:14] + 1e-3, 3, recombine=0.5)
    out["novel"] = coll.search(
        rng.standard_normal((2, 8)).astype(np.float32) * 10,
        2,
        novel=-1e9 if metric == "ip" else 0.1,  # ip distances are negative: -(q . k)
        novel_values=np.full((2, 5), 3.0, np.float32),
    )
    block = coll.export_rows()
    upserts = block.take(np.arange(3))
    upserts.crf = upserts.crf + 1.5
    upserts.values = upserts.values * 2
    fresh = RowBlock.fresh(np.array([500, 501]), keys[:2], values[:2], 3)
    coll.apply_changes(
        RowBlock.concat([upserts, fresh]),
        deletes=block.ids[5:7],
        clock=40,
        counters={"inserts": 2, "evictions": 2},
    )
    out["get"] = coll.get([501, int(block.ids[0])])
    out["export"] = coll.export_rows()
    out["stats"] = coll.stats()
    out["len"] = len(coll)
    out["clock"] = coll.clock
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_every_operation_matches_sqlite(tmp_path, pg_url, metric):
    with Store(f"sqlite:///{tmp_path / 'ref.db'}") as reference, Store(pg_url) as pg:
        expected = _scenario(reference, metric)
        got = _scenario(pg, metric)
    # The scenario really exercises recombination, novelty and eviction.
    assert expected["merged"].changes["recombinations"] > 0
    assert expected["novel"].changes["novel_inserts"] > 0
    assert len(expected["evicted"]) > 0
    for name in ("ids", "deleted", "evicted", "len", "clock"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for name in ("search", "search2", "merged", "novel"):
        np.testing.assert_array_equal(got[name].ids, expected[name].ids, err_msg=name)
        np.testing.assert_allclose(
            got[name].distances, expected[name].distances, rtol=1e-5, atol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-6)
        assert got[name].changes == expected[name].changes
    for name in ("get", "export"):
        for field in ("ids", "last_tick", "hits", "created_tick"):
            np.testing.assert_array_equal(getattr(got[name], field), getattr(expected[name], field))
        for field in ("keys", "values", "crf"):
            np.testing.assert_allclose(
                getattr(got[name], field), getattr(expected[name], field), rtol=1e-6, atol=1e-6
            )
    got_stats = {k: v for k, v in got["stats"].items() if k != "score"}
    expected_stats = {k: v for k, v in expected["stats"].items() if k != "score"}
    assert got_stats == expected_stats
    for key in ("min", "mean", "max"):
        assert got["stats"]["score"][key] == pytest.approx(expected["stats"]["score"][key])


def test_a_failing_batch_leaves_the_collection_untouched(pg_store, monkeypatch):
    coll = pg_store.create_collection("c", key_dim=4)
    coll.insert(np.eye(4, dtype=np.float32))
    before = coll.export_rows()

    def broken_insert(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pg_store.backend, "insert_rows", broken_insert)
    upserts = RowBlock.fresh(
        np.array([10]), np.ones((1, 4), np.float32), np.ones((1, 4), np.float32), 0
    )
    with pytest.raises(RuntimeError):
        coll.apply_changes(upserts, deletes=[0, 1], clock=9, counters={"inserts": 1})
    monkeypatch.undo()
    after = coll.export_rows()
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.keys, before.keys)
    assert coll.clock == 0 and coll.stats()["inserts"] == 4


def test_drop_collection_removes_its_table(pg_store, pg_url):
    coll = pg_store.create_collection("gone", key_dim=4)
    table = rows_table(coll.spec)
    pg_store.drop_collection("gone")
    with pg_store.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT to_regclass('{table}')").scalar() is None


def test_schema_matches_the_migrations_and_runtime_tables_are_invisible(pg_store):
    """`alembic check` through memstore's own env.py: no diff between the migrated PostgreSQL
    schema and the metadata, although collections' rows_<id> tables and indexes exist."""
    pg_store.create_collection("a", key_dim=4)
    pg_store.create_collection("b", key_dim=3, metric="ip")
    config = migrate.alembic_config()
    with pg_store.engine.connect() as conn:
        config.attributes["connection"] = conn
        command.check(config)  # raises AutogenerateDiffsDetected on any difference
        tables = set(sa.inspect(conn).get_table_names())
    assert {"memstore_collections", "alembic_version"} <= tables
    assert len([t for t in tables if t.startswith(f"{ROWS_PREFIX}_")]) == 2


def test_newer_schema_is_refused(pg_url):
    Store(pg_url).close()
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    engine.dispose()
    with pytest.raises(SchemaTooNewError):
        Store(pg_url)


def test_a_foreign_database_is_not_touched(pg_url):
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id int)")
    engine.dispose()
    with pytest.raises(DatabaseError, match="not a memstore database"):
        Store(pg_url)
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        extension = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_extension WHERE extname = 'vector'"
        ).scalar()
    engine.dispose()
    assert tables == {"customers"} and extension == 0  # nothing created, nothing installed


def test_a_role_that_cannot_install_pgvector_is_told_what_to_ask_for(pg_url):
    admin = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP ROLE IF EXISTS memstore_weak_role")
            conn.exec_driver_sql("CREATE ROLE memstore_weak_role LOGIN")
            conn.exec_driver_sql("GRANT CREATE ON SCHEMA public TO memstore_weak_role")
    except sa.exc.ProgrammingError as exc:  # an external test server may not allow CREATE ROLE
        admin.dispose()
        pytest.skip(f"the test server's role cannot create roles: {exc.orig}")
    weak_url = (
        sa.make_url(pg_url)
        .set(username="memstore_weak_role", password=None)
        .render_as_string(hide_password=False)
    )
    try:
        with pytest.raises(DatabaseError, match="CREATE EXTENSION vector"):
            Store(weak_url)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP OWNED BY memstore_weak_role")
            conn.exec_driver_sql("DROP ROLE memstore_weak_role")
        admin.dispose()


def test_a_read_only_server_serves_reads_and_refuses_touches_clearly(pg_url):
    """What a read replica (hot standby) allows, simulated with default_transaction_read_only,
    passed through the URL's libpq ``options`` as a user would."""
    with Store(pg_url) as store:
        coll = store.create_collection("served", key_dim=4, metric="ip")
        coll.insert(np.eye(4, dtype=np.float32))
    read_only = pg_url + "&options=-c%20default_transaction_read_only%3Don"
    with Store(read_only) as replica:
        served = replica.collection("served")
        hits = served.search(np.eye(4, dtype=np.float32)[:2], 1, touch=False)
        assert hits.ids[:, 0].tolist() == [0, 1]
        assert len(served.export_rows()) == 4 and served.stats()["rows"] == 4
        with pytest.raises(DatabaseError, match="read-only transaction"):
            served.search(np.eye(4, dtype=np.float32)[:1], 1)  # an LRFU touch is a write
        with pytest.raises(DatabaseError, match="read-only transaction"):
            served.insert(np.ones((1, 4), np.float32))
    with Store(pg_url) as store:
        assert store.collection("served").clock == 0 and len(store.collection("served")) == 4
