"""Who may call, and when: the admission policy of the public port.

``AdmissionPolicy.admit`` decides every ``/voice/<api-key>`` upgrade, before
any agent work, in this order:

  - any path other than ``/voice/<api-key>``          -> 404
  - an address that used up its failed keys            -> 429 (no lookup)
  - the daemon is starting, draining, or saturated     -> 503, Retry-After
    (``max_calls`` slots held, the worker pool full, reactor lag over
    ``lag_budget``)
  - the key lookup failed (database)                   -> 503, Retry-After
  - missing, unknown or revoked key                    -> 401
  - the key's account has no points left (<= 0)        -> 402
  - the key names an agent the config no longer has    -> 503, Retry-After
  - the address holds ``max_calls_per_address`` calls  -> 429
  - ``?provider=`` names no known provider             -> 400
  - the call's opening in the ledger, one transaction (``reserve.open_reserved``):
      the account's available points do not pay for
      one billing increment                            -> 402
      the account holds ``max_calls_per_account``
      active calls on all nodes                        -> 429
      the database cannot be reached                   -> 503, Retry-After

So a call is in the ledger, 'active' on this node and holding its points,
before its upgrade is answered: a call the ledger cannot bill is never
admitted. An admitted upgrade holds one call slot and one of its address's
concurrent calls from that moment (``Admission.release`` gives both back,
and forgets the opened call if it never began), so upgrades that race each
other see each other. The key never appears in a log line or
an exception text: only its 12-character prefix (``uvk_XXXXXXXX``), and only
once it is known valid.

``AbuseGuard`` keeps the per-address and per-account counts. Sans-IO: time
comes from the injected clock, so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Protocol

import time
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from upvoot.config import Config
from upvoot.daemon.seams import Admission, Refusal
from upvoot.framing.negotiate import PROVIDERS
from upvoot.ledger import reserve
from upvoot.ledger.records import AccountBusy, CallStart, NoPoints

REASONS = {
    400: "Unknown provider",
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
    408: "Request Timeout",
    429: "Too Many Requests",
    503: "Service Unavailable",
}

PREFIX = "/voice/"


def _full(counts: collections.Counter, key: str, limit: int) -> bool:
    """``key`` holds its ``limit`` of concurrent calls (0: no limit)."""
    return bool(limit) and counts[key] >= limit


def _decrement(counts: collections.Counter, key: str) -> None:
    """One call of ``key`` fewer; a key with none is forgotten (memory stays bounded)."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class AbuseGuard:
    """Failed keys per source address, and concurrent calls per address.

    - After ``failure_limit`` 401s from one address within
      ``failure_window``, further upgrades from that address are refused at
      once with 429 (no database lookup: cheap to refuse), and this is
      logged once per window, not once per attempt.
    - An address may hold at most ``max_calls_per_address`` calls at once
      (0 = no limit); over it, 429. (``max_calls_per_account`` is counted
      in the ledger, across nodes: the guard only holds the limit.)

    Memory is bounded: at most ``MAX_TRACKED`` addresses are remembered,
    for failures and for the once-per-window log alike.
    """

    _log = Logger()
    MAX_TRACKED = 10000  # addresses remembered at most (a flood cannot grow memory)

    def __init__(self, clock: Any, failure_limit: int, failure_window: float, max_calls_per_account: int,
                 max_calls_per_address: int = 0) -> None:
        self.clock = clock
        self.failure_limit = failure_limit
        self.failure_window = failure_window
        self.max_calls_per_account = max_calls_per_account
        self.max_calls_per_address = max_calls_per_address
        self._addresses: collections.Counter = collections.Counter()
        self._failures: "collections.OrderedDict[str, collections.deque]" = collections.OrderedDict()
        # address -> when its block was last logged, oldest first
        self._logged: "collections.OrderedDict[str, float]" = collections.OrderedDict()

    # ------------------------------------------------------- failed keys
    def _recent(self, host: str) -> collections.deque:
        q = self._failures.get(host)
        if q is None:
            q = self._failures[host] = collections.deque()
            while len(self._failures) > self.MAX_TRACKED:
                self._failures.popitem(last=False)
        cutoff = self.clock.seconds() - self.failure_window
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    def blocked(self, host: str) -> bool:
        """True when ``host`` has used up its failed attempts for now."""
        if not self.failure_limit or host not in self._failures:
            return False
        if len(self._recent(host)) < self.failure_limit:
            return False
        now = self.clock.seconds()
        self._prune_logged(now)
        if host not in self._logged:
            self._logged[host] = now
            while len(self._logged) > self.MAX_TRACKED:
                self._logged.popitem(last=False)
            self._log.warn("Too many failed keys from {host}: refusing it for a while", event="auth.rate_limited",
                           host=host)
        return True

    def _prune_logged(self, now: float) -> None:
        """Forget the log times that are a window old: those addresses would
        be logged again anyway. Entries are in time order: the oldest go first."""
        cutoff = now - self.failure_window
        while self._logged:
            host, when = next(iter(self._logged.items()))
            if when > cutoff:
                break
            del self._logged[host]

    def failed(self, host: str) -> None:
        if self.failure_limit:
            self._recent(host).append(self.clock.seconds())

    # ------------------------------------------- concurrent calls of an address
    def address_full(self, host: str) -> bool:
        return _full(self._addresses, host, self.max_calls_per_address)

    def address_add(self, host: str) -> None:
        self._addresses[host] += 1

    def address_remove(self, host: str) -> None:
        _decrement(self._addresses, host)

    def address_calls(self, host: str) -> int:
        return self._addresses.get(host, 0)


