"""Running calls and their points on a task.Clock: heartbeats that extend
reservations, ``out_of_points`` (in the service and in the call itself),
the crash sweeper of every node, and the database going away.

The service runs on the fakes of tests/test_service.py (calls that end when
told, a store that runs the real transaction functions inline on a real
SQLite ledger); the races of real threads are in tests/test_reservations.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from upvoot.call.outcome import EndReason
from upvoot.config import load_config
from upvoot.daemon.admission import DatabaseState
from upvoot.daemon.seams import Admission
from upvoot.daemon.sweeper import Sweeper
from upvoot.daemon.tap import build_service
from upvoot.framing.base import CallStarted
from upvoot.ledger import reserve, store
from upvoot.ledger.threads import synchronous
from upvoot.testing import agent_config, make_agent
from tests.test_call import Harness
from tests.test_service import T0, FakeCalls, FakeProcess, SyncStore, Wall

INI = """\
[upvoot]
database = {database}
node_id = {node}
max_calls = 10
heartbeat = 15s
lease = 1m
reservation_horizon = 2m

[agent:demo]
points_per_increment = 2
billing_increment = 30s
"""


class Node:
    """One UpVoot node (a service on fakes) over the ledger in ``tmp_path``."""

    def __init__(self, tmp_path, database: str, node: str, points: int | None = None, wall: Wall | None = None,
                 ini: str = INI) -> None:
        path = tmp_path / f"{node}.ini"
        path.write_text(ini.format(node=node, database=database))
        self.config = load_config(str(path))
        self.clock = Clock()
        self.wall = wall or Wall()
        self.store = SyncStore(self.config.database)
        conn = store.connect(self.config.database)
        try:
            if points is not None:
                self.key, self.prefix = store.transact(conn, store.create_key, "acme", "demo", T0)
                store.transact(conn, store.add_points, "acme", points)
        finally:
            conn.close()
        self.calls = FakeCalls(self.wall)
        self.registry = SimpleNamespace(agents={"demo": make_agent(self.config.agents["demo"])},
                                        prepare=lambda: None)
        self.service = build_service(self.config, self.clock, store=self.store, run_in_thread=synchronous,
                                     new_call=self.calls.new_call, process=FakeProcess(), wall=self.wall,
                                     agents=self.registry)
        self.service.agents = self.registry
        self.service.ready = True

    def admit(self, key: str):
        out = []
        self.service.admit(f"/voice/{key}", "tcp4:127.0.0.1:5555", {}, {}).addCallback(out.append)
        return out[0]

    def start(self, key: str):
        admission = self.admit(key)
        assert isinstance(admission, Admission), admission
        out = []
        self.service.start_call(admission, CallStarted(provider="raw"), SimpleNamespace(name="line"),
                                lambda: None).addCallback(out.append)
        return out[0]

    def beat_for(self, seconds: float) -> None:
        """Time passes (wall and clock alike), the heartbeat loop beating."""
        for _ in range(int(seconds / 5.0)):
            self.wall.now += 5.0
            self.clock.advance(5.0)

    def read(self, fn, *args):
        conn = store.connect(self.config.database)
        try:
            return store.transact(conn, fn, *args)
        finally:
            conn.close()


@pytest.fixture
def database(any_database):
    """Each test runs on SQLite and on PostgreSQL (tests/pg.py)."""
    return any_database


@pytest.fixture
def node(tmp_path, database):
    n = Node(tmp_path, database, "node-a", points=100)
    n.service._heartbeat.start(n.config.heartbeat, now=False)
    yield n
    if n.service._heartbeat.running:
        n.service._heartbeat.stop()


def test_each_heartbeat_extends_the_reservation_ahead_of_the_call(node):
    handle = node.start(node.key)
    # 2 minutes ahead at 2 points per 30 s
    assert node.read(store.get_call, handle.call_id)["node"] == "node-a"
    assert node.read(reserve.account_balance, "acme") == (100, 8)
    node.beat_for(15.0)  # 15 s + 2 min ahead: 5 increments
    assert node.read(reserve.account_balance, "acme") == (100, 10)
    node.beat_for(45.0)  # 1 min + 2 min: 6 increments
    assert node.read(reserve.account_balance, "acme") == (100, 12)
    handle.end(duration=61.0)  # 3 started increments; the hold goes
    assert node.read(reserve.account_balance, "acme") == (94, 0)
    assert handle.events == ["start"]


def test_a_call_whose_reservation_cannot_be_extended_is_told_before_its_points_run_out(tmp_path, database, logged):
    n = Node(tmp_path, database, "node-a", points=8)  # exactly the horizon: 2 minutes
    n.service._heartbeat.start(n.config.heartbeat, now=False)
    handle = n.start(n.key)
    n.beat_for(75.0)  # 75 s in: 120 s held still covers the next beat and a closing line
    assert handle.events == ["start"]
    n.beat_for(15.0)  # 90 s in: 90 + 15 + 20 > 120
    assert handle.events == ["start", "out_of_points"]
    n.beat_for(15.0)  # told once; its closing line ended the call a second later
    assert handle.events == ["start", "out_of_points"] and n.service.calls == {}
    row = n.read(store.get_call, handle.call_id)
    assert (row["end_reason"], row["points_charged"]) == ("no_points", 8)
    assert n.read(reserve.account_balance, "acme") == (0, 0)
    assert [e["call_id"] for e in logged if e.get("event") == "call.no_points"] == [handle.call_id]
    n.service._heartbeat.stop()


def test_a_call_with_one_increment_left_is_admitted_then_ended_in_time(tmp_path, database):
    n = Node(tmp_path, database, "node-a", points=3)  # one increment (2 points) available, 30 s
    n.service._heartbeat.start(n.config.heartbeat, now=False)
    handle = n.start(n.key)
    assert handle.events == ["start", "out_of_points"], "30 s cannot hold a heartbeat and a closing line"
    n.beat_for(5.0)
    row = n.read(store.get_call, handle.call_id)
    assert (row["end_reason"], row["points_charged"]) == ("no_points", 2)
    assert n.read(reserve.account_balance, "acme") == (1, 0)
    assert n.admit(n.key).status == 402, "1 point: not one increment"
    n.service._heartbeat.stop()


def test_a_call_settled_by_another_node_meanwhile_is_ended(node, logged):
    handle = node.start(node.key)
    node.read(store.settle_orphans, node.wall.now + 1, "crash", lambda r: 2)  # a sweeper, say
    node.beat_for(15.0)
    assert handle.events == ["start", "out_of_points"]
    assert any(e.get("event") == "call.not_active" for e in logged)
    node.beat_for(5.0)
    assert node.read(reserve.account_balance, "acme") == (98, 0), "charged once, by the sweeper"


def test_while_the_database_is_gone_calls_run_on_what_they_hold_and_new_calls_get_503(node, logged):
    handle = node.start(node.key)
    assert node.read(reserve.account_balance, "acme") == (100, 8)  # 120 s held
    node.store.down = True
    node.beat_for(75.0)  # the heartbeats fail; 75 + 15 + 20 <= 120 held
    assert node.service.admission.database.problem == "unreachable"
    assert handle.events == ["start"]
    refusal = node.admit(node.key)
    assert refusal.status == 503 and dict(refusal.headers)["Retry-After"]
    node.beat_for(15.0)  # 90 s: what it holds cannot cover the next beat and a closing line
    assert handle.events == ["start", "out_of_points"]
    node.beat_for(5.0)  # it ended; its record waits in the spool
    assert [r["call_id"] for r in node.service.spool.records()] == [handle.call_id]
    node.store.down = False
    node.service.spooler.retry()
    row = node.read(store.get_call, handle.call_id)
    assert (row["end_reason"], row["points_charged"]) == ("no_points", 8)
    assert node.read(reserve.account_balance, "acme") == (100 - 8, 0)
    assert isinstance(node.admit(node.key), Admission)
    assert node.service.admission.database.problem is None
    events = [e.get("event") for e in logged]
    assert events.count("store.unreachable") == 1 and events.count("store.reachable") == 1


def test_an_admitted_connection_beats_until_it_begins_or_goes(node):
    admission = node.admit(node.key)
    node.beat_for(15.0)
    assert node.read(store.get_call, admission.call_id)["heartbeat_at"] == pytest.approx(node.wall.now, abs=0.1)
    admission.release()
    assert node.read(store.get_call, admission.call_id) is None
    assert node.read(reserve.account_balance, "acme") == (100, 0)


# ---- the crash sweeper ----------------------------------------------------------------------


def test_every_node_sweeps_the_calls_of_a_dead_node_after_the_lease_once(tmp_path, database, logged):
    wall = Wall()
    dead = Node(tmp_path, database, "node-a", points=100, wall=wall)
    a, b = Node(tmp_path, database, "node-b", wall=wall), Node(tmp_path, database, "node-c", wall=wall)
    handle = dead.start(dead.key)
    wall.now += 20.0
    dead.service.keeper.beat(handle.call_id, dead.service.calls[handle.call_id], wall.now)  # its last beat
    # node-a dies here (kill -9): nothing of it runs any more
    for n in (a, b):
        n.service.sweeper.start()
    wall.now += 59.0
    for n in (a, b):
        n.clock.advance(15.0)
    assert dead.read(store.get_call, handle.call_id)["state"] == "active", "within the lease"
    wall.now += 15.0
    a.clock.advance(15.0)
    b.clock.advance(15.0)
    row = a.read(store.get_call, handle.call_id)
    assert (row["state"], row["end_reason"], row["points_charged"]) == ("settled", "crash", 2)
    assert row["duration"] == pytest.approx(20.0, abs=0.01)
    assert a.read(reserve.account_balance, "acme") == (98, 0)
    assert [e["call_id"] for e in logged if e.get("event") == "sweep.settled"] == [handle.call_id]
    # node-a restarts: its own leftovers are settled already, nothing more is charged
    assert dead.service.settle_orphans(now=wall.now) == []
    assert a.read(reserve.account_balance, "acme") == (98, 0)
    for n in (a, b):
        n.service.sweeper.stop()


def test_two_sweepers_of_one_database_settle_a_call_once(tmp_path, database):
    n = Node(tmp_path, database, "node-a", points=100)
    conn = store.connect(n.config.database)
    try:
        for i in range(3):
            start = store.CallStart(call_id=f"c{i}", key_prefix=n.prefix, account="acme", agent="demo",
                                    provider="raw", started_at=T0, node="gone")
            store.transact(conn, reserve.open_reserved, start, 4, 2)
    finally:
        conn.close()
    wall = Wall()
    wall.now = T0 + 3600
    sweepers = [Sweeper(n.config, Clock(), SyncStore(n.config.database), DatabaseState(), wall) for _ in range(2)]
    first, second = (s.sweep() for s in sweepers)
    assert sorted(r.call_id for r in first.result) == ["c0", "c1", "c2"] and second.result == []
    assert n.read(reserve.account_balance, "acme") == (100, 0), "0 s of call: nothing charged, holds released"


def test_a_node_restarting_leaves_the_calls_of_other_nodes_alone(tmp_path, database):
    wall = Wall()
    a, b = Node(tmp_path, database, "node-a", points=100, wall=wall), Node(tmp_path, database, "node-b", wall=wall)
    running = b.start(a.key)  # a live call of node-b
    assert a.service.settle_orphans(now=wall.now + 10) == []
    assert a.read(store.get_call, running.call_id)["state"] == "active"


def test_max_calls_per_account_is_counted_over_all_nodes(tmp_path, database):
    ini = INI.replace("reservation_horizon = 2m", "reservation_horizon = 2m\nmax_calls_per_account = 2")
    a = Node(tmp_path, database, "node-a", points=100, ini=ini)
    b = Node(tmp_path, database, "node-b", ini=ini)
    assert isinstance(a.admit(a.key), Admission) and isinstance(b.admit(a.key), Admission)
    assert a.admit(a.key).status == 429 and b.admit(a.key).status == 429


# ---- the call itself ----------------------------------------------------------------------


def test_out_of_points_says_the_closing_line_and_ends_with_no_points():
    h = Harness(agent_config(silence_timeout=100.0, silence_prompt_after=0.0))
    h.start()
    h.until("listening")
    h.call.out_of_points()
    assert h.state == "ending"
    h.until("ended")
    assert h.out.transcripts()[-1] == ("agent", "Out of points goodbye")
    assert h.ended[0]["end_reason"] == EndReason.NO_POINTS == "no_points"
    assert h.clock.getDelayedCalls() == []


# ---- the options ----------------------------------------------------------------------------


def test_node_id_defaults_to_the_host_name_and_is_checked(tmp_path):
    from upvoot.config import ConfigError
    from upvoot.nodes import default_node_id

    assert default_node_id("web-1.example.com") == "web-1.example.com"
    assert default_node_id("_odd host!" + "x" * 100) == ("odd-host-" + "x" * 100)[:63]
    assert default_node_id("") == "node"
    path = tmp_path / "upvoot.ini"
    path.write_text("[upvoot]\n[agent:demo]\n")
    assert load_config(str(path)).node_id == default_node_id()
    for bad, option in (("node_id = no spaces", "node_id"), ("node_id = " + "x" * 64, "node_id"),
                        ("lease = 15s", "lease"), ("reservation_horizon = 30s", "reservation_horizon")):
        path.write_text(f"[upvoot]\n{bad}\n[agent:demo]\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(path))
        assert f"[upvoot] {option}" in str(e.value) or option in str(e.value)
