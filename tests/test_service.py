"""upvoot.daemon.service without models or sockets: the lag monitor, the
settlement at start of calls a dead process left active, and the calls as
the service keeps them (fake ``ICallHandle``s on a ``task.Clock``): start,
heartbeats, end and settlement, drain, forced end, a failed start.

The admission policy has its own tests: tests/test_admission.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from upvoot.call.handle import ICallHandle
from upvoot.call.outcome import CallOutcome, EndReason
from upvoot.daemon.seams import Admission, IVoiceService
from upvoot.framing.base import CallStarted
from upvoot.ledger.threads import synchronous

from upvoot.ledger import store
from upvoot.config import load_config
from upvoot.daemon.lag import LagMonitor
from upvoot.daemon.tap import build_service
from upvoot.testing import agent_config, make_agent

T0 = 1_700_000_000.0

INI = """\
[upvoot]
database = upvoot.sqlite3
max_calls = 2
lag_budget = 150ms
workers = 2
worker_queue = 3

[agent:demo]
points_per_increment = 2
billing_increment = 30s
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "upvoot.ini"
    path.write_text(INI)
    return load_config(str(path))


@pytest.fixture
def service(config):
    return build_service(config, Clock(), run_in_thread=synchronous, process=FakeProcess())


# -------------------------------------------------------------- lag monitor


def test_lag_monitor_measures_how_late_its_timer_runs():
    clock = Clock()
    seen: list[float] = []
    lag = LagMonitor(clock, interval=0.05, on_lag=seen.append)
    lag.start()
    clock.advance(0.05)  # on time
    assert (lag.average, lag.worst) == (0.0, 0.0)
    clock.advance(0.25)  # the reactor was blocked: the tick due at 0.10 runs at 0.30
    assert lag.worst == pytest.approx(0.2)
    assert lag.average == pytest.approx(0.2 * 0.2)
    clock.advance(0.05)  # on time again: the average decays, the worst stays
    assert lag.average == pytest.approx(0.8 * 0.04)
    assert lag.worst == pytest.approx(0.2)
    assert seen == pytest.approx([0.0, 0.2, 0.0])
    lag.stop()
    assert clock.getDelayedCalls() == []


def test_lag_monitor_on_time_ticks_show_no_lag():
    clock = Clock()
    lag = LagMonitor(clock, interval=0.05)
    lag.start()
    for _ in range(100):
        clock.advance(0.05)
    assert lag.average == pytest.approx(0.0, abs=1e-9) and lag.worst == pytest.approx(0.0, abs=1e-9)
    lag.stop()
    lag.stop()  # twice is fine
    assert clock.getDelayedCalls() == []


# ------------------------------------------------------- orphans at start


def seed_orphans(config) -> dict:
    """A database as a crashed daemon leaves it: two calls still 'active'
    (one of an agent no longer configured), and one settled call; and an
    active call of another node, which this node must leave alone."""
    conn = store.connect(config.database)
    try:
        _, prefix = store.transact(conn, store.create_key, "acme", "demo", T0)
        store.transact(conn, store.add_points, "acme", 100)
        for call_id, agent, started in (("alive-75s", "demo", T0), ("retired", "gone", T0 + 10), ("done", "demo", T0 + 20)):
            store.transact(conn, store.open_call, store.CallStart(
                call_id=call_id, key_prefix=prefix, account="acme", agent=agent, provider="raw", started_at=started,
                node=config.node_id))
        store.transact(conn, store.open_call, store.CallStart(
            call_id="theirs", key_prefix=prefix, account="acme", agent="demo", provider="raw", started_at=T0,
            node="another-node"))
        store.transact(conn, store.heartbeat, "alive-75s", T0 + 75.0)
        store.transact(conn, store.settle_call, store.CallRecord(
            call_id="done", key_prefix=prefix, account="acme", agent="demo", provider="raw", started_at=T0 + 20,
            ended_at=T0 + 30, duration=10.0, end_reason="hangup", points_charged=2))
    finally:
        conn.close()
    return {"prefix": prefix}


def read(config, fn, *args):
    conn = store.connect(config.database)
    try:
        return store.transact(conn, fn, *args)
    finally:
        conn.close()


