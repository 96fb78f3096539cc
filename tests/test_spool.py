"""The settlement spool: append, replay, partial failure, corrupt lines, a
locked database; the service spooling a settlement and applying it later;
and a real daemon whose database is locked while a call ends."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from upvoot.ledger import spool as spoolmod
from upvoot.ledger import store, threads
from upvoot.ledger.ledger import Ledger


def rec(call_id: str, points: int = 1, **kw) -> dict:
    return {"call_id": call_id, "points_charged": points, **kw}


@pytest.fixture
def spool(tmp_path):
    return spoolmod.Spool(str(tmp_path / "spool.jsonl"))


def lines(spool) -> list[dict]:
    with open(spool.path) as f:
        return [json.loads(line) for line in f]


# ---- Spool ----------------------------------------------------------------------------


def test_append_writes_one_json_line_per_record(spool):
    spool.append(rec("a", transcript=[{"role": "caller", "text": "héllo"}]))
    spool.append(rec("b"))
    assert lines(spool) == [rec("a", transcript=[{"role": "caller", "text": "héllo"}]), rec("b")]
    assert [r["call_id"] for r in spool.records()] == ["a", "b"] and len(spool) == 2
    assert os.stat(spool.path).st_mode & 0o007 == 0, "no access for other users"


def test_replay_applies_every_record_then_removes_the_spool(spool):
    for name in "abc":
        spool.append(rec(name))
    applied = []
    result = spool.replay(lambda r: applied.append(r["call_id"]) or 7)
    assert applied == ["a", "b", "c"]
    assert [(r["call_id"], charged) for r, charged in result.applied] == [("a", 7), ("b", 7), ("c", 7)]
    assert result.remaining == 0 and not os.path.exists(spool.path)
    assert spool.replay(lambda r: 1 / 0) == spoolmod.Replay(), "an empty spool: nothing to do"


def test_a_partial_failure_keeps_the_failed_record_and_applies_the_rest(spool):
    for name in "abc":
        spool.append(rec(name))

    def apply(r):
        if r["call_id"] == "b":
            raise ValueError("refused")
        return 1

    result = spool.replay(apply)
    assert [r["call_id"] for r, _ in result.applied] == ["a", "c"]
    assert [(r["call_id"], str(e)) for r, e in result.failed] == [("b", "refused")]
    assert lines(spool) == [rec("b")] and result.remaining == 1
    # the next replay applies it
    assert [r["call_id"] for r, _ in spool.replay(lambda r: 1).applied] == ["b"]
    assert not os.path.exists(spool.path)


def test_an_unavailable_database_stops_the_replay_and_keeps_the_rest(spool):
    for name in "abc":
        spool.append(rec(name))
    tried = []

    def apply(r):
        tried.append(r["call_id"])
        if r["call_id"] == "b":
            raise sqlite3.OperationalError("database is locked")
        return 1

    result = spool.replay(apply, stop_on=spoolmod.UNAVAILABLE)
    assert tried == ["a", "b"], "no use trying the rest"
    assert [r["call_id"] for r in spool.records()] == ["b", "c"] and result.remaining == 2


def test_a_corrupt_line_is_kept_aside_with_a_log_line_not_lost(spool, logged):
    spool.append(rec("a"))
    with open(spool.path, "ab") as f:
        f.write(b'{"call_id": "torn", "poi\n')
        f.write(b'["not", "a", "record"]\n')
    spool.append(rec("b"))
    result = spool.replay(lambda r: 1)
    assert [r["call_id"] for r, _ in result.applied] == ["a", "b"]
    assert result.corrupt == 2 and not os.path.exists(spool.path)
    with open(spool.corrupt_path, "rb") as f:
        assert f.read() == b'{"call_id": "torn", "poi\n["not", "a", "record"]\n'
    warnings = [e for e in logged if e.get("event") == "spool.corrupt"]
    assert [e["number"] for e in warnings] == [2, 3]


def test_an_append_after_a_torn_write_starts_its_own_line(spool):
    with open(spool.path, "wb") as f:
        f.write(b'{"call_id": "a", "points_charged": 1}\n{"call_id": "x", "poi')  # the process died here
    spool.append(rec("b"))
    assert [r["call_id"] for r in spool.records()] == ["a", "b"]


def test_records_spooled_during_a_replay_are_kept(spool):
    spool.append(rec("a"))
    spool.append(rec("b"))

    def apply(r):
        if r["call_id"] == "a":
            spool.append(rec("new"))  # a call ends while the replay runs
        return 1

    result = spool.replay(apply)
    assert [r["call_id"] for r, _ in result.applied] == ["a", "b"]
    assert lines(spool) == [rec("new")] and result.remaining == 1


def test_the_rewrite_is_atomic(spool, monkeypatch):
    """A crash during the rewrite leaves the old spool whole (a line may be
    applied again: settlement is idempotent)."""
    spool.append(rec("a"))
    spool.append(rec("b"))

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(spoolmod.os, "replace", crash)
    with pytest.raises(OSError):
        spool.replay(lambda r: 1 if r["call_id"] == "a" else 1 / 0)
    monkeypatch.undo()
    assert [r["call_id"] for r in spool.records()] == ["a", "b"]


# ---- with the database ------------------------------------------------------------------


def _db(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = store.connect(path)
    key, prefix = store.transact(conn, store.create_key, "acme", "demo", 1000.0)
    store.transact(conn, store.add_points, "acme", 10)
    store.transact(conn, store.open_call, store.CallStart("c1", prefix, "acme", "demo", "raw", 1000.0))
    conn.close()
    return path, prefix


def _record(prefix: str, call_id: str = "c1") -> store.CallRecord:
    return store.CallRecord(
        call_id=call_id, key_prefix=prefix, account="acme", agent="demo", provider="raw", started_at=1000.0,
        ended_at=1090.0, duration=90.0, end_reason="hangup", turns=2, barge_ins=1, points_charged=2,
        transcript=[{"role": "agent", "text": "Hello", "t": 0.5}], metadata={"peer": "x", "recording": "r/c1.wav"},
    )


def _read(path, fn, *args):
    conn = store.connect(path)
    try:
        return store.transact(conn, fn, *args)
    finally:
        conn.close()


def test_a_record_survives_the_round_trip_through_the_spool(spool, tmp_path):
    record = _record("uvk_AbCdEfGh")
    spool.append(spoolmod.record_to_json(record))
    (back,) = spool.records()
    assert spoolmod.record_from_json(back) == record


def test_settle_spooled_charges_once_even_when_replayed_twice(spool, tmp_path):
    db, prefix = _db(tmp_path)
    line = spoolmod.record_to_json(_record(prefix))
    spool.append(line)
    result = spoolmod.settle_spooled(spool, db)
    assert [charged for _, charged in result.applied] == [2]
    call = _read(db, store.get_call, "c1")
    assert (call["state"], call["duration"], call["metadata"]["recording"]) == ("settled", 90.0, "r/c1.wav")
    spool.append(line)  # applied, but the process died before the line was removed
    assert [charged for _, charged in spoolmod.settle_spooled(spool, db).applied] == [0]
    assert _read(db, store.get_account, "acme")["points"] == 8
    assert not os.path.exists(spool.path)


def test_settle_spooled_keeps_the_record_while_the_database_is_locked(spool, tmp_path, monkeypatch):
    db, prefix = _db(tmp_path)
    spool.append(spoolmod.record_to_json(_record(prefix)))
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 100)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        result = spoolmod.settle_spooled(spool, db)
        assert result.applied == [] and len(result.failed) == 1 and result.remaining == 1
        assert [r["call_id"] for r in spool.records()] == ["c1"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert [charged for _, charged in spoolmod.settle_spooled(spool, db).applied] == [2]
    assert _read(db, store.get_account, "acme")["points"] == 8


# ---- the ledger: the store with the spool behind it ----------------------------------


class FlakyStore:
    """The daemon's database as the ledger uses it: fails while ``down``."""

    def __init__(self, path):
        self.path = path
        self.down = True

    def _run(self, fn, arg):
        if self.down:
            return defer.fail(sqlite3.OperationalError("database is locked"))
        return defer.maybeDeferred(_read, self.path, fn, arg)

    def settle_call(self, record):
        return self._run(store.settle_call, record)