def peer_host(peer: str) -> str:
    """'tcp4:1.2.3.4:5678' / 'tcp6:[::1]:5678' / a forwarded '1.2.3.4' -> the host."""
    if peer.startswith(("tcp4:", "tcp6:", "unix:")):
        peer = peer.split(":", 1)[1]
        host, _, _port = peer.rpartition(":")
        return host.strip("[]") or peer
    return peer


class Lifecycle(Protocol):
    """What the policy reads of the service's state."""

    ready: bool  # the agents are loaded and their lines synthesized
    draining: bool  # stopping: no new calls
    agents: Any  # the AgentRegistry once ready (``.agents``: name -> Agent), else None


class AdmissionPolicy:
    """Decides upgrades (``admit``) and counts the call slots they hold.

    ``held``: slots held by admissions not yet released: connections
    waiting to become calls, and the running calls (which took theirs over).
    """

    _log = Logger()
    retry_after = 5  # seconds, in every 503's Retry-After

    def __init__(self, config: Config, lifecycle: Lifecycle, store: Any, guard: AbuseGuard, pool: Any, lag: Any,
                 metrics: Any, wall: Any = time.time) -> None:
        """``store``: has ``authenticate(key) -> Deferred[KeyInfo | None]``
        and ``run`` (a transaction function); ``pool``: has ``saturated()``;
        ``lag``: has ``average`` (seconds); ``wall``: the wall clock of call rows."""
        self.config = config
        self.lifecycle = lifecycle
        self.store = store
        self.guard = guard
        self.pool = pool
        self.lag = lag
        self.metrics = metrics
        self.wall = wall
        self.held = 0
        self.refusals: dict[int, int] = {}
        self.database = DatabaseState()
        self.opened: dict[str, Admission] = {}  # call id -> admitted, its call not begun yet

    def busy(self) -> str | None:
        """Why a new call must be refused now (a 503), or None."""
        if not self.lifecycle.ready:
            return "starting"
        if self.lifecycle.draining:
            return "draining"
        if self.held >= self.config.max_calls:
            return f"max_calls ({self.config.max_calls}) reached"
        if self.pool.saturated():
            return "worker pool saturated"
        if self.lag.average > self.config.lag_budget:
            return f"reactor lag {self.lag.average * 1000:.0f} ms over budget"
        return None

    def note_refusal(self, status: int) -> None:
        self.refusals[status] = self.refusals.get(status, 0) + 1
        self.metrics.refused(status)

    def refuse(self, status: int) -> Refusal:
        """A counted refusal (a 503 says when to come back)."""
        self.note_refusal(status)
        headers = (("Retry-After", str(self.retry_after)),) if status == 503 else ()
        return Refusal(status, REASONS[status], headers)

    def admit(self, path: str, peer: str, headers: Mapping[str, str], params: Mapping[str, str]) -> defer.Deferred:
        """Deferred[Admission | Refusal]; never fails."""
        return defer.Deferred.fromCoroutine(self._admit(path, peer, params))

    async def _admit(self, path: str, peer: str, params: Mapping[str, str]) -> Admission | Refusal:
        if not path.startswith(PREFIX):
            return self.refuse(404)
        key = path[len(PREFIX):]
        host = peer_host(peer)
        if self.guard.blocked(host):
            return self.refuse(429)
        why = self.busy()
        if why is not None:
            self._log.warn("Upgrade refused: {why}", event="handshake.busy", why=why)
            return self.refuse(503)
        info = None
        if key and "/" not in key:
            try:
                info = await self.store.authenticate(key)
            except Exception as e:
                # the message, never a traceback: no frame may quote the key
                self._log.error("Key lookup failed: {error}", event="auth.error",
                                error=f"{type(e).__name__}: {e}".replace(key, "<key>"))
                self.database.failed(Exception(f"{type(e).__name__}: {e}".replace(key, "<key>")))
                return self.refuse(503)
        if info is None or info.revoked:
            self.guard.failed(host)
            self.metrics.auth_failures.inc()
            self._log.info("Upgrade refused: {why} key from {peer}", event="auth.denied",
                           why="revoked" if info is not None else "missing or unknown", peer=peer)
            return self.refuse(401)
        if info.points <= 0:
            self._log.info("Upgrade refused: account {account} has no points (key {prefix})",
                           event="auth.no_points", account=info.account, prefix=info.prefix)
            return self.refuse(402)
        agents = self.lifecycle.agents
        if agents is None or info.agent not in agents.agents:
            self._log.error("Key {prefix} names agent {agent!r}, which is not configured",
                            event="auth.unknown_agent", prefix=info.prefix, agent=info.agent)
            return self.refuse(503)
        if self.guard.address_full(host):
            self._log.info("Upgrade refused: {host} is at its limit of concurrent calls",
                           event="handshake.address_limit", host=host)
            return self.refuse(429)
        choice = params.get("provider") or agents.agents[info.agent].config.provider
        if choice not in PROVIDERS and choice != "auto":
            self._log.info("Upgrade refused: unknown provider {provider!r}", event="handshake.bad_provider",
                           provider=choice[:40])
            return self.refuse(400)
        why = self.busy()  # again: the lookup took time, other upgrades may have taken the last slots
        if why is not None:
            self._log.warn("Upgrade refused: {why}", event="handshake.busy", why=why)
            return self.refuse(503)
        return await self._open(info, choice, params, peer, host)

    async def _open(self, info: Any, provider: str, params: Mapping[str, str], peer: str,
                    host: str) -> Admission | Refusal:
        """Take a slot and one of the address's calls at once, then open the
        call in the ledger (holding its points); give them back if it cannot."""
        admission = self._reserve(info, provider, params, peer, host)
        cfg = self.lifecycle.agents.agents[info.agent].config
        start = CallStart(call_id=admission.call_id, key_prefix=info.prefix, account=info.account, agent=info.agent,
                          provider=provider, started_at=self.wall(), node=self.config.node_id,
                          metadata={"peer": peer, **({"console": True} if admission.kind == "console" else {})})
        want = reserve.hold_for(self.config.reservation_horizon, cfg.billing_increment, cfg.points_per_increment)
        try:
            admission.held = await self.store.run(reserve.open_reserved, start, want, cfg.points_per_increment,
                                                  self.guard.max_calls_per_account)
        except NoPoints:
            admission.release()
            self._log.info("Upgrade refused: account {account} has no points available (key {prefix})",
                           event="auth.no_points", account=info.account, prefix=info.prefix)
            return self.refuse(402)
        except AccountBusy:
            admission.release()
            self._log.info("Upgrade refused: account {account} is at its limit of concurrent calls",
                           event="handshake.account_limit", account=info.account)
            return self.refuse(429)
        except Exception as e:
            admission.release()
            self.database.failed(e)
            self._log.error("Could not open the call in the ledger: {error}", event="handshake.open_failed",
                            error=f"{type(e).__name__}: {e}")
            return self.refuse(503)
        self.database.ok()
        self.opened[admission.call_id] = admission
        if admission.released:  # given back while its opening was written: forget it
            self._forget(admission.call_id)
        elif self.lifecycle.draining:
            admission.release()
            return self.refuse(503)
        return admission

    def _forget(self, call_id: str) -> None:
        """The call opened at admission never began: delete its row and give its points back."""
        self.opened.pop(call_id, None)
        d = self.store.run(reserve.cancel_call, call_id)
        # a row left behind (database gone) beats no more: a sweeper settles it, 0 points, after the lease
        d.addErrback(lambda f: self._log.warn("Could not forget call {call_id}, which never began: {error}",
                                              event="handshake.cancel_failed", call_id=call_id,
                                              error=f.getErrorMessage()))

    def begun(self, call_id: str) -> None:
        """The service took the admission of ``call_id`` over: it beats for it now."""
        self.opened.pop(call_id, None)

    def _reserve(self, info: Any, provider: str, params: Mapping[str, str], peer: str, host: str) -> Admission:
        """Take a slot and one of the address's calls, both at once."""
        self.held += 1
        self.guard.address_add(host)
        account = info.account
        admission: Admission

        def release() -> None:
            self.held -= 1
            self.guard.address_remove(host)
            if not admission.taken and admission.call_id in self.opened:
                self._forget(admission.call_id)

        admission = Admission(key_prefix=info.prefix, account=account, agent=info.agent, provider=provider,
                              params=dict(params), peer=peer, release=release, kind=getattr(info, "kind", "api"),
                              call_id=uuid.uuid4().hex)
        return admission


class DatabaseState:
    """Whether the ledger answers, as the last transaction found it: a node
    that cannot reach it refuses new calls (503, the failing transaction)
    and says so in ``/healthz``; the next transaction that succeeds clears it."""

    _log = Logger()

    def __init__(self) -> None:
        self.problem: str | None = None

    def failed(self, error: BaseException) -> None:
        if self.problem is None:
            self._log.error("Database unreachable ({error}): new calls get 503 until it answers again",
                            event="store.unreachable", error=f"{type(error).__name__}: {error}")
        self.problem = "unreachable"

    def ok(self) -> None:
        if self.problem is not None:
            self.problem = None
            self._log.info("Database reachable again: admitting calls", event="store.reachable")