def test_orphans_are_settled_once_as_crash_and_charged_to_the_last_heartbeat(service, config):
    seed_orphans(config)
    assert read(config, store.get_account, "acme")["points"] == 98
    settled = service.settle_orphans(now=T0 + 3600)
    assert sorted(r.call_id for r in settled) == ["alive-75s", "retired"]
    call = read(config, store.get_call, "alive-75s")
    assert call["state"] == "settled" and call["end_reason"] == "crash"
    assert call["duration"] == pytest.approx(75.0) and call["ended_at"] == pytest.approx(T0 + 75.0)
    # 2 points per started 30 s: 75 s is three increments
    assert call["points_charged"] == math.ceil(75 / 30) * 2 == 6
    retired = read(config, store.get_call, "retired")
    assert (retired["end_reason"], retired["duration"], retired["points_charged"]) == ("crash", 0.0, 0)
    done = read(config, store.get_call, "done")
    assert (done["end_reason"], done["points_charged"]) == ("hangup", 2)  # untouched
    assert read(config, store.get_account, "acme")["points"] == 98 - 6
    assert read(config, store.get_call, "theirs")["state"] == "active", "another node's call: its sweeper's"
    # once: a second start charges nothing more
    assert service.settle_orphans(now=T0 + 7200) == []
    assert read(config, store.get_account, "acme")["points"] == 92


def test_start_of_the_service_settles_orphans(config, monkeypatch):
    """startService runs the settlement before it takes calls (engines faked)."""
    seed_orphans(config)

    class Registry:
        def __init__(self, configs):
            self.agents = {name: make_agent(agent_config(name=name)) for name in configs}

        def prepare(self):
            return defer.succeed(None)

    reactor = MemoryReactorClock()
    service = build_service(config, reactor, agents=Registry(config.agents), process=FakeProcess())
    service.startService()
    try:
        assert service.ready and set(service.agents.agents) == {"demo"}
        call = read(config, store.get_call, "alive-75s")
        assert (call["state"], call["end_reason"], call["points_charged"]) == ("settled", "crash", 6)
        assert read(config, store.get_account, "acme")["points"] == 92
    finally:
        d = service.stopService()
        for _ in range(10):
            reactor.advance(0.05)
        assert d.called
    assert read(config, store.get_account, "acme")["points"] == 92


# ------------------------------------------------------------ fakes of the seams


class FakeProcess:
    """What the service needs of the process (``tap.ReactorProcess``)."""

    def __init__(self) -> None:
        self.sighup = None
        self.failures: list[str] = []
        self.drained_ = False

    def on_sighup(self, fn) -> None:
        self.sighup = fn

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def drained(self) -> None:
        self.drained_ = True


@implementer(ICallHandle)
class FakeHandle:
    """A call as ``upvoot.call.new_call`` returns it, ending when told to.
    ``shutdown`` ends it (the goodbye takes ``goodbye`` seconds, None: never)."""

    def __init__(self, calls: "FakeCalls", agent, line, clock, pacer, on_ended, *, call_id, lead, min_lead,
                 log_transcripts, recorder) -> None:
        self.calls = calls
        self.agent = agent
        self.line = line
        self.clock = clock
        self.on_ended = on_ended
        self.call_id = call_id
        self.kw = {"lead": lead, "min_lead": min_lead, "log_transcripts": log_transcripts, "recorder": recorder}
        self.started_at = calls.wall()
        self.events: list[str] = []
        self.ended = False

    def start(self) -> None:
        self.events.append("start")

    def caller_audio(self, pcm: bytes) -> None:
        self.events.append("audio")

    def caller_dtmf(self, digit: str) -> None:
        self.events.append("dtmf")

    def playout_acknowledged(self, name: str, cleared: bool) -> None:
        self.events.append("ack")

    def end_requested(self) -> None:
        self.events.append("end_requested")

    def shutdown(self) -> None:
        self.events.append("shutdown")
        if self.calls.goodbye is not None:
            self.clock.callLater(self.calls.goodbye, self.end, EndReason.SHUTDOWN)

    def hangup(self) -> None:
        self.events.append("hangup")
        self.end(EndReason.HANGUP)

    def out_of_points(self) -> None:
        self.events.append("out_of_points")
        if self.calls.goodbye is not None:  # the closing line, then the end
            self.clock.callLater(self.calls.goodbye, self.end, EndReason.NO_POINTS,
                                 self.calls.wall() - self.started_at + self.calls.goodbye)

    def end(self, reason: EndReason = EndReason.HANGUP, duration: float = 65.0, **fields) -> None:
        if self.ended:
            return
        self.ended = True
        outcome = dict(call_id=self.call_id, agent=self.agent.config.name, started_at=self.started_at,
                       ended_at=self.started_at + duration, duration=duration, end_reason=reason, turns=2,
                       barge_ins=0, barge_ins_resumed=0, engine_failures=0, latencies=(), transcript=())
        outcome.update(fields)
        self.on_ended(CallOutcome(**outcome))


