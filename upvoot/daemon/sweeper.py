"""The ledger's live side: heartbeats that keep calls paid for, and the crash sweeper.

``CallKeeper`` beats for the service's calls: every ``heartbeat`` each
running call's row gets its heartbeat and, in the same transaction, its
hold of points extended to ``reservation_horizon`` ahead of its elapsed
time (``upvoot.ledger.reserve.beat``). When the hold cannot cover the time
to the next heartbeat plus a closing line (``nodes.CLOSING_ALLOWANCE``),
because the account's available points ran out, the database cannot be
reached, or another node settled the call meanwhile, the call is told
``out_of_points()``: its agent says ``closing_no_points`` and it ends with
end reason ``no_points`` while the points it holds still pay for it.
Connections admitted but not begun yet (their rows are opened at admission)
get their heartbeat too, so no sweeper takes them for a dead node's calls.

``Sweeper`` runs on every node, every ``heartbeat`` on the injected clock:
active calls of *any* node whose heartbeat is older than ``lease`` are
settled as crashes (end reason ``crash``, charged to their last heartbeat),
one call per transaction, each claimed by a conditional ``UPDATE ... WHERE
state = 'active' ... RETURNING``: of several nodes sweeping at once, one
settles each call, once.

Every database call goes through ``Store.run`` (the pool's threads); the
outcome of each tells the admission's ``DatabaseState`` whether the
database answers.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.ledger import calls as callsmod
from upvoot.ledger import reserve, settlement
from upvoot.nodes import CLOSING_ALLOWANCE


class CallKeeper:
    """Heartbeats and reservations of the running calls of one service.

    ``store``: has ``run``; ``database``: the admission's ``DatabaseState``.
    A call here is the service's ``_Call`` (``handle``, ``agent``,
    ``provider``, ``started_at``, ``held``, ``out_of_points``)."""

    _log = Logger()

    def __init__(self, config: Any, store: Any, database: Any) -> None:
        self.config = config
        self.store = store
        self.database = database

    def beat(self, call_id: str, call: Any, now: float, begin: bool = False) -> defer.Deferred:
        """Beat for ``call`` and extend its hold; never fails. ``begin``: the
        call has just begun (its row takes its start time, agent, provider)."""
        cfg = call.agent.config
        elapsed = max(0.0, now - call.started_at)
        ppi, increment = cfg.points_per_increment, cfg.billing_increment
        # a second of slack: a beat a moment past a whole increment holds no increment more
        hold_to = reserve.hold_for(max(0.0, elapsed - 1.0) + self.config.reservation_horizon, increment, ppi)
        started = ({"started_at": call.started_at, "agent": cfg.name, "provider": call.provider,
                    "metadata": call.metadata} if begin else None)
        d = self.store.run(reserve.beat, call_id, now, hold_to, ppi, started)

        def done(held: int | None) -> None:
            self.database.ok()
            if held is None:
                self._log.warn("Call {call_id} is no longer active in the ledger (settled by another node?):"
                               " ending it", event="call.not_active", call_id=call_id)
                self._tell(call_id, call, elapsed)
                return
            call.held = held
            self._check(call_id, call, elapsed)

        def failed(f: Any) -> None:
            self.database.failed(f.value)
            self._log.warn("Heartbeat of call {call_id} failed: {error}", event="store.heartbeat_failed",
                           call_id=call_id, error=f.getErrorMessage())
            self._check(call_id, call, elapsed)  # what it held last must still pay for it

        return d.addCallbacks(done, failed).addErrback(
            lambda f: self._log.failure("Heartbeat of call {call_id}", f, event="call.heartbeat_error",
                                        call_id=call_id))

    def beat_admitted(self, call_id: str, now: float) -> defer.Deferred:
        """The heartbeat of a connection admitted but not begun: its row stays fresh."""
        d = self.store.run(reserve.beat, call_id, now, 0, 0)
        d.addCallback(lambda _: self.database.ok())
        d.addErrback(lambda f: self.database.failed(f.value))
        return d

    def _check(self, call_id: str, call: Any, elapsed: float) -> None:
        cfg = call.agent.config
        paid = reserve.covered(call.held, cfg.billing_increment, cfg.points_per_increment)
        if paid < elapsed + self.config.heartbeat + CLOSING_ALLOWANCE:
            self._tell(call_id, call, elapsed)

    def _tell(self, call_id: str, call: Any, elapsed: float) -> None:
        if call.out_of_points:
            return
        call.out_of_points = True
        self._log.info("Call {call_id} is out of points after {elapsed:.0f}s (holds {held}): ending it",
                       event="call.no_points", call_id=call_id, elapsed=elapsed, held=call.held)
        call.handle.out_of_points()


class Sweeper:
    """Settles the calls of dead nodes: see the module docstring."""

    _log = Logger()

    def __init__(self, config: Any, clock: Any, store: Any, database: Any, wall: Callable[[], float],
                 on_settled: Callable[[Any], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.database = database
        self._wall = wall
        self._on_settled = on_settled
        self._busy = False
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.config.heartbeat, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sweep(self) -> defer.Deferred:
        """One sweep (none while one runs): Deferred[list of settled
        ``CallRecord``]; never fails, so the loop never stops."""
        if self._busy:
            return defer.succeed([])
        self._busy = True
        d = defer.Deferred.fromCoroutine(self._sweep())

        def failed(f: Any) -> list:
            self.database.failed(f.value)
            self._log.warn("Sweep for crashed calls failed: {error}", event="sweep.failed",
                           error=f.getErrorMessage())
            return []

        def idle(result: Any) -> Any:
            self._busy = False
            return result

        return d.addErrback(failed).addBoth(idle)

    async def _sweep(self) -> list:
        cutoff = self._wall() - self.config.lease
        settled = []
        for call_id in await self.store.run(reserve.stale_calls, cutoff):
            record = await self.store.run(callsmod.settle_crashed, call_id, cutoff, "crash",
                                          lambda r: settlement.crash_charge(r, self.config.agents))
            if record is None:
                continue  # another node settled it first, or it beat again
            settled.append(record)
            self._log.warn("Settled call {call_id}, whose heartbeat is older than the lease: {duration:.0f}s,"
                           " {points} points", event="sweep.settled", call_id=record.call_id,
                           duration=record.duration, points=record.points_charged)
            if self._on_settled is not None:
                self._on_settled(record)
        self.database.ok()
        return settled