def _ledger(tmp_path, db, clock):
    spool = spoolmod.Spool(str(tmp_path / "spool.jsonl"))
    charged = []
    spooler = spoolmod.Spooler(spool, lambda: spoolmod.settle_spooled(spool, db), clock, threads.synchronous,
                               on_applied=lambda record, points: charged.append(points))
    return Ledger(FlakyStore(db), spooler), spool, charged


def _start(prefix: str, call_id: str = "c2") -> store.CallStart:
    return store.CallStart(call_id, prefix, "acme", "demo", "raw", 1000.0, {"peer": "x"})


def test_a_failed_settlement_is_spooled_and_applied_on_the_timer(tmp_path, logged):
    db, prefix = _db(tmp_path)
    clock = Clock()
    ledger, spool, charged = _ledger(tmp_path, db, clock)
    ledger.spooler.start(now=False)
    d = ledger.settle_call(_record(prefix))
    assert d.called and d.result is None, "spooled: charged later"
    assert ledger.stop().called
    assert [r["call_id"] for r in spool.records()] == ["c1"]
    assert any(e.get("event") == "store.settle_spooled" for e in logged)
    assert _read(db, store.get_call, "c1")["state"] == "active"
    clock.advance(ledger.spooler.retry_interval)
    call = _read(db, store.get_call, "c1")
    assert (call["state"], call["points_charged"]) == ("settled", 2)
    assert not os.path.exists(spool.path)
    assert _read(db, store.get_account, "acme")["points"] == 8
    clock.advance(ledger.spooler.retry_interval)  # nothing left: nothing happens
    assert _read(db, store.get_account, "acme")["points"] == 8
    assert [e["call_id"] for e in logged if e.get("event") == "spool.applied"] == ["c1"] and charged == [2]
    ledger.store.down = False
    assert ledger.settle_call(_record(prefix)).result == 0, "settled before: nothing more"
    d = ledger.spooler.stop()
    assert d.called and clock.getDelayedCalls() == []