class FakeCalls:
    """``new_call`` for the service: makes FakeHandles and keeps them."""

    def __init__(self, wall) -> None:
        self.wall = wall
        self.handles: list[FakeHandle] = []
        self.goodbye: float | None = 1.0

    def new_call(self, *args, **kw) -> FakeHandle:
        handle = FakeHandle(self, *args, **kw)
        self.handles.append(handle)
        return handle


class SyncStore:
    """The Store's interface, run inline on the real database (no threads),
    noting the order of what it is asked."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.asked: list[tuple] = []
        self.down = False

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, fn, *args, **kw) -> defer.Deferred:
        name = getattr(fn, "__name__", "")
        if name == "open_reserved":
            self.asked.append(("open", args[0].call_id, args[0].started_at))
        elif name == "beat":
            self.asked.append(("heartbeat", args[0], args[1]))
        elif name == "settle_call":
            self.asked.append(("settle", args[0].call_id))
        if self.down:
            return defer.fail(store.StoreError("database is locked"))
        conn = store.connect(self.database)
        try:
            return defer.succeed(store.transact(conn, fn, *args, **kw))
        finally:
            conn.close()

    def authenticate(self, key: str) -> defer.Deferred:
        return self.run(store.lookup_key, key)

    def settle_call(self, record) -> defer.Deferred:
        return self.run(store.settle_call, record)


class Wall:
    """A wall clock that moves only when told (and a little on every read)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class Ready:
    """A service built on fakes, ready for calls (no start: nothing runs but the Clock)."""

    def __init__(self, config) -> None:
        self.config = config
        self.clock = Clock()
        self.wall = Wall()
        self.store = SyncStore(config.database)
        store.connect(config.database).close()  # the schema
        conn = store.connect(config.database)
        try:
            self.key, self.prefix = store.transact(conn, store.create_key, "acme", "demo", T0)
            store.transact(conn, store.create_key, "acme", "other", T0)
            store.transact(conn, store.add_points, "acme", 100)
        finally:
            conn.close()
        self.calls = FakeCalls(self.wall)
        self.process = FakeProcess()
        agents = {name: make_agent(config.agents[name]) for name in ("demo", "other")}
        self.registry = SimpleNamespace(agents=agents, prepare=lambda: defer.succeed(None))
        self.service = build_service(config, self.clock, store=self.store, run_in_thread=synchronous,
                                     new_call=self.calls.new_call, process=self.process, wall=self.wall,
                                     agents=self.registry)
        self.service.agents = self.registry
        self.service.ready = True
        self.disconnected: list[str] = []

    def admission(self) -> Admission:
        out = []
        self.service.admit(f"/voice/{self.key}", "tcp4:127.0.0.1:5555", {}, {}).addCallback(out.append)
        assert isinstance(out[0], Admission), out
        return out[0]

    def start(self, started: CallStarted | None = None, admission: Admission | None = None):
        admission = admission or self.admission()
        out = []
        line = SimpleNamespace(name="line")
        self.service.start_call(admission, started or CallStarted(provider="raw"), line,
                                lambda: self.disconnected.append(admission.key_prefix)).addCallback(out.append)
        assert out, "start_call has not answered"
        return out[0]

    def row(self, call_id: str) -> dict:
        return read(self.config, store.get_call, call_id)


INI_CALLS = INI.replace("max_calls = 2", "max_calls = 4").replace("[agent:demo]", """max_calls_per_account = 5
heartbeat = 15s
drain_time = 10s

[agent:other]

[agent:demo]
agent_select = agent""")


@pytest.fixture
def ready(tmp_path):
    path = tmp_path / "upvoot.ini"
    path.write_text(INI_CALLS)
    return Ready(load_config(str(path)))


def test_the_service_provides_ivoiceservice(ready):
    assert verifyObject(IVoiceService, ready.service)


