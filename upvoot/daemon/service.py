"""The running daemon: one service that owns the shared parts of all calls.

It holds the database, the worker pool, the agents (models loaded once),
the shared pacing tick, the admission policy, and the running calls, each
as its ``ICallHandle`` (never a socket). Every collaborator is built by the
composition root (``upvoot.daemon.tap.build_service``) and handed in.
Listeners are its children (``strports`` services), so a busy port or a bad
certificate stops twistd with an error instead of leaving a daemon that
listens nowhere.

Start-up order: the database opens synchronously in ``startService`` (an
unwritable path fails the start); models load in a thread and the agents'
fixed lines are synthesized; until then upgrades get 503, so no caller ever
hears a half-ready agent. A start that fails after that (engines, a greeting
that cannot be synthesized) stops the process with one line and a non-zero
exit status, so a supervisor restarts it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import attrs
from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from upvoot.call.outcome import CallOutcome
from upvoot.config import Config
from upvoot.daemon.admission import AbuseGuard, AdmissionPolicy
from upvoot.daemon.lag import LagMonitor
from upvoot.daemon.sweeper import CallKeeper, Sweeper
from upvoot.daemon.seams import Admission, IVoiceService
from upvoot.ledger import settlement
from upvoot.ledger import spool as spoolmod
from upvoot.ledger import store as storemod
from upvoot.ledger.threads import Pending


class StartFailed(Exception):
    """The daemon cannot start (a listener cannot bind): one line, exit 1."""


@attrs.define(eq=False)
class _Call:
    """A running call as the service keeps it: its handle and what its
    record needs. Never a socket: ``disconnect`` is the adapter's callable."""

    handle: Any  # ICallHandle
    admission: Admission
    release: Callable[[], None]  # gives the slot and the account's count back
    disconnect: Callable[[], None]
    agent: Any  # upvoot.daemon.agents.Agent
    provider: str
    metadata: dict
    recorder: Any = None
    started_at: float = 0.0  # wall time
    held: int = 0  # the points it holds of its account (upvoot.ledger.reserve)
    out_of_points: bool = False  # told so: its closing line is playing


