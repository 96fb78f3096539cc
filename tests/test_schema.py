"""upvoot.ledger.schema: the versioned schema on both databases, ``upvoot db
upgrade`` / ``db version``, and the refusals of an older or newer schema."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from tests.daemon import Daemon, shipped_ini
from upvoot.cli import run
from upvoot.ledger import backends, schema, store
from upvoot.ledger.store import StoreError

T0 = 1_700_000_000.0

INI = """\
[upvoot]
database = {database}

[agent:demo]
greeting = Hello!
"""


def cli(capsys, ini, *argv):
    status = run(["--config", str(ini), *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def ini_for(tmp_path, monkeypatch):
    monkeypatch.delenv("UPVOOT_CONFIG", raising=False)

    def make(database):
        ini = tmp_path / "upvoot.ini"
        ini.write_text(INI.format(database=database))
        return ini

    return make


def make_version_1(path: str) -> None:
    """An SQLite ledger as UpVoot wrote it before schema version 2."""
    conn = sqlite3.connect(path)
    for statement in schema.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO accounts VALUES ('acme', 42, ?)", (T0,))
    conn.execute("INSERT INTO api_keys VALUES ('uvk_AbCdEfGh', 'hash', 'acme', 'demo', ?, NULL)", (T0,))
    conn.execute("INSERT INTO calls (call_id, state, key_prefix, account, agent, provider, started_at, heartbeat_at,"
                 " ended_at, duration, end_reason, points_charged, transcript) VALUES ('c1', 'settled',"
                 " 'uvk_AbCdEfGh', 'acme', 'demo', 'raw', ?, ?, ?, 61.5, 'hangup', 2, '[]')", (T0, T0 + 61.5, T0 + 61.5))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def version_row(conn):
    return store.transact(conn, lambda txn: txn.execute("SELECT version FROM schema_version").fetchall())


# -- a new database ----------------------------------------------------------------


def test_an_empty_database_is_created_at_the_current_version(any_database):
    conn = store.connect(any_database)
    try:
        assert version_row(conn) == [(schema.SCHEMA_VERSION,)]
        if not store.is_postgresql(any_database):
            assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    finally:
        conn.close()
    store.connect(any_database).close()  # reopening changes nothing
    conn = store.connect(any_database)
    assert version_row(conn) == [(schema.SCHEMA_VERSION,)]
    conn.close()


def test_postgresql_gets_the_same_tables_in_its_own_types(pg_url, pg_admin):
    store.connect(pg_url).close()
    columns = dict(((t, c), (d, coll)) for t, c, d, coll in pg_admin.execute(
        "SELECT table_name, column_name, data_type, collation_name FROM information_schema.columns"
        " WHERE table_schema = 'public'").fetchall())
    assert columns[("calls", "started_at")] == ("double precision", None)
    assert columns[("accounts", "points")] == ("bigint", None)  # SQLite's INTEGER is 64-bit
    assert columns[("accounts", "reserved")] == ("bigint", None)
    assert columns[("api_keys", "prefix")] == ("text", "C")  # byte order, as SQLite compares
    assert {t for t, _ in columns} == {"accounts", "api_keys", "calls", "schema_version"}
    conn = store.connect(pg_url)
    sqlite_columns = sqlite3.connect(":memory:")
    for migration in schema.MIGRATIONS:
        for statement in migration:
            sqlite_columns.execute(schema.statement_for(backends.SQLITE, statement))
    for table in schema.TABLES:
        expected = [row[1] for row in sqlite_columns.execute(f"PRAGMA table_info({table})")]
        assert [c for (t, c) in columns if t == table] != [] and set(c for (t, c) in columns if t == table) == set(expected)
    conn.close()
    indexes = dict(pg_admin.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'").fetchall())
    assert "WHERE (state = 'active'::text)" in indexes["calls_active"]


def test_two_nodes_creating_one_postgresql_database_at_once_both_start(pg_url, pg_admin):
    for _ in range(3):
        pg_admin.execute("DROP SCHEMA public CASCADE")
        pg_admin.execute("CREATE SCHEMA public")
        barrier, errors = threading.Barrier(3), []

        def start():
            try:
                barrier.wait()
                store.connect(pg_url).close()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert pg_admin.execute("SELECT version FROM schema_version").fetchall() == [(schema.SCHEMA_VERSION,)]


# -- an older database: refused until `upvoot db upgrade` ------------------------------


def test_a_version_1_file_is_refused_until_upgraded(tmp_path, capsys, ini_for):
    path = str(tmp_path / "upvoot.sqlite3")
    make_version_1(path)
    ini = ini_for(path)
    with pytest.raises(StoreError, match=rf"database {path} has schema version 1; .* run 'upvoot db upgrade'"):
        store.connect(path)
    with pytest.raises(StoreError, match="upvoot db upgrade"):
        store.Store(path).start()  # the daemon's start
    status, out, err = cli(capsys, ini, "keys", "list")
    assert (status, out) == (1, "") and "run 'upvoot db upgrade'" in err and err.count("\n") == 1
    assert cli(capsys, ini, "db", "version")[:2] == (0, "1\n")

    status, out, err = cli(capsys, ini, "db", "upgrade")
    assert (status, out) == (0, f"{path}: upgraded from schema version 1 to {schema.SCHEMA_VERSION}\n")
    assert cli(capsys, ini, "db", "version")[:2] == (0, f"{schema.SCHEMA_VERSION}\n")
    assert cli(capsys, ini, "db", "upgrade")[1] == f"{path}: schema version {schema.SCHEMA_VERSION}, nothing to do\n"

    conn = store.connect(path)
    try:
        assert store.transact(conn, store.get_account, "acme")["points"] == 42
        [call] = store.transact(conn, store.list_calls)
        assert (call["call_id"], call["duration"], call["points_charged"], call["state"]) == ("c1", 61.5, 2, "settled")
        assert conn.execute("SELECT kind, expires_at, used_at FROM api_keys").fetchall() == [("api", None, None)]
        assert conn.execute("SELECT reserved FROM accounts").fetchall() == [(0,)]
        assert conn.execute("SELECT node, reserved FROM calls").fetchall() == [("", 0)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    finally:
        conn.close()


def test_db_upgrade_creates_an_empty_database(any_database, capsys, ini_for):
    status, out, _ = cli(capsys, ini_for(any_database), "db", "upgrade")
    assert (status, out) == (0, f"{any_database}: created at schema version {schema.SCHEMA_VERSION}\n")
    conn = store.connect(any_database)
    assert version_row(conn) == [(schema.SCHEMA_VERSION,)]
    conn.close()


# -- a newer database: refused ------------------------------------------------------------


def test_a_newer_schema_is_refused_on_both(any_database, capsys, ini_for):
    conn = store.connect(any_database)
    store.transact(conn, lambda txn: txn.execute("UPDATE schema_version SET version = 99"))
    conn.close()
    with pytest.raises(StoreError, match="schema version 99; this UpVoot knows up to .*: upgrade UpVoot"):
        store.connect(any_database)
    ini = ini_for(any_database)
    status, out, err = cli(capsys, ini, "db", "upgrade")
    assert status == 1 and "upgrade UpVoot" in err
    assert cli(capsys, ini, "db", "version")[:2] == (0, "99\n")


def test_a_postgresql_database_with_tables_but_no_version_is_refused(pg_url, pg_admin):
    pg_admin.execute("CREATE TABLE accounts (name TEXT PRIMARY KEY)")
    with pytest.raises(StoreError, match="cannot use database .*UpVoot's tables but no schema version"):
        store.connect(pg_url)


def test_a_password_in_the_url_is_in_no_message(pg_url, capsys, ini_for):
    url = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    conn = store.connect(url)
    store.transact(conn, lambda txn: txn.execute("UPDATE schema_version SET version = 99"))
    conn.close()
    with pytest.raises(StoreError) as e:
        store.connect(url)
    assert "s3cret-pw" not in str(e.value) and "postgres:***@" in str(e.value)
    for argv in (["db", "upgrade"], ["db", "version"], ["keys", "list"]):
        _, out, err = cli(capsys, ini_for(url), *argv)
        assert "s3cret-pw" not in out + err


@pytest.mark.slow
def test_the_daemon_refuses_to_start_on_an_older_schema(tmp_path):
    make_version_1(str(tmp_path / "upvoot.sqlite3"))
    d = Daemon(tmp_path, shipped_ini())
    with pytest.raises(RuntimeError) as e:
        d.start(timeout=60)
    text = str(e.value)
    assert "daemon exited 1" in text
    assert f"database {tmp_path / 'upvoot.sqlite3'} has schema version 1" in text
    assert "run 'upvoot db upgrade'" in text