def test_a_started_call_is_kept_by_its_handle_opened_and_beaten_at_once(ready, logged):
    started = CallStarted(provider="twilio", call_id="CA1", stream_id="MZ1", from_number="+15550001")
    handle = ready.start(started)
    assert isinstance(handle, FakeHandle) and verifyObject(ICallHandle, handle)
    assert handle.events == ["start"] and handle.line.name == "line"
    assert handle.kw == {"lead": ready.config.playout_lead, "min_lead": ready.config.playout_lead_min,
                         "log_transcripts": ready.config.log_transcripts, "recorder": None}
    assert list(ready.service.calls) == [handle.call_id]
    # opened, then a heartbeat at once (not a beat-interval later)
    (op, cid, started_at), (beat, cid2, beat_at) = ready.store.asked
    assert (op, beat, cid, cid2) == ("open", "heartbeat", handle.call_id, handle.call_id)
    assert beat_at > started_at
    row = ready.row(handle.call_id)
    assert row["state"] == "active" and row["provider"] == "twilio" and row["agent"] == "demo"
    assert row["metadata"] == {"peer": "tcp4:127.0.0.1:5555", "provider": "twilio", "call_id": "CA1",
                               "stream_id": "MZ1", "from_number": "+15550001"}
    [line] = [e for e in logged if e.get("event") == "call.started"]
    assert (line["call_id"], line["prefix"], line["account"], line["agent"], line["provider"], line["peer"]) == (
        handle.call_id, ready.prefix, "acme", "demo", "twilio", "tcp4:127.0.0.1:5555")
    m = ready.service.metrics.registry.get_sample_value
    assert m("upvoot_calls_active") == 1 and m("upvoot_calls_started_total", {"provider": "twilio"}) == 1


def test_a_call_killed_before_its_first_beat_charges_what_it_held(ready):
    """The opening heartbeat proves the call was running: a crash settles it
    with its first increment, not as 0 s and 0 points."""
    handle = ready.start()
    ready.wall.now += 5.0  # killed 5 s in, before the heartbeat loop's first beat
    [orphan] = ready.service.settle_orphans(now=ready.wall.now)
    assert orphan.call_id == handle.call_id and orphan.duration > 0
    assert orphan.points_charged == 2  # one started 30 s increment
    assert read(ready.config, store.get_account, "acme")["points"] == 98


def test_heartbeats_go_by_call_id_every_interval(ready):
    first, second = ready.start(), ready.start()
    ready.service._heartbeat.start(ready.config.heartbeat, now=False)
    ready.store.asked.clear()
    ready.clock.advance(15.0)
    assert sorted(a[1] for a in ready.store.asked if a[0] == "heartbeat") == sorted([first.call_id, second.call_id])
    first.end()
    ready.store.asked.clear()
    ready.clock.advance(15.0)
    assert [a[1] for a in ready.store.asked if a[0] == "heartbeat"] == [second.call_id]
    second.end()
    ready.service._heartbeat.stop()


def test_the_outcome_is_settled_counted_logged_and_gives_the_slot_back(ready, logged):
    handle = ready.start()
    assert ready.service.admission.held == 1 and ready.row(handle.call_id)["state"] == "active"
    handle.end(EndReason.MAX_TURNS, duration=65.0, engine_failures=1,
               latencies=({"voice_to_voice": 0.9, "endpointing": 0.6},))
    assert ready.service.calls == {}
    assert ready.service.admission.held == 0
    row = ready.row(handle.call_id)
    assert (row["state"], row["end_reason"], row["duration"], row["points_charged"]) == ("settled", "max_turns",
                                                                                        65.0, 6)
    assert row["metadata"]["engine_failures"] == 1 and row["metadata"]["peer"] == "tcp4:127.0.0.1:5555"
    assert read(ready.config, store.get_account, "acme")["points"] == 94
    [line] = [e for e in logged if e.get("event") == "call.ended"]
    assert (line["call_id"], line["reason"], line["duration"], line["turns"], line["points"]) == (
        handle.call_id, "max_turns", 65.0, 2, 6)
    m = ready.service.metrics.registry.get_sample_value
    assert m("upvoot_calls_total", {"end_reason": "max_turns", "provider": "raw"}) == 1
    assert m("upvoot_points_charged_total") == 6
    assert m("upvoot_engine_errors_total", {"engine": "unknown"}) == 1


def test_a_failed_settlement_is_spooled(ready, logged):
    handle = ready.start()
    ready.store.down = True
    handle.end()
    assert [r["call_id"] for r in ready.service.spool.records()] == [handle.call_id]
    assert any(e.get("event") == "store.settle_spooled" for e in logged)


def test_a_custom_parameter_picks_another_agent_of_the_account(ready):
    handle = ready.start(CallStarted(provider="twilio", custom={"agent": "other"}))
    assert handle.agent.config.name == "other"
    assert ready.row(handle.call_id)["agent"] == "other"