def test_a_call_whose_opening_was_spooled_is_settled_as_a_crash_after_a_restart(tmp_path, logged):
    """Issue 9 item 3: the database was locked when the call started and the
    process died during the call: the next start still settles it, once.
    (Openings are no longer spooled, they are the admission's transaction;
    an older UpVoot's spooled opening still applies.)"""
    db, prefix = _db(tmp_path)
    ledger, spool, _ = _ledger(tmp_path, db, Clock())
    spool.append(spoolmod.start_to_json(_start(prefix)))
    assert [(r["kind"], r["call_id"]) for r in spool.records()] == [("open", "c2")]
    assert _read(db, store.get_call, "c2") is None
    # the process dies; the next start replays the spool, then settles what was left open
    replay = spoolmod.settle_spooled(spoolmod.Spool(spool.path), db)
    assert [r["call_id"] for r, _ in replay.applied] == ["c2"] and not os.path.exists(spool.path)
    orphans = _read(db, store.settle_orphans, 2000.0, "crash", lambda r: 5)
    assert [(r.call_id, r.end_reason, r.points_charged) for r in orphans] == [("c1", "crash", 5), ("c2", "crash", 5)]
    assert _read(db, store.get_call, "c2")["metadata"] == {"peer": "x"}
    assert spoolmod.settle_spooled(spool, db) == spoolmod.Replay()
    assert _read(db, store.settle_orphans, 3000.0, "crash", lambda r: 5) == [], "settled once"


