"""PostgreSQL for the tests: a database of this run's own on a real server.

The server is ``$UPVOOT_TEST_POSTGRESQL`` (a libpq URL of a database to
connect to for creating others; default
``postgresql://postgres@127.0.0.1:5432/postgres``, which CI machines
provide). The run creates ``upvoot_test_<random>`` on it and drops it at
the end, so runs never see each other's data. ``UPVOOT_TEST_POSTGRESQL=off``
skips the PostgreSQL tests; a server that cannot be reached fails them, with
the reason, instead of skipping them quietly.

Fixtures (registered in ``tests/conftest.py``):

- ``pg_url``: the URL of this run's database, emptied for the test (no
  tables: the first ``store.connect`` creates the schema, as in production);
- ``any_database``: parametrized ``sqlite`` / ``postgresql``: a fresh
  SQLite file path or ``pg_url``; a test taking it runs on both;
- ``pg_admin``: an autocommit psycopg connection to this run's database.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "UPVOOT_TEST_POSTGRESQL"
DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    return os.environ.get(ENV, "").strip() or DEFAULT


def with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_database():
    """Session: (URL of this run's database, its name)."""
    url = server_url()
    if url.lower() == "off":
        pytest.skip(f"PostgreSQL tests off ({ENV}=off)")
    import psycopg

    from upvoot.ledger.backends import redact

    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        pytest.fail(f"PostgreSQL server {redact(url)} ({ENV}) cannot be reached: {' '.join(str(e).split())};"
                    f" start one, point {ENV} at one, or set {ENV}=off to skip these tests", pytrace=False)
    name = "upvoot_test_" + secrets.token_hex(5)
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
    try:
        yield with_dbname(url, name), name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_admin(pg_database):
    import psycopg

    conn = psycopg.connect(pg_database[0], autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def pg_url(pg_database, pg_admin):
    """This run's database, empty: no other session on it, no tables."""
    _, name = pg_database
    pg_admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    pg_admin.execute("DROP SCHEMA public CASCADE")
    pg_admin.execute("CREATE SCHEMA public")
    return pg_database[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, tmp_path):
    """A fresh database of each kind: an SQLite file path, or ``pg_url``."""
    if request.param == "sqlite":
        return str(tmp_path / "upvoot.sqlite3")
    return request.getfixturevalue("pg_url")


__all__ = ["DEFAULT", "ENV", "any_database", "pg_admin", "pg_database", "pg_url", "server_url", "with_dbname"]
