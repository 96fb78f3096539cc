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
  - the account holds ``max_calls_per_account`` calls  -> 429
  - the address holds ``max_calls_per_address`` calls  -> 429
  - ``?provider=`` names no known provider             -> 400

An admitted upgrade holds one call slot and one of its account's concurrent
calls from that moment (``Admission.release`` gives both back), so upgrades
that race each other see each other. The key never appears in a log line or
an exception text: only its 12-character prefix (``uvk_XXXXXXXX``), and only
once it is known valid.

``AbuseGuard`` keeps the per-address and per-account counts. Sans-IO: time
comes from the injected clock, so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from upvoot.config import Config
from upvoot.daemon.seams import Admission, Refusal
from upvoot.framing.negotiate import PROVIDERS

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
    """Failed keys per source address, and concurrent calls per account.

    - After ``failure_limit`` 401s from one address within
      ``failure_window``, further upgrades from that address are refused at
      once with 429 (no database lookup: cheap to refuse), and this is
      logged once per window, not once per attempt.
    - An account may hold at most ``max_calls_per_account`` calls at once
      (0 = no limit); over it, 429.

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
        self._accounts: collections.Counter = collections.Counter()

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

    # ------------------------------------------- concurrent calls: accounts, addresses
    def account_full(self, account: str) -> bool:
        return _full(self._accounts, account, self.max_calls_per_account)

    def account_add(self, account: str) -> None:
        self._accounts[account] += 1

    def account_remove(self, account: str) -> None:
        _decrement(self._accounts, account)

    def account_calls(self, account: str) -> int:
        return self._accounts.get(account, 0)

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
                 metrics: Any) -> None:
        """``store``: has ``authenticate(key) -> Deferred[KeyInfo | None]``;
        ``pool``: has ``saturated()``; ``lag``: has ``average`` (seconds)."""
        self.config = config
        self.lifecycle = lifecycle
        self.store = store
        self.guard = guard
        self.pool = pool
        self.lag = lag
        self.metrics = metrics
        self.held = 0
        self.refusals: dict[int, int] = {}

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
        if self.guard.account_full(info.account):
            self._log.info("Upgrade refused: account {account} is at its limit of concurrent calls",
                           event="handshake.account_limit", account=info.account)
            return self.refuse(429)
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
        return self._reserve(info, choice, params, peer, host)

    def _reserve(self, info: Any, provider: str, params: Mapping[str, str], peer: str, host: str) -> Admission:
        """Take a slot, one of the account's calls and one of the address's, all at once."""
        self.held += 1
        self.guard.account_add(info.account)
        self.guard.address_add(host)
        account = info.account

        def release() -> None:
            self.held -= 1
            self.guard.account_remove(account)
            self.guard.address_remove(host)

        return Admission(key_prefix=info.prefix, account=account, agent=info.agent, provider=provider,
                         params=dict(params), peer=peer, release=release)