@pytest.mark.parametrize("order", ["opening first", "record first"])
def test_a_call_settled_while_its_opening_is_spooled_is_charged_once(tmp_path, order):
    db, prefix = _db(tmp_path)
    ledger, spool, charged = _ledger(tmp_path, db, Clock())
    record = _record(prefix, call_id="c2")
    if order == "record first":
        ledger.settle_call(record)  # both spooled, the record before the opening (two threads raced)
        spool.append(spoolmod.start_to_json(_start(prefix)))  # an older UpVoot's spooled opening
    else:
        spool.append(spoolmod.start_to_json(_start(prefix)))
        ledger.store.down = False
        assert ledger.settle_call(record).result == 2, "settled at once, the opening still in the spool"
    replay = spoolmod.settle_spooled(spool, db)
    assert replay.failed == [] and replay.remaining == 0
    call = _read(db, store.get_call, "c2")
    assert (call["state"], call["points_charged"], call["duration"]) == ("settled", 2, 90.0)
    assert _read(db, store.get_account, "acme")["points"] == 8
    assert [r.call_id for r in _read(db, store.settle_orphans, 5000.0, "crash", lambda r: 5)] == ["c1"], "not c2"


def test_a_line_the_database_refuses_for_good_is_moved_aside_not_retried(spool, tmp_path, logged):
    """Issue 9 item 10: points_per_increment = 2**63 made every settlement
    fail ("Python int too large to convert to SQLite INTEGER") and its spool
    line stayed forever."""
    db, prefix = _db(tmp_path)
    huge = attrs.evolve(_record(prefix, call_id="c2"), points_charged=2**63)
    spool.append(spoolmod.record_to_json(_record(prefix)))
    spool.append(spoolmod.record_to_json(huge))
    spool.append({"kind": "settle", "call_id": "c3", "points_charged": -1})  # not a record
    result = spoolmod.settle_spooled(spool, db)
    assert [r["call_id"] for r, _ in result.applied] == ["c1"]
    assert [(r["call_id"], type(e)) for r, e in result.rejected] == [("c2", OverflowError), ("c3", TypeError)]
    assert result.failed == [] and result.remaining == 0 and not os.path.exists(spool.path), "not retried"
    rejected = [json.loads(line) for line in open(tmp_path / "spool.rejected")]
    assert [r["call_id"] for r in rejected] == ["c2", "c3"] and rejected[0]["points_charged"] == 2**63
    critical = [e for e in logged if e.get("event") == "spool.rejected"]
    assert [e["call_id"] for e in critical] == ["c2", "c3"]
    assert all(e["log_level"].name == "critical" and "spool.rejected" in e["path"] for e in critical)
    assert "OverflowError" in critical[0]["error"]
    assert _read(db, store.get_call, "c2") is None and _read(db, store.get_account, "acme")["points"] == 8


def test_the_ledger_rejects_a_settlement_refused_for_good_at_once(tmp_path, logged):
    db, prefix = _db(tmp_path)
    ledger, spool, _ = _ledger(tmp_path, db, Clock())
    ledger.store.down = False
    d = ledger.settle_call(attrs.evolve(_record(prefix), points_charged=2**63))
    assert d.result is None and not os.path.exists(spool.path)
    assert [json.loads(line)["call_id"] for line in open(tmp_path / "spool.rejected")] == ["c1"]
    assert [e["call_id"] for e in logged if e.get("event") == "spool.rejected"] == ["c1"]
    assert _read(db, store.get_call, "c1")["state"] == "active", "left for the crash settlement"


def test_a_locked_database_is_retried_not_rejected(spool, tmp_path, monkeypatch):
    db, prefix = _db(tmp_path)
    spool.append(spoolmod.record_to_json(_record(prefix)))
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 100)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        result = spoolmod.settle_spooled(spool, db)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert result.rejected == [] and len(result.failed) == 1 and not os.path.exists(tmp_path / "spool.rejected")
    assert [r["call_id"] for r in spool.records()] == ["c1"]


# ---- the real daemon ----------------------------------------------------------------