def test_a_custom_parameter_cannot_pick_an_agent_the_account_has_no_key_for(ready, logged):
    handle = ready.start(CallStarted(provider="twilio", custom={"agent": "nosuch"}))
    assert handle.agent.config.name == "demo"
    assert any(e.get("event") == "call.agent_refused" for e in logged)


def test_no_call_starts_on_an_admission_the_adapter_gave_back(ready):
    """The connection closed while the agent was looked up."""
    admission = ready.admission()
    lookup = defer.Deferred()
    ready.store.run = lambda fn, *a: lookup
    out = []
    ready.service.start_call(admission, CallStarted(provider="twilio", custom={"agent": "other"}), None,
                             lambda: None).addCallback(out.append)
    assert out == []
    admission.release()
    lookup.callback({"other"})
    assert out == [None] and ready.calls.handles == [] and ready.service.admission.held == 0


def test_the_adapters_release_after_the_start_keeps_the_slot_until_the_end(ready):
    admission = ready.admission()
    handle = ready.start(admission=admission)
    admission.release()
    assert ready.service.admission.held == 1
    handle.end()
    assert ready.service.admission.held == 0


def test_drain_waits_then_says_goodbye_then_cuts_off_what_is_left(ready, logged):
    polite, stuck, quick = ready.start(), ready.start(), ready.start()
    stop = ready.service.stopService()
    ready.clock.advance(5.0)
    quick.end()  # ended on its own within drain_time: never shut down
    assert ready.service.draining and polite.events == stuck.events == ["start"]
    stuck.shutdown = lambda: stuck.events.append("shutdown")  # its goodbye never finishes
    for _ in range(int(10.0 / 0.05) + 2):
        ready.clock.advance(0.05)
    assert polite.events == ["start", "shutdown"] and stuck.events == ["start", "shutdown"]
    assert quick.events == ["start"]
    ready.clock.advance(1.0)  # the polite goodbye ends its call
    assert list(ready.service.calls) == [stuck.call_id]
    for _ in range(int(15.0 / 0.05) + 2):
        ready.clock.advance(0.05)
    assert stop.called
    assert stuck.events == ["start", "shutdown", "hangup"] and ready.disconnected == [ready.prefix]
    assert [e["call_id"] for e in logged if e.get("event") == "call.forced_end"] == [stuck.call_id]
    reasons = {h.call_id: ready.row(h.call_id)["end_reason"] for h in (polite, stuck, quick)}
    assert reasons == {polite.call_id: "shutdown", stuck.call_id: "hangup", quick.call_id: "hangup"}
    assert ready.service.calls == {} and ready.service.admission.held == 0
    assert ready.process.drained_
    assert ready.clock.getDelayedCalls() == []


def test_while_draining_upgrades_are_refused_with_retry_after(ready):
    ready.service.draining = True
    out = []
    ready.service.admit(f"/voice/{ready.key}", "tcp4:127.0.0.1:1", {}, {}).addCallback(out.append)
    assert out[0].status == 503 and dict(out[0].headers)["Retry-After"] == "5"
    assert ready.service.refusals == {503: 1}


def test_engines_that_fail_to_load_stop_the_process_with_one_line(config):
    reactor = MemoryReactorClock()
    process = FakeProcess()
    registry = SimpleNamespace(agents={}, prepare=lambda: defer.fail(RuntimeError("greeting has a NUL")))
    service = build_service(config, reactor, agents=registry, process=process)
    service.startService()
    try:
        assert not service.ready
        assert process.failures == ["Could not load the engines: RuntimeError: greeting has a NUL"]
        assert "\n" not in process.failures[0]
    finally:
        d = service.stopService()
        for _ in range(10):
            reactor.advance(0.05)
        assert d.called


def test_a_call_that_starts_after_the_goodbyes_were_said_hears_its_own_at_once(ready):
    """Admitted before the drain, its start message came late."""
    admission = ready.admission()
    running = ready.start()
    stop = ready.service.stopService()
    for _ in range(int(10.0 / 0.05) + 2):
        ready.clock.advance(0.05)
    assert running.events == ["start", "shutdown"]
    late = ready.start(admission=admission)
    assert late.events == ["start", "shutdown"]
    for _ in range(40):
        ready.clock.advance(0.05)
    assert stop.called and ready.service.calls == {}
    assert ready.row(late.call_id)["end_reason"] == "shutdown"
