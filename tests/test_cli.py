"""upvoot.cli end to end: ``main([...])`` against a real ini file and database."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import types

import pytest

from upvoot.ledger import store
from upvoot.cli import main
from upvoot.ledger.store import CallRecord, CallStart

KEY_RE = re.compile(r"uvk_[A-Za-z0-9_-]{32}")
T0 = 1_700_000_000.0

INI = """\
[upvoot]
database = {database}

[agent:demo]
greeting = Hello!

[agent:sales]
greeting = Hi, sales here.
"""


@pytest.fixture
def ini(tmp_path, monkeypatch):
    monkeypatch.delenv("UPVOOT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    conf = tmp_path / "etc" / "upvoot.ini"
    conf.parent.mkdir()
    conf.write_text(INI.format(database="upvoot.sqlite3"))
    return conf


@pytest.fixture
def database(ini):
    return str(ini.parent / "upvoot.sqlite3")  # relative to the ini file


def run(capsys, *argv):
    """Run the CLI; return (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return e.value.code, out, err


def ok(capsys, ini, *argv):
    status, out, err = run(capsys, "--config", str(ini), *argv)
    assert status == 0, err
    return out


def assert_one_line_error(status, out, err, expected_status, *fragments):
    assert status == expected_status
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("upvoot: error: ")
    for fragment in fragments:
        assert fragment in err


def create_key(capsys, ini, account="acme", agent="demo"):
    status, out, err = run(capsys, "--config", str(ini), "keys", "create", "--agent", agent, "--account", account)
    assert status == 0, err
    return out, err


def test_keys_create_prints_only_the_key(capsys, ini, database):
    out, err = create_key(capsys, ini)
    key = out.strip()
    assert out == key + "\n" and KEY_RE.fullmatch(key)
    assert key not in err and key[:12] in err  # the note names the prefix only
    conn = store.connect(database)
    info = store.transact(conn, store.lookup_key, key)
    conn.close()
    assert (info.prefix, info.account, info.agent, info.points) == (key[:12], "acme", "demo", 0)


def test_keys_list_and_revoke(capsys, ini, database):
    key = create_key(capsys, ini)[0].strip()
    other = create_key(capsys, ini, account="zeta", agent="sales")[0].strip()
    prefix = key[:12]

    table = ok(capsys, ini, "keys", "list")
    assert prefix in table and other[:12] in table and key not in table
    assert table.splitlines()[0].split() == ["PREFIX", "ACCOUNT", "AGENT", "CREATED", "REVOKED"]

    assert ok(capsys, ini, "keys", "revoke", prefix) == f"revoked {prefix}\n"
    listed = json.loads(ok(capsys, ini, "keys", "list", "--json"))
    assert [(k["prefix"], k["account"], k["agent"], k["revoked_at"] is not None) for k in listed] == [
        (prefix, "acme", "demo", True),
        (other[:12], "zeta", "sales", False),
    ]
    assert key not in json.dumps(listed)

    conn = store.connect(database)
    assert store.transact(conn, store.lookup_key, key).revoked
    conn.close()


def test_points_add_and_show(capsys, ini):
    create_key(capsys, ini)
    assert ok(capsys, ini, "points", "add", "acme", "100") == "100\n"
    assert ok(capsys, ini, "points", "add", "acme", "-30") == "70\n"
    assert ok(capsys, ini, "points", "show", "acme") == "70\n"
    shown = json.loads(ok(capsys, ini, "points", "show", "acme", "--json"))
    assert (shown["name"], shown["points"], shown["active_keys"]) == ("acme", 70, 1)


def test_accounts_list(capsys, ini):
    create_key(capsys, ini, account="zeta")
    create_key(capsys, ini, account="acme")
    ok(capsys, ini, "points", "add", "zeta", "5")
    table = ok(capsys, ini, "accounts", "list").splitlines()
    assert table[0].split() == ["ACCOUNT", "POINTS", "KEYS", "CREATED"]
    assert [line.split()[:3] for line in table[1:]] == [["acme", "0", "1"], ["zeta", "5", "1"]]
    listed = json.loads(ok(capsys, ini, "accounts", "list", "--json"))
    assert [(a["name"], a["points"]) for a in listed] == [("acme", 0), ("zeta", 5)]


@pytest.fixture
def calls(capsys, ini, database):
    acme = create_key(capsys, ini)[0].strip()[:12]
    zeta = create_key(capsys, ini, account="zeta")[0].strip()[:12]
    conn = store.connect(database)
    for account in ("acme", "zeta"):  # a charge never takes a balance below zero
        store.transact(conn, store.add_points, account, 10)
    for i, (account, prefix) in enumerate([("acme", acme), ("zeta", zeta), ("acme", acme)]):
        store.transact(
            conn,
            store.settle_call,
            CallRecord(
                call_id=f"call-{i}", key_prefix=prefix, account=account, agent="demo", provider="raw",
                started_at=T0 + 100 * i, ended_at=T0 + 100 * i + 65, duration=65.0, end_reason="hangup",
                turns=2, points_charged=2,
                transcript=[{"role": "agent", "text": "Hello!", "t": 0.1}, {"role": "caller", "text": "Bye", "t": 4.0}],
                metadata={"caller": "+100"},
            ),
        )  # fmt: skip
    store.transact(
        conn,
        store.open_call,
        CallStart(call_id="call-live", key_prefix=acme, account="acme", agent="demo", provider="raw", started_at=T0 + 500),
    )
    conn.close()


def test_calls_list(capsys, ini, calls):
    table = ok(capsys, ini, "calls", "list").splitlines()
    assert table[0].split() == ["STARTED", "CALL", "ACCOUNT", "AGENT", "STATE", "SECONDS", "POINTS", "END"]
    assert [line.split()[2] for line in table[1:]] == ["call-live", "call-2", "call-1", "call-0"]
    assert table[1].split()[5:] == ["active", "-", "-", "-"]
    assert table[2].split()[5:] == ["settled", "65.0", "2", "hangup"]

    listed = json.loads(ok(capsys, ini, "calls", "list", "--json", "--account", "acme", "--limit", "2"))
    assert [c["call_id"] for c in listed] == ["call-live", "call-2"]
    assert listed[1]["transcript"][1] == {"role": "caller", "text": "Bye", "t": 4.0}
    assert listed[1]["points_charged"] == 2 and listed[1]["metadata"] == {"caller": "+100"}


def test_calls_show(capsys, ini, calls):
    text = ok(capsys, ini, "calls", "show", "call-1")
    assert re.search(r"^account:\s+zeta$", text, re.M)
    assert re.search(r"^started_at:\s+2023-11-14 22:15:00Z$", text, re.M)
    assert re.search(r"^metadata.caller:\s+\+100$", text, re.M)
    assert text.endswith("transcript:\n      0.1s  agent: Hello!\n      4.0s  caller: Bye\n")
    shown = json.loads(ok(capsys, ini, "calls", "show", "call-1", "--json"))
    assert (shown["call_id"], shown["state"], shown["duration"]) == ("call-1", "settled", 65.0)


@pytest.mark.parametrize("column, text", [("transcript", "[{not json"), ("metadata", '"a string"'),
                                          ("transcript", "[" * 50000)])
def test_a_call_row_with_bad_json_is_a_one_line_error(capsys, ini, calls, database, column, text):
    """Issue 9 item 12: a hand-edited row gave a traceback."""
    conn = sqlite3.connect(database)
    conn.execute(f"UPDATE calls SET {column} = ? WHERE call_id = 'call-1'", (text,))
    conn.commit()
    conn.close()
    for argv in (["calls", "show", "call-1"], ["calls", "list", "--json"], ["calls", "list"]):
        assert_one_line_error(*run(capsys, "--config", str(ini), *argv), 1, "call 'call-1'", column, "not a JSON")
    assert "call-2" in ok(capsys, ini, "calls", "show", "call-2")


def test_config_from_environment(capsys, ini, monkeypatch):
    monkeypatch.setenv("UPVOOT_CONFIG", str(ini))
    status, out, err = run(capsys, "accounts", "list", "--json")
    assert (status, json.loads(out)) == (0, [])


@pytest.mark.parametrize(
    "argv, status, fragments",
    [
        (["points", "add", "ghost", "5"], 1, ["unknown account 'ghost'"]),
        (["points", "show", "ghost"], 1, ["unknown account 'ghost'"]),
        (["keys", "revoke", "uvk_nosuchkey"], 1, ["no key with prefix 'uvk_nosuchkey'", "first 12 characters"]),
        (["calls", "show", "nope"], 1, ["no call 'nope'"]),
        (["keys", "create", "--agent", "nobody", "--account", "acme"], 2, ["unknown agent 'nobody'", "demo, sales"]),
        (["keys", "create", "--agent", "demo", "--account", "bad name"], 2, ["invalid account name"]),
        (["keys", "create", "--agent", "demo"], 2, ["--account", "upvoot keys create --help"]),
        (["points", "add", "acme", "lots"], 2, ["invalid int value"]),
        (["calls", "list", "--limit", "0"], 2, ["must be at least 1"]),
        (["calls", "list", "--limit", "99999999999999999999"], 2, ["must be at most 1000000000"]),
        (["keys", "list", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
        (["launch"], 2, ["invalid choice: 'launch'"]),
        ([], 2, ["COMMAND"]),
    ],
)
def test_operator_mistakes_are_one_line_errors(capsys, ini, argv, status, fragments):
    assert_one_line_error(*run(capsys, "--config", str(ini), *argv), status, *fragments)


def test_missing_config_is_an_error(capsys, ini):
    assert_one_line_error(*run(capsys, "keys", "list"), 2, "--config FILE", "UPVOOT_CONFIG")


def test_bad_config_names_the_file(capsys, ini):
    ini.write_text(INI.format(database="upvoot.sqlite3") + "colour = blue\n")
    assert_one_line_error(*run(capsys, "--config", str(ini), "keys", "list"), 2, str(ini), "colour")
    assert_one_line_error(*run(capsys, "--config", str(ini) + ".missing", "keys", "list"), 2, ".missing")


@pytest.mark.parametrize("problem", ["missing directory", "not a database"])
def test_unusable_database_is_an_error(capsys, ini, problem):
    if problem == "missing directory":
        ini.write_text(INI.format(database="nowhere/upvoot.sqlite3"))
    else:
        (ini.parent / "upvoot.sqlite3").write_bytes(b"garbage" * 1000)
    status, out, err = run(capsys, "--config", str(ini), "points", "add", "acme", "1")
    assert_one_line_error(status, out, err, 1, "upvoot.sqlite3")


@pytest.fixture
def fake_dialer(monkeypatch):
    seen = {}

    def configure_parser(parser):
        parser.add_argument("url")
        parser.add_argument("--hangup-after", type=float)

    def run_dial(args):
        seen["args"] = args
        return 3

    module = types.ModuleType("upvoot.dial.command")
    module.configure_parser = configure_parser
    module.run = run_dial
    monkeypatch.setitem(sys.modules, "upvoot.dial.command", module)
    return seen


def test_dial_delegates_without_config(capsys, ini, fake_dialer):
    status, out, err = run(capsys, "dial", "ws://127.0.0.1:1/voice/k", "--hangup-after", "2")
    assert status == 3
    assert (fake_dialer["args"].url, fake_dialer["args"].hangup_after) == ("ws://127.0.0.1:1/voice/k", 2.0)


def test_dial_help_and_errors_come_from_the_dialer(capsys, fake_dialer):
    status, out, err = run(capsys, "dial", "--help")
    assert status == 0 and out.startswith("usage: upvoot dial") and "--hangup-after" in out
    assert_one_line_error(*run(capsys, "dial"), 2, "url", "upvoot dial --help")


def test_cli_imports_neither_config_nor_dialer_until_needed():
    code = "import sys, upvoot.cli; print(sorted(m for m in sys.modules if m in ('upvoot.config', 'upvoot.dial.command')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