@pytest.mark.slow
def test_a_call_that_ends_while_the_database_is_locked_is_spooled_then_settled_once(tmp_path):
    from tests.daemon import Caller, Daemon, shipped_ini

    d = Daemon(tmp_path, shipped_ini()).start()
    try:
        key = d.key(account="spool", points=10)
        c = Caller(d.url(f"/voice/{key}"))
        c.wait_json("audio_end", timeout=20)
        spool_path = tmp_path / "spool.jsonl"
        locker = sqlite3.connect(str(tmp_path / "upvoot.sqlite3"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        try:
            c.close()  # the call ends; its settlement waits out the busy timeout, then is spooled
            deadline = time.monotonic() + store.BUSY_TIMEOUT_MS / 1000 + 10
            while not spool_path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert spool_path.exists(), d.log_text()[-3000:]
            (line,) = spool_path.read_text().splitlines()
            spooled = json.loads(line)
            assert spooled["account"] == "spool"
            assert time.monotonic() - locked_at >= store.BUSY_TIMEOUT_MS / 1000 - 0.5
            time.sleep(1.0)  # a retry or two while still locked: it stays
            assert spool_path.exists()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        record = d.call(spooled["call_id"], wait=20)
        assert record["state"] == "settled" and record["end_reason"] == "hangup"
        assert record["points_charged"] == spooled["points_charged"] >= 1
        deadline = time.monotonic() + 10
        while spool_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not spool_path.exists(), "removed once settled"
        assert d.cli("points", "show", "spool") == str(10 - record["points_charged"])
        assert d.log_text().count("settled from the spool") == 1
        assert [r["call_id"] for r in d.calls()].count(spooled["call_id"]) == 1
    finally:
        d.stop()
    # a restart finds nothing to apply, and charges nothing more
    d2 = Daemon(tmp_path, d.ini.read_text())
    d2.start()
    d2.stop()
    assert d2.cli("points", "show", "spool") == str(10 - record["points_charged"])


# ---- on PostgreSQL ----------------------------------------------------------------------------


def _pg_db(url):
    conn = store.connect(url)
    _, prefix = store.transact(conn, store.create_key, "acme", "demo", 1000.0)
    store.transact(conn, store.add_points, "acme", 10)
    store.transact(conn, store.open_call, store.CallStart("c1", prefix, "acme", "demo", "raw", 1000.0))
    conn.close()
    return prefix


def test_settle_spooled_on_postgresql_waits_out_an_unreachable_server_then_charges_once(spool, pg_url):
    from tests.daemon import free_port

    prefix = _pg_db(pg_url)
    line = spoolmod.record_to_json(_record(prefix))
    spool.append(line)
    gone = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    result = spoolmod.settle_spooled(spool, gone)
    assert result.applied == [] and result.rejected == [] and result.remaining == 1
    assert "cannot connect to database" in str(result.failed[0][1])
    assert [charged for _, charged in spoolmod.settle_spooled(spool, pg_url).applied] == [2]
    spool.append(line)  # applied, but the process died before the line was removed
    assert [charged for _, charged in spoolmod.settle_spooled(spool, pg_url).applied] == [0]
    assert _read(pg_url, store.get_account, "acme")["points"] == 8
    assert _read(pg_url, store.get_call, "c1")["state"] == "settled"


def test_a_line_postgresql_refuses_for_good_is_moved_aside(spool, pg_url, tmp_path):
    prefix = _pg_db(pg_url)
    spool.append(spoolmod.record_to_json(_record("uvk_nosuchkey", call_id="c9")))  # a foreign key it breaks
    spool.append(spoolmod.record_to_json(_record(prefix)))
    result = spoolmod.settle_spooled(spool, pg_url)
    assert [r["call_id"] for r, _ in result.applied] == ["c1"]
    assert [r["call_id"] for r, _ in result.rejected] == ["c9"]
    assert isinstance(result.rejected[0][1], store.INTEGRITY_ERRORS)
    assert [json.loads(line)["call_id"] for line in open(tmp_path / "spool.rejected")] == ["c9"]
