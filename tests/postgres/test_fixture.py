"""The test-started server really is PostgreSQL with pgvector, reachable through a socket URL."""

import psycopg


def test_fresh_database_is_empty_and_has_pgvector_available(pg_url):
    assert pg_url.startswith("postgresql://")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()[0]
        assert tables == 0
        available = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
        assert available is not None


def test_each_test_gets_its_own_database(postgres_server, pg_url):
    other = postgres_server.create_database()
    try:
        assert other != pg_url
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (x int)")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass('marker')").fetchone()[0]
        assert found is None
    finally:
        postgres_server.drop_database(other)
