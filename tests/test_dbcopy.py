"""``upvoot db copy --to``: an SQLite ledger into PostgreSQL, row for row,
and the copy answers the operator's commands exactly as the original."""

from __future__ import annotations

import json

import pytest

from upvoot.cli import run
from upvoot.ledger import dbcopy, schema, store
from upvoot.ledger.store import CallRecord, CallStart

T0 = 1_700_000_000.123456789

INI = """\
[upvoot]
database = {database}

[agent:demo]
greeting = Hello!

[agent:sales]
greeting = Hi.
"""


@pytest.fixture
def source(tmp_path, monkeypatch):
    """An SQLite ledger with a bit of everything, and its ini."""
    monkeypatch.delenv("UPVOOT_CONFIG", raising=False)
    path = str(tmp_path / "upvoot.sqlite3")
    conn = store.connect(path)
    tx = lambda fn, *a: store.transact(conn, fn, *a)  # noqa: E731
    _, acme = tx(store.create_key, "acme", "demo", T0)
    _, old = tx(store.create_key, "acme", "sales", T0 + 1)
    _, zeta = tx(store.create_key, "zeta@example.com", "demo", T0 + 2)
    tx(store.revoke_key, old, T0 + 3)
    tx(store.add_points, "acme", 1_000_000_007)
    tx(store.add_points, "zeta@example.com", 5)
    for i in range(12):
        prefix, account = (acme, "acme") if i % 3 else (zeta, "zeta@example.com")
        start = CallStart(f"call-{i:02}", prefix, account, "demo", "raw", T0 + i / 7,
                          {"caller": f"+49{i}", "note": "50% sure? ünïcode ✓"})
        tx(store.open_call, start)
        if i < 9:
            tx(store.settle_call, CallRecord(
                call_id=start.call_id, key_prefix=prefix, account=account, agent="demo", provider="raw",
                started_at=start.started_at, ended_at=start.started_at + 61.0 / 3, duration=61.0 / 3,
                end_reason="hangup", turns=i, barge_ins=i % 2, barge_ins_resumed=0, points_charged=1,
                transcript=[{"role": "agent", "text": "Grüß Gott — 'quoted' \"double\"", "t": 0.1}],
                metadata={"caller": f"+49{i}", "deep": {"a": [1, 2.5, None]}}))
    tx(store.heartbeat, "call-10", T0 + 30.5)
    conn.close()
    ini = tmp_path / "upvoot.ini"
    ini.write_text(INI.format(database=path))
    return path, ini


def rows(database):
    conn = store.connect(database)
    try:
        out = {}
        for table in schema.TABLES:
            def read(txn, table=table):
                names = dbcopy.columns(txn, table)
                txn.execute(f"SELECT {', '.join(sorted(names))} FROM {table} ORDER BY {dbcopy.KEYS[table]}")
                return [tuple(row) for row in txn.fetchall()]
            out[table] = store.transact(conn, read)
        return out
    finally:
        conn.close()


def cli(capsys, ini, *argv):
    status = run(["--config", str(ini), *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_copy_into_postgresql_is_exact(source, pg_url, capsys, tmp_path):
    path, ini = source
    status, out, err = cli(capsys, ini, "db", "copy", "--to", pg_url)
    assert (status, err) == (0, "")
    assert out == f"copied {path} to {pg_url}: 2 accounts (1000000003 points in all), 3 keys, 12 calls\n"
    before, after = rows(path), rows(pg_url)
    assert [len(before[t]) for t in schema.TABLES] == [2, 3, 12]
    assert after == before  # every column of every row, floats to the last bit

    pg_ini = tmp_path / "pg.ini"
    pg_ini.write_text(INI.format(database=pg_url))
    for argv in (["keys", "list", "--json"], ["accounts", "list", "--json"], ["points", "show", "acme", "--json"],
                 ["calls", "list", "--json", "--limit", "100"], ["calls", "show", "call-04", "--json"],
                 ["keys", "list"], ["calls", "list"]):
        original, copied = cli(capsys, ini, *argv), cli(capsys, pg_ini, *argv)
        assert copied == original, argv
        assert original[0] == 0
    assert len(json.loads(cli(capsys, pg_ini, "calls", "list", "--json")[1])) == 12


def test_copy_refuses_a_target_that_is_not_empty(source, pg_url, capsys):
    path, ini = source
    conn = store.connect(pg_url)
    store.transact(conn, store.create_key, "other", "demo", T0)
    conn.close()
    status, out, err = cli(capsys, ini, "db", "copy", "--to", pg_url)
    assert (status, out) == (1, "")
    assert f"database {pg_url} is not empty (1 accounts, 1 api_keys): copy only into a new database" in err
    assert [len(v) for v in rows(pg_url).values()] == [1, 1, 0], "the target is as it was"


def test_a_failed_copy_leaves_the_target_empty(source, pg_url, capsys):
    """A call whose key is not there breaks a foreign key half-way: nothing of it stays."""
    path, ini = source
    import sqlite3

    raw = sqlite3.connect(path)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("UPDATE calls SET key_prefix = 'uvk_gone' WHERE call_id = 'call-11'")
    raw.commit()
    raw.close()
    status, out, err = cli(capsys, ini, "db", "copy", "--to", pg_url)
    assert status == 1 and out == "" and "foreign key" in err and err.count("\n") == 1
    assert [len(v) for v in rows(pg_url).values()] == [0, 0, 0]


def test_copy_back_into_sqlite_round_trips(source, pg_url, capsys, tmp_path):
    path, ini = source
    assert cli(capsys, ini, "db", "copy", "--to", pg_url)[0] == 0
    pg_ini = tmp_path / "pg.ini"
    pg_ini.write_text(INI.format(database=pg_url))
    back = str(tmp_path / "back.sqlite3")
    assert cli(capsys, pg_ini, "db", "copy", "--to", back)[0] == 0
    assert rows(back) == rows(path)


def test_copy_names_the_target_without_its_password(source, pg_url, capsys):
    _, ini = source
    url = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    status, out, err = cli(capsys, ini, "db", "copy", "--to", url)
    assert status == 0 and "s3cret-pw" not in out + err and "postgres:***@" in out
