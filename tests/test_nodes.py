"""Many nodes, one ledger: three real daemons (``twistd upvoot``, real ini
files, loopback ports) sharing one PostgreSQL database. One of them is
killed with SIGKILL in the middle of its calls: another node settles them
once their lease is over (end reason ``crash``, charged to their last
heartbeat), exactly once although two nodes sweep; the calls on the other
nodes go on; the dead node, restarted, settles nothing again."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from tests.daemon import Caller, Daemon, shipped_ini
from upvoot.ledger import store
from upvoot.ledger.billing import points_for

pytestmark = pytest.mark.slow

HEARTBEAT, LEASE = 1.0, 4.0
NODES = ("node-a", "node-b", "node-c")
#: what the log says when a node settles a call (the sweeper; the start-up settlement)
SWEPT, ORPHANED = "whose heartbeat is older than the lease", "left active by a dead process"


#: One short line each, so that a node synthesizes its fixed lines in seconds.
LEAN_AGENT = """
[agent:demo]
greeting = Hello.
goodbye = Goodbye.
apology = Sorry?
silence_timeout = 1h
silence_prompt =
wrap_up_warning =
closing_max_duration = Time is up. Goodbye.
closing_max_turns = Goodbye.
closing_silence = Goodbye.
closing_error = Sorry. Goodbye.
closing_no_points = No points left. Goodbye.
brain = scripted
brain.fallback = Yes.
"""


def lean_ini(**main: str) -> str:
    """The shipped ini's [upvoot] section with ``main`` set, and a lean demo agent."""
    text = shipped_ini(**main)
    return text[:text.index("[agent:demo]")] + LEAN_AGENT


def _read(url, fn, *args):
    conn = store.connect(url)
    try:
        return store.transact(conn, fn, *args)
    finally:
        conn.close()


def _rows(url, sql, *params):
    return _read(url, lambda txn: txn.execute(sql, params).fetchall())


def _wait(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _events(daemon, text, since=0):
    """The lines of ``daemon``'s log (twistd's text log) after ``since`` that hold ``text``."""
    return [line for line in daemon.log_text()[since:].splitlines() if text in line]


@pytest.fixture
def cluster(tmp_path, pg_url):
    daemons = {
        name: Daemon(tmp_path / name, lean_ini(database=pg_url, node_id=name, heartbeat=f"{HEARTBEAT}s",
                                               lease=f"{LEASE}s", drain_time="1s"))
        for name in NODES
    }
    errors = []

    def start(d):
        try:
            d.start(timeout=120)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(d,)) for d in daemons.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [], errors
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()


def test_a_dead_nodes_calls_are_settled_once_by_another_node(cluster, pg_url):
    a, b, c = (cluster[name] for name in NODES)
    key = a.key(account="acme", points=1000)
    start_balance = 1000
    callers = {"node-a": [Caller(a.url(f"/voice/{key}")) for _ in range(2)],
               "node-b": [Caller(b.url(f"/voice/{key}"))], "node-c": [Caller(c.url(f"/voice/{key}"))]}
    for node_callers in callers.values():
        for caller in node_callers:
            caller.wait_json("audio_end", timeout=60)  # the greeting has played: the call runs
    active = _rows(pg_url, "SELECT node, call_id FROM calls WHERE state = 'active' ORDER BY node")
    assert sorted(node for node, _ in active) == ["node-a", "node-a", "node-b", "node-c"]
    dead_calls = sorted(call_id for node, call_id in active if node == "node-a")
    time.sleep(2 * HEARTBEAT)  # a few heartbeats of the calls on node-a
    b_log, c_log = len(b.log_text()), len(c.log_text())

    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed_at = time.time()
    for caller in callers["node-a"]:
        caller.wait_closed(timeout=10)  # lost to the caller: providers do not reconnect

    def settled():
        rows = _rows(pg_url, "SELECT call_id, state, end_reason, started_at, heartbeat_at, ended_at, duration,"
                     " points_charged, reserved, agent FROM calls WHERE node = 'node-a' ORDER BY call_id")
        return rows if all(row[1] == "settled" for row in rows) else None

    rows = _wait("node-a's calls settled by another node", settled, timeout=LEASE + 20 * HEARTBEAT)
    assert [row[0] for row in rows] == dead_calls
    for call_id, state, reason, started_at, heartbeat_at, ended_at, duration, charged, reserved, agent in rows:
        assert reason == "crash"
        assert ended_at == heartbeat_at < killed_at, "charged to its last heartbeat"
        assert duration == pytest.approx(heartbeat_at - started_at) and duration >= 2 * HEARTBEAT - 0.5
        assert charged == points_for(duration, 60.0, 1) and reserved == 0  # the shipped demo agent: 1 point a minute
    swept = _events(b, SWEPT, b_log) + _events(c, SWEPT, c_log)
    for call_id in dead_calls:
        assert sum(call_id in line for line in swept) == 1, f"{call_id} settled once, by one node: {swept}"

    # the calls on the living nodes went on all along: end them, they settle as usual
    for caller in callers["node-b"] + callers["node-c"]:
        assert not caller.closed
        caller.send_json({"type": "end_call"})
        caller.wait_closed(timeout=30)
    live = _wait("the living nodes' calls settled", lambda: (lambda rows: rows if all(
        r[1] == "settled" for r in rows) else None)(_rows(
            pg_url, "SELECT call_id, state, end_reason, points_charged FROM calls WHERE node <> 'node-a'")), 30)
    assert sorted(r[2] for r in live) == ["end_call", "end_call"]

    # the dead node comes back: nothing of its calls is settled, or charged, again
    before = _rows(pg_url, "SELECT * FROM calls ORDER BY call_id")
    balance = json.loads(b.cli("points", "show", "acme", "--json"))["points"]
    a_log = len(a.log_text())
    a.start(timeout=120)
    time.sleep(3 * HEARTBEAT)  # its start-up settlement and a few sweeps
    assert _rows(pg_url, "SELECT * FROM calls ORDER BY call_id") == before
    assert json.loads(a.cli("points", "show", "acme", "--json"))["points"] == balance
    assert _events(a, ORPHANED, a_log) == [] and _events(a, SWEPT, a_log) == []

    charges = [r[0] for r in _rows(pg_url, "SELECT points_charged FROM calls")]
    assert balance == start_balance - sum(charges) >= 0
    assert _rows(pg_url, "SELECT reserved FROM accounts WHERE name = 'acme'") == [(0,)]
    assert len(charges) == 4
