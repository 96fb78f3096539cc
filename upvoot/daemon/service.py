"""The running daemon: one service that owns the shared parts of all calls.

It owns the database, the worker pool, the agents (models loaded once), the
shared pacing tick, the admission rules, and the list of running calls.
Listeners are its children (``strports`` services), so a busy port or a bad
certificate stops twistd with an error instead of leaving a daemon that
listens nowhere.

Start-up order: the database opens synchronously in ``startService`` (an
unwritable path fails the start); models load in a thread and the agents'
fixed lines are synthesized; until then upgrades get 503, so no caller ever
hears a half-ready agent.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.ledger import recordings as recording
from upvoot.ledger import spool as spoolmod
from upvoot.ledger import store as storemod
from upvoot.daemon.admission import AbuseGuard
from upvoot.daemon.agents import AgentRegistry
from upvoot.config import Config
from upvoot.engines.interfaces import EngineContext
from upvoot.daemon.metrics import Metrics
from upvoot.call.playout import Pacer
from upvoot.daemon.workers import WorkerPool


class LagMonitor:
    """How late the reactor runs a timer: the admission signal for
    "this process is saturated". Exponentially averaged, sampled every 50 ms."""

    def __init__(self, clock: Any, interval: float = 0.05, on_lag: Any = None) -> None:
        self.clock = clock
        self.interval = interval
        self._on_lag = on_lag  # called with each tick's lag (seconds): the metrics histogram
        self.average = 0.0
        self.worst = 0.0
        self._expected = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._expected = self.clock.seconds() + self.interval
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        lag = max(0.0, now - self._expected)
        self._expected = now + self.interval
        self.average = 0.8 * self.average + 0.2 * lag
        self.worst = max(self.worst, lag)
        if self._on_lag is not None:
            self._on_lag(lag)


class UpVootService(service.MultiService):
    _log = Logger()
    retry_after = 5
    stall_timeout = 10.0
    shutdown_timeout = 15.0  # closing lines are a few seconds long

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.store = storemod.Store(config.database, reactor)
        self.pool = WorkerPool(reactor, size=config.workers, queue_limit=config.worker_queue)
        self.metrics = Metrics(calls_active=lambda: len(self.calls), worker_queue=lambda: self.pool.queued,
                               delayed_calls=lambda: len(self.reactor.getDelayedCalls()), process=True)
        self.admin: Any = None  # the admin listener (add_admin_listener)
        self.pacer = Pacer(reactor, on_lag=self.metrics.pacing_lateness.observe)
        self.lag = LagMonitor(reactor, on_lag=self.metrics.reactor_lag.observe)
        self.guard = AbuseGuard(reactor, config.auth_failure_limit, config.auth_failure_window,
                                config.max_calls_per_account)
        self.agents: AgentRegistry | None = None
        self.ready = False
        self.draining = False
        self.calls: set = set()
        self.calls_reserved = 0
        self.refusals: dict[int, int] = {}
        self.calls_total = 0
        self._settling: set[defer.Deferred] = set()
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        # blocking file work (recordings, the spool) runs on the reactor's threads, never on the reactor
        self.run_in_thread = recording.reactor_threads(reactor)
        self.recordings = recording.Recordings(config.recordings_dir, config.state_dir, config.recordings_keep,
                                               reactor, self.run_in_thread)
        self.spool = spoolmod.Spool(os.path.join(config.state_dir, "spool.jsonl"))
        self.spooler = spoolmod.Spooler(self.spool, lambda: spoolmod.settle_spooled(self.spool, config.database),
                                        reactor, self.run_in_thread,
                                        on_applied=lambda record, charged: self.metrics.points(charged))

    # ------------------------------------------------------------ lifecycle
    def add_listeners(self, endpoints: list[str], factory: Any) -> None:
        self._listeners: list[tuple[str, Any, Any]] = []
        for description in endpoints:
            svc = strports.service(description, factory)
            svc.setServiceParent(self)
            self._listeners.append((description, factory, svc))

    @defer.inlineCallbacks
    def reload_tls(self):
        """Pick up renewed certificates (SIGHUP): each ``ssl:`` listener is
        replaced by a new one reading the files again. Running calls are not
        touched (closing a listening port leaves its connections open); new
        connections are refused for the moment between the two ports."""
        for i, (description, factory, old) in enumerate(list(getattr(self, "_listeners", []))):
            if not description.startswith(("ssl:", "haproxy:ssl:")):
                continue
            try:
                new = strports.service(description, factory)
            except Exception:
                self._log.failure("Bad TLS listener {description}", event="tls.reload_failed", description=description)
                continue
            yield old.disownServiceParent()
            try:
                new.setServiceParent(self)
            except Exception:
                self._log.failure("Could not reload TLS listener; keeping the old certificate",
                                  event="tls.reload_failed")
                old.setServiceParent(self)
                continue
            self._listeners[i] = (description, factory, new)
            self._log.info("TLS listener reloaded", event="tls.reloaded")

    def _install_sighup(self) -> None:
        import signal

        def on_hup(signum, frame):
            self.reactor.callFromThread(self.reload_tls)

        try:
            signal.signal(signal.SIGHUP, on_hup)
        except ValueError:  # not the main thread (tests)
            pass

    def add_admin_listener(self, description: str, factory: Any) -> None:
        """The admin listener (``upvoot.daemon.web``) is not a child: it listens
        first and closes last, so /healthz answers 503 while calls drain."""
        self.admin = strports.service(description, factory)

    def privilegedStartService(self) -> None:
        if self.admin is not None:
            self.admin.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        self.store.start()
        self.pool.start()
        self.lag.start()
        # spooled records first: a call settled late must not be settled as a crash
        self.spooler.report(spoolmod.settle_spooled(self.spool, self.config.database))
        self.settle_orphans()
        self.spooler.start(now=False)
        if any(agent.record for agent in self.config.agents.values()) or os.path.isdir(self.config.recordings_dir):
            self.recordings.start()
        self._heartbeat.start(self.config.heartbeat, now=False)
        self._install_sighup()
        registry = AgentRegistry(self.config.agents, EngineContext(pool=self.pool, clock=self.reactor))
        d = registry.prepare(self.reactor)

        def ready(_: object) -> None:
            self.agents = registry
            self.ready = True
            self._log.info("UpVoot ready: {n} agents", event="upvoot.ready", n=len(registry.agents))

        def failed(f):
            self._log.failure("Could not load the engines; stopping", f, event="upvoot.engines_failed")
            if self.reactor.running:
                self.reactor.stop()

        d.addCallbacks(ready, failed)
        if self.admin is not None:
            self.admin.startService()
        super().startService()

    def settle_orphans(self, now: float | None = None) -> list[storemod.CallRecord]:
        """Settle the calls a dead process left active (end reason ``crash``,
        charged to their last heartbeat). Synchronous: run at start, before
        any call can be open."""
        conn = storemod.connect(self.config.database)
        try:
            orphans = storemod.transact(conn, storemod.settle_orphans, time.time() if now is None else now,
                                        "crash", self._charge_for)
        finally:
            conn.close()
        for record in orphans:
            self._log.warn("Settled call {call_id} left active by a dead process: {duration:.0f}s, {points} points",
                           event="store.orphan_settled", call_id=record.call_id, duration=record.duration,
                           points=record.points_charged)
        return orphans

    def _charge_for(self, record: storemod.CallRecord) -> int:
        """Points for an orphaned call: the duration its last heartbeat proves."""
        cfg = self.config.agents.get(record.agent)
        if cfg is None:
            return 0
        return math.ceil(max(0.0, record.duration) / cfg.billing_increment) * cfg.points_per_increment

    def _beat(self) -> None:
        now = time.time()
        for proto in list(self.calls):
            d = self.store.heartbeat(proto.core.call_id, now)
            d.addErrback(lambda f: self._log.failure("Heartbeat failed", f, event="store.heartbeat_failed"))

    @defer.inlineCallbacks
    def stopService(self):
        """Graceful drain (SIGTERM). The reactor keeps running while this
        Deferred is pending, so:

        1. new upgrades get 503 with Retry-After (the listeners stay up);
        2. running calls may finish on their own for up to ``drain_time``;
        3. the rest are ended with the agent's goodbye line (end reason
           ``shutdown``), up to ``shutdown_timeout`` more;
        4. every call record is written, then the database closes.
        """
        self.draining = True
        if self.calls:
            self._log.info("Draining: {n} calls running; waiting up to {t}s", event="upvoot.draining",
                           n=len(self.calls), t=self.config.drain_time)
        yield self._wait_for_calls(self.config.drain_time)
        for proto in list(self.calls):
            if proto.machine is not None:
                proto.machine.shutdown()
        yield self._wait_for_calls(self.shutdown_timeout)
        yield super().stopService()  # now the listeners
        for proto in list(self.calls):  # still there: cut them off
            self._log.warn("Call {call_id} did not end in time; disconnecting", event="call.forced_end",
                           call_id=proto.core.call_id)
            proto.machine.hangup()
            proto.dropConnection(abort=True)
        if self._settling:
            yield defer.DeferredList(list(self._settling))
        yield self.spooler.stop()
        yield self.recordings.stop()
        self.lag.stop()
        if self._heartbeat.running:
            self._heartbeat.stop()
        self.pool.stop()
        self.store.close()
        if self.admin is not None and self.admin.running:
            yield self.admin.stopService()
        # A drain that wrote every record is a clean exit: twistd would
        # otherwise re-raise SIGTERM and exit with its status.
        if hasattr(self.reactor, "_exitSignal"):
            self.reactor._exitSignal = None

    def _wait_for_calls(self, timeout: float) -> defer.Deferred:
        d = defer.Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            if not self.calls or self.clock.seconds() >= deadline:
                loop.stop()

        loop = LoopingCall(check)
        loop.clock = self.clock
        loop.start(0.05).addBoth(lambda _: d.callback(None))
        return d

    # ------------------------------------------------------------ admission
    def admission_refusal(self) -> str | None:
        """Why a new call must be refused now, or None."""
        if not self.ready:
            return "starting"
        if self.draining:
            return "draining"
        if len(self.calls) + self.calls_reserved >= self.config.max_calls:
            return f"max_calls ({self.config.max_calls}) reached"
        if self.pool.saturated():
            return "worker pool saturated"
        if self.lag.average > self.config.lag_budget:
            return f"reactor lag {self.lag.average * 1000:.0f} ms over budget"
        return None

    def note_refusal(self, status: int) -> None:
        self.refusals[status] = self.refusals.get(status, 0) + 1
        self.metrics.refused(status)

    # ---------------------------------------------------------------- calls
    def call_opened(self, proto: Any) -> None:
        self.calls.add(proto)
        self.calls_total += 1
        self.metrics.call_started(proto.framing.name)
        recorder = getattr(proto.core, "recorder", None)
        start = storemod.CallStart(
            call_id=proto.core.call_id, key_prefix=proto.key_info.prefix, account=proto.key_info.account,
            agent=proto.key_info.agent, provider=proto.framing.name, started_at=proto.core.started_wall,
            # the recording's path too, so a call settled as a crash still names it
            metadata={"peer": proto.peer, **({"recording": recorder.relpath} if recorder is not None else {})},
        )
        d = self.store.open_call(start)
        d.addErrback(lambda f: self._log.failure("Could not record call start", f, event="store.open_failed",
                                                 call_id=start.call_id))

    def recorder_for(self, call_id: str) -> recording.CallRecorder:
        """A recorder for a call of an agent with ``record = yes``."""
        return self.recordings.recorder(call_id)

    def call_ended(self, proto: Any, summary: dict) -> None:
        self.calls.discard(proto)
        self.metrics.call_ended(summary)
        recorder = getattr(getattr(proto, "core", None), "recorder", None)
        if recorder is not None:
            self.recordings.finalize(recorder)  # in a thread; stopService waits for it
        record = storemod.CallRecord(
            call_id=summary["call_id"], key_prefix=summary["key_prefix"], account=summary["account"],
            agent=summary["agent"], provider=summary["provider"], started_at=summary["started_at"],
            ended_at=summary["ended_at"], duration=summary["duration"], end_reason=summary["end_reason"],
            turns=summary["turns"], barge_ins=summary["barge_ins"], barge_ins_resumed=summary["barge_ins_resumed"],
            points_charged=summary["points_charged"], transcript=summary["transcript"],
            metadata={**summary["metadata"], "engine_failures": summary["engine_failures"],
                      "latencies": summary["latencies"]},
        )
        d = self.store.settle_call(record)
        self._settling.add(d)

        def done(charged):
            self._settling.discard(d)
            self.metrics.points(charged)
            self._log.info("Call {call_id} settled: {charged} points", event="call.settled",
                           call_id=record.call_id, charged=charged)

        def failed(f):
            # the database is unavailable: keep the record in the spool (fsynced) until it returns
            self._log.warn("Could not settle call {call_id} ({error}); spooling it", event="store.settle_failed",
                           call_id=record.call_id, error=f.getErrorMessage())
            spooled = self.spooler.add(spoolmod.record_to_json(record))

            def kept(_):
                self._settling.discard(d)
                self._log.warn("Call {call_id} spooled: settled when the database returns", event="store.settle_spooled",
                               call_id=record.call_id)

            def lost(f2):
                self._settling.discard(d)
                self._log.failure("Could not spool call {call_id}: its record is only in this log: {record}", f2,
                                  event="store.settle_lost", call_id=record.call_id,
                                  record=spoolmod.record_to_json(record))

            return spooled.addCallbacks(kept, lost)

        d.addCallbacks(done, failed)
