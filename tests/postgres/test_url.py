"""Plain postgresql:// URLs work with psycopg 3; other drivers and bad servers get clear errors."""

import pytest
import sqlalchemy as sa

from memstore import Store
from memstore.backends.pg_connect import normalize_url
from memstore.errors import DatabaseError, DriverError


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:pw@host:5432/db",
        "postgres://user:pw@host/db",
        "postgresql+psycopg://user@host/db",
        "postgresql://user:@/db?host=/run/postgresql",
    ],
)
def test_plain_urls_map_to_psycopg3(url):
    out = normalize_url(url)
    assert out.drivername == "postgresql+psycopg"
    assert out.database == sa.make_url(url).database
    assert out.query == sa.make_url(url).query


def test_other_postgres_drivers_are_refused_with_the_fix():
    with pytest.raises(DriverError, match="psycopg 3"):
        normalize_url("postgresql+psycopg2://u@h/db")


def test_socket_form_url_opens_a_store(pg_url):
    assert "?host=/" in pg_url and pg_url.startswith("postgresql://")
    with Store(pg_url) as store:
        assert store.schema_revision() is not None
        assert store.list_collections() == []


def test_unreachable_server_is_a_database_error(tmp_path):
    url = f"postgresql://nobody:@/nodb?host={tmp_path}"
    with pytest.raises(DatabaseError, match="cannot connect"):
        Store(url)