@implementer(IVoiceService)
class UpVootService(service.MultiService):
    _log = Logger()
    shutdown_timeout = 15.0  # closing lines are a few seconds long

    def __init__(self, config: Config, clock: Any, *, process: Any, store: Any, pool: Any, metrics: Any,
                 pacer: Any, lag: LagMonitor, guard: AbuseGuard, agents: Any, recordings: Any, spool: Any, spooler: Any,
                 ledger: Any, new_call: Callable[..., Any], wall: Callable[[], float] = time.time) -> None:
        """``clock``: IReactorTime; ``process``: what the service needs of
        the process (``upvoot.daemon.tap.ReactorProcess``); ``agents``: the
        ``AgentRegistry``, prepared at start; ``new_call``: ``upvoot.call.new_call``;
        ``wall``: the wall clock of call records."""
        super().__init__()
        self.config = config
        self.clock = clock
        self.process = process
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.pacer = pacer
        self.lag = lag
        self.guard = guard
        self.registry = agents
        self.recordings = recordings
        self.spool = spool
        self.spooler = spooler
        self.ledger = ledger  # upvoot.ledger.ledger.Ledger: opens and settles calls, spooling what fails
        self._new_call = new_call
        self._wall = wall
        self.admin: Any = None  # the admin listener (add_admin_listener)
        self.agents: Any = None  # the registry, once its engines are loaded
        self.ready = False
        self.draining = False
        self._shutting_down = False
        self.calls: dict[str, _Call] = {}
        self.calls_total = 0
        self.admission = AdmissionPolicy(config, self, store, guard, pool, lag, metrics, wall=wall)
        self.keeper = CallKeeper(config, store, self.admission.database)  # heartbeats, reservations
        self.sweeper = Sweeper(config, clock, store, self.admission.database, wall,
                               on_settled=lambda record: metrics.points(record.points_charged))
        self._settling = Pending()
        self._listeners: list[tuple[str, Any, Any]] = []
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    # ------------------------------------------------------------ lifecycle
    def add_listeners(self, endpoints: list[str], factory: Any) -> None:
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
        for i, (description, factory, old) in enumerate(list(self._listeners)):
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

    def add_admin_listener(self, description: str, factory: Any) -> None:
        """The admin listener (``upvoot.daemon.web``) is not a child: it listens
        first and closes last, so /healthz answers 503 while calls drain."""
        self.admin = strports.service(description, factory)

    def privilegedStartService(self) -> None:
        """Listen (admin listener first). A port that cannot be had is a
        ``StartFailed``: twistd exits 1 with its one line."""
        try:
            if self.admin is not None:
                self.admin.privilegedStartService()
            super().privilegedStartService()
        except Exception as e:
            message = f"Could not listen: {e}".rstrip(".")
            self._log.critical("{message}", event="upvoot.start_failed", message=message)
            raise StartFailed(message) from None

    def startService(self) -> None:
        self.store.start()
        self.pool.start()
        self.lag.start()
        # spooled records first: a call settled late must not be settled as a crash
        self.spooler.report(spoolmod.settle_spooled(self.spool, self.config.database,
                                                    self.config.database_password_file))
        self.settle_orphans()
        self.spooler.start(now=False)
        if any(agent.record for agent in self.config.agents.values()) or os.path.isdir(self.config.recordings_dir):
            self.recordings.start()
        self._heartbeat.start(self.config.heartbeat, now=False)
        self.sweeper.start()  # the calls of dead nodes, after their lease
        self.process.on_sighup(self.reload_tls)
        d = self.registry.prepare()
        d.addCallbacks(self._ready, self._start_failed)
        if self.admin is not None:
            self.admin.startService()
        super().startService()

    def _ready(self, _: object) -> None:
        self.agents = self.registry
        self.ready = True
        self._log.info("UpVoot ready: {n} agents", event="upvoot.ready", n=len(self.registry.agents))

    def _start_failed(self, f: Any) -> None:
        # one line: the operator reads it, the exit status tells the supervisor
        self.process.fail(f"Could not load the engines: {f.type.__name__}: {f.getErrorMessage()}")

    def settle_orphans(self, now: float | None = None) -> list[storemod.CallRecord]:
        """Settle the calls this node (``node_id``) left active when it died
        (end reason ``crash``, charged to their last heartbeat); never a
        call of another node, which may be running. Synchronous: run at
        start, before any call can be open."""
        conn = storemod.connect(self.config.database, self.config.database_password_file)
        try:
            orphans = storemod.transact(conn, storemod.settle_orphans, self._wall() if now is None else now,
                                        "crash", lambda record: settlement.crash_charge(record, self.config.agents),
                                        node=self.config.node_id)
        finally:
            conn.close()
        for record in orphans:
            self._log.warn("Settled call {call_id} left active by a dead process: {duration:.0f}s, {points} points",
                           event="store.orphan_settled", call_id=record.call_id, duration=record.duration,
                           points=record.points_charged)
        return orphans

    def _beat(self) -> None:
        """Every heartbeat: each call's row beats and its hold of points is
        extended (``CallKeeper``); admitted connections not begun yet beat too."""
        now = self._wall()
        for call_id, call in list(self.calls.items()):
            self.keeper.beat(call_id, call, now)
        for call_id in list(self.admission.opened):
            self.keeper.beat_admitted(call_id, now)

    @defer.inlineCallbacks
    def stopService(self):
        """Graceful drain (SIGTERM). The reactor keeps running while this
        Deferred is pending, so:

        1. new upgrades get 503 with Retry-After (the listeners stay up);
        2. running calls may finish on their own for up to ``drain_time``;
        3. the rest are ended with the agent's goodbye line (end reason
           ``shutdown``), up to ``shutdown_timeout`` more;
        4. calls still running are hung up and disconnected;
        5. every call record is written, then the database closes.
        """
        self.draining = True
        if self.calls:
            self._log.info("Draining: {n} calls running; waiting up to {t}s", event="upvoot.draining",
                           n=len(self.calls), t=self.config.drain_time)
        yield self._wait_for_calls(self.config.drain_time)
        self._shutting_down = True  # a call that starts from now on hears its goodbye at once
        for call in list(self.calls.values()):
            call.handle.shutdown()
        yield self._wait_for_calls(self.shutdown_timeout)
        yield super().stopService()  # now the listeners
        for call_id, call in list(self.calls.items()):  # still there: cut them off
            self._log.warn("Call {call_id} did not end in time; disconnecting", event="call.forced_end",
                           call_id=call_id)
            call.handle.hangup()
            call.disconnect()
        yield self._settling.done()
        yield self.ledger.stop()
        yield self.spooler.stop()
        yield self.recordings.stop()
        self.lag.stop()
        if self._heartbeat.running:
            self._heartbeat.stop()
        self.sweeper.stop()
        self.pool.stop()
        self.store.close()
        if self.admin is not None and self.admin.running:
            yield self.admin.stopService()
        self.process.drained()

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

    # ------------------------------------------------------ IVoiceService
    def admit(self, path: str, peer: str, headers: Mapping[str, str], params: Mapping[str, str]) -> defer.Deferred:
        return self.admission.admit(path, peer, headers, params)

    def note_refusal(self, status: int) -> None:
        self.admission.note_refusal(status)

    def live_calls(self) -> list[dict]:
        """The running calls, oldest first, as the console shows them: never
        a key, only its prefix."""
        now = self._wall()
        out = []
        for call_id, call in self.calls.items():
            report = getattr(call.handle, "report", None)
            out.append({"call_id": call_id, "agent": call.agent.config.name, "account": call.admission.account,
                        "provider": call.provider, "state": str(getattr(call.handle, "state", "")),
                        "started_at": call.started_at, "duration": round(max(0.0, now - call.started_at), 1),
                        "turns": getattr(report, "turns", 0), "key_prefix": call.admission.key_prefix,
                        "console": call.admission.kind == "console"})
        return sorted(out, key=lambda c: c["started_at"])

    @property
    def refusals(self) -> dict[int, int]:
        return self.admission.refusals

    def start_call(self, admission: Admission, started: Any, line: Any,
                   disconnect: Callable[[], None]) -> defer.Deferred:
        d = defer.maybeDeferred(self._agent_for, admission, started)
        d.addCallback(lambda agent: self._begin(admission, started, line, disconnect, agent))

        def failed(f: Any) -> None:
            self._log.failure("Could not start the call", f, event="call.start_failed")
            admission.release()
            return None

        return d.addErrback(failed)

    def _agent_for(self, admission: Admission, started: Any) -> Any:
        """The key's agent, or the one a provider's custom parameter picks
        among the agents the account holds a key for: Deferred[Agent] or Agent."""
        agents = self.agents.agents
        own = agents[admission.agent]
        select = own.config.agent_select
        wanted = str(started.custom.get(select, "")) if select else ""
        if not wanted or wanted == own.config.name:
            return own

        def chosen(allowed: set) -> Any:
            if wanted in allowed and wanted in agents:
                return agents[wanted]
            self._log.warn("Custom parameter asks for agent {wanted!r}, which account {account} has no key for;"
                           " using {agent}", event="call.agent_refused", wanted=wanted[:64],
                           account=admission.account, agent=own.config.name)
            return own

        def failed(f: Any) -> Any:
            self._log.failure("Agent lookup failed; using the key's agent", f, event="call.agent_lookup_failed")
            return own

        return self.store.run(storemod.account_agents, admission.account).addCallbacks(chosen, failed)

    def _begin(self, admission: Admission, started: Any, line: Any, disconnect: Callable[[], None],
               agent: Any) -> Any:
        if admission.released:
            return None  # the connection closed while the agent was chosen
        call_id = admission.call_id  # its row was opened at admission
        recorder = self.recordings.recorder(call_id) if agent.config.record else None
        metadata = {"peer": admission.peer,
                    **{k: v for k, v in attrs.asdict(started).items() if v not in (None, {}, "")}}
        if recorder is not None:
            metadata["recording"] = recorder.relpath  # relative to state_dir; written after the call
        if admission.kind == "console":
            metadata["console"] = True  # a test call from the console (upvoot.console)
        call = _Call(handle=None, admission=admission, release=admission.take_over(), disconnect=disconnect,
                     agent=agent, provider=started.provider, metadata=metadata, recorder=recorder,
                     started_at=self._wall())
        try:
            call.handle = self._new_call(
                agent, line, self.clock, self.pacer, lambda outcome: self._ended(call, outcome), call_id=call_id,
                lead=self.config.playout_lead, min_lead=self.config.playout_lead_min,
                log_transcripts=self.config.log_transcripts, recorder=recorder)
        except Exception:
            call.release()
            raise
        self.calls[call_id] = call
        self.calls_total += 1
        self.metrics.call_started(call.provider)
        self.admission.begun(call_id)  # the service beats for it from now on
        self._log.info("Call started: key {prefix}, account {account}, agent {agent}, provider {provider}, from {peer}",
                       event="call.started", call_id=call_id, prefix=admission.key_prefix,
                       account=admission.account, agent=agent.config.name, provider=call.provider,
                       peer=admission.peer)
        try:
            call.handle.start()
        except Exception:
            self._log.failure("Call {call_id} failed to start; hanging up", event="call.start_failed",
                              call_id=call_id)
            call.handle.hangup()
            return None
        self._open_record(call_id, call)
        if self._shutting_down:
            call.handle.shutdown()
        return call.handle

    def _open_record(self, call_id: str, call: _Call) -> None:
        """The call's row (opened at admission) takes its start, and at once
        a heartbeat that tops its hold up for the agent that answers."""
        call.held = call.admission.held
        self.keeper.beat(call_id, call, self._wall(), begin=True)

    def _ended(self, call: _Call, outcome: CallOutcome) -> None:
        self.calls.pop(outcome.call_id, None)
        call.release()
        if call.recorder is not None:
            self.recordings.finalize(call.recorder)  # in a thread; stopService waits for it
        record = settlement.call_record(outcome, key_prefix=call.admission.key_prefix,
                                        account=call.admission.account, provider=call.provider,
                                        metadata=call.metadata, agent_config=call.agent.config)
        self.metrics.call_ended(outcome, call.provider)
        self._log.info("Call ended: {reason} after {duration}s, {turns} turns, {points} points",
                       event="call.ended", call_id=record.call_id, reason=record.end_reason,
                       duration=record.duration, turns=record.turns, points=record.points_charged)
        self._settle(record)

    def _settle(self, record: storemod.CallRecord) -> None:
        # never fails: a record the database cannot take now is spooled (the ledger logs it);
        # None: spooled, its points are counted when the spooler applies it
        d = self.ledger.settle_call(record)
        self._settling.track(d.addCallback(lambda charged: None if charged is None else self.metrics.points(charged)))
