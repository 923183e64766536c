"""A PostgreSQL + pgvector server that the test-suite starts for itself.

Registered from the root ``tests/conftest.py`` (``pytest_plugins``) so that every test directory can
ask for a PostgreSQL database the same way it asks for a temporary SQLite file:

* ``postgres_server`` (session) - the running server; ``create_database()`` hands out empty databases.
* ``postgres_url`` (session) - one database for the whole session (tests that share state on purpose).
* ``fresh_postgres_url`` (function) - a new, empty database for one test, dropped afterwards.
* ``shared_store`` (module, per backend in ``STORE_BACKENDS``) - one memstore Store on SQLite and
  one on PostgreSQL for a whole test module, for property tests that make their own collections.

Where the server comes from, in order:

1. ``MEMSTORE_TEST_POSTGRES_URL`` - an existing server (its role must be allowed to CREATE DATABASE
   and, unless pgvector is already installed in template1, to CREATE EXTENSION vector);
2. the ``pgserver`` package (PostgreSQL 16 + pgvector in a wheel), started in a temporary directory.
   When run as root, pgserver runs postgres as an unprivileged ``pgserver`` user it creates itself.

When neither works the PostgreSQL tests are skipped with the reason - except in CI (``CI`` set to a
true value), where a missing server is a failure, because CI must exercise this backend.

URLs handed to the tests are the plain ``postgresql://`` socket form on purpose
(``postgresql://postgres:@/db?host=/dir``): that is the form users copy from ``psql`` and the one
the store must accept.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import pytest

URL_ENV = "MEMSTORE_TEST_POSTGRES_URL"
#: The SQL backends the store's contract is tested on (``MEMSTORE_STORE_TESTS_PG=0``: SQLite only).
STORE_BACKENDS = ["sqlite"] + (
    [] if os.environ.get("MEMSTORE_STORE_TESTS_PG") == "0" else ["postgresql"]
)
_FALSE_VALUES = {"", "0", "false", "no", "off"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in _FALSE_VALUES


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI: CI has to prove the PostgreSQL backend works."""
    if _in_ci():
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server for the tests: {reason}")


def _with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database (keeps user, host, socket query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _plain_libpq_url(url: str) -> str:
    """psycopg.connect() wants ``postgresql://``, not SQLAlchemy's ``postgresql+psycopg://``."""
    scheme, sep, rest = url.partition("://")
    if "+" in scheme:
        scheme = scheme.split("+", 1)[0]
    return scheme + sep + rest


@dataclass
class PostgresTestServer:
    """A running server plus the databases the tests created on it (dropped at teardown)."""

    admin_url: str
    started_here: bool
    _created: list[str] = field(default_factory=list)
    _counter: itertools.count = field(default_factory=itertools.count)
    _version: int | None = None

    def _admin_execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(_plain_libpq_url(self.admin_url), autocommit=True) as conn:
            conn.execute(sql)

    def _server_version(self) -> int:
        if self._version is None:
            import psycopg

            with psycopg.connect(_plain_libpq_url(self.admin_url), autocommit=True) as conn:
                self._version = conn.info.server_version
        return self._version

    def create_database(self) -> str:
        """Create an empty database and return its plain ``postgresql://`` URL."""
        name = f"memstore_test_{os.getpid()}_{next(self._counter)}"
        self._admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        # FILE_COPY: a plain file copy of the tiny template, ~6x faster than WAL_LOG on PG 15+.
        strategy = " STRATEGY FILE_COPY" if self._server_version() >= 150000 else ""
        self._admin_execute(f'CREATE DATABASE "{name}"{strategy}')
        self._created.append(name)
        return _with_database(_plain_libpq_url(self.admin_url), name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by create_database, even if a test left connections open."""
        name = urlsplit(url).path.lstrip("/")
        if name not in self._created:
            raise ValueError(f"{name!r} was not created by this fixture; refusing to drop it")
        self._admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.remove(name)

    def drop_all(self) -> None:
        for name in list(self._created):
            try:
                self._admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # teardown must go on; report instead of hiding it
                warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
            self._created.remove(name)


def _start_pgserver(tmp_root: str):
    """Start a throw-away pgserver instance; returns (server handle, admin url)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
        warnings.simplefilter("ignore")
        import pgserver

    server = pgserver.get_server(tmp_root, cleanup_mode="delete")
    admin_url = server.get_uri()
    import psycopg

    # The data directory is scratch: durability only costs time here. All three are reloadable.
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
            conn.execute(f"ALTER SYSTEM SET {setting}")
        conn.execute("SELECT pg_reload_conf()")
    return server, admin_url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresTestServer]:
    external = os.environ.get(URL_ENV, "").strip()
    handle = None
    tmp_root = None
    try:
        import psycopg  # noqa: F401  (the driver the postgres extra installs)
    except ImportError as exc:
        _unavailable(f"psycopg is not installed ({exc}); pip install 'memstore[postgres]'")
    if external:
        server = PostgresTestServer(admin_url=external, started_here=False)
        try:
            server._admin_execute("SELECT 1")
        except Exception as exc:
            _unavailable(f"{URL_ENV} is set but the server does not answer: {exc}")
    else:
        try:
            # Short path: the Unix socket lives in the data directory (socket paths max ~100 chars).
            tmp_root = tempfile.mkdtemp(
                prefix="mspg-", dir="/tmp" if os.path.isdir("/tmp") else None
            )
            handle, admin_url = _start_pgserver(tmp_root)
        except ImportError as exc:
            _unavailable(f"set {URL_ENV} or pip install pgserver ({exc})")
        except Exception as exc:
            _unavailable(f"pgserver could not start PostgreSQL: {type(exc).__name__}: {exc}")
        server = PostgresTestServer(admin_url=admin_url, started_here=True)
    try:
        yield server
    finally:
        server.drop_all()
        if handle is not None:
            handle.cleanup()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresTestServer) -> str:
    """One empty database shared by the whole session."""
    return postgres_server.create_database()


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresTestServer) -> Iterator[str]:
    """A new, empty database for one test; dropped (forcefully) when the test ends."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="module", params=STORE_BACKENDS)
def shared_store(request, tmp_path_factory):
    """One store per backend for a whole test module; each example makes its own collections."""
    from memstore import Store

    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('shared') / 'store.db'}"
    with Store(url) as store:
        yield store
