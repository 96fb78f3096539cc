"""upvoot.daemon.service without models: admission, the lag monitor, and the
settlement at start of calls a dead process left active."""

from __future__ import annotations

import math

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from upvoot.daemon import service as servicemod
from upvoot.ledger import store
from upvoot.config import load_config
from upvoot.daemon.service import LagMonitor, UpVootService
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
    return UpVootService(config, Clock())


# ---------------------------------------------------------------- admission


def test_admission_refuses_while_starting_then_admits(service):
    assert service.admission_refusal() == "starting"
    service.ready = True
    assert service.admission_refusal() is None


def test_admission_refuses_while_draining(service):
    service.ready = True
    service.draining = True
    assert service.admission_refusal() == "draining"


def test_admission_counts_running_and_reserved_calls_against_max_calls(service):
    service.ready = True
    service.calls.add(object())
    assert service.admission_refusal() is None  # 1 of 2
    service.calls_reserved = 1  # an upgrade between its key check and its open
    assert service.admission_refusal() == "max_calls (2) reached"
    service.calls.clear()
    service.calls_reserved = 2
    assert service.admission_refusal() == "max_calls (2) reached"
    service.calls_reserved = 1
    assert service.admission_refusal() is None


def test_admission_refuses_when_the_worker_pool_is_saturated(service):
    service.ready = True
    pool = service.pool
    assert (pool.size, pool.queue_limit) == (2, 3)
    pool.active = pool.size  # every thread busy...
    pool._queue.extend(object() for _ in range(pool.queue_limit - 1))
    assert service.admission_refusal() is None  # ...but room in the queue
    pool._queue.append(object())
    assert service.admission_refusal() == "worker pool saturated"


def test_admission_refuses_when_reactor_lag_is_over_budget(service):
    service.ready = True
    service.lag.average = 0.149
    assert service.admission_refusal() is None
    service.lag.average = 0.2
    assert service.admission_refusal() == "reactor lag 200 ms over budget"


def test_the_first_reason_wins(service):
    service.draining = True
    service.lag.average = 1.0
    assert service.admission_refusal() == "starting"
    service.ready = True
    assert service.admission_refusal() == "draining"


def test_refusals_are_counted_by_status(service):
    for status in (401, 401, 503):
        service.note_refusal(status)
    assert service.refusals == {401: 2, 503: 1}


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
    (one of an agent no longer configured), and one settled call."""
    conn = store.connect(config.database)
    try:
        _, prefix = store.transact(conn, store.create_key, "acme", "demo", T0)
        store.transact(conn, store.add_points, "acme", 100)
        for call_id, agent, started in (("alive-75s", "demo", T0), ("retired", "gone", T0 + 10), ("done", "demo", T0 + 20)):
            store.transact(conn, store.open_call, store.CallStart(
                call_id=call_id, key_prefix=prefix, account="acme", agent=agent, provider="raw", started_at=started))
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
    # once: a second start charges nothing more
    assert service.settle_orphans(now=T0 + 7200) == []
    assert read(config, store.get_account, "acme")["points"] == 92


def test_start_of_the_service_settles_orphans(config, monkeypatch):
    """startService runs the settlement before it takes calls (engines faked)."""
    seed_orphans(config)

    class Registry:
        def __init__(self, configs, context):
            self.agents = {name: make_agent(agent_config(name=name)) for name in configs}

        def prepare(self, reactor):
            return defer.succeed(None)

    monkeypatch.setattr(servicemod, "AgentRegistry", Registry)
    reactor = MemoryReactorClock()
    service = UpVootService(config, reactor)
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
