"""Limits for an endpoint that faces the internet: failed keys per source
address, and concurrent calls per account. Sans-IO: time comes from the
injected clock, so tests drive it with ``task.Clock``.

- After ``auth_failure_limit`` 401s from one address within
  ``auth_failure_window``, further upgrades from that address are refused
  at once with 429 (no database lookup: cheap to refuse), and this is
  logged once per window, not once per attempt.
- An account may hold at most ``max_calls_per_account`` calls at once
  (0 = no limit); over it, 429.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.logger import Logger


class AbuseGuard:
    _log = Logger()
    MAX_TRACKED = 10000  # addresses remembered at most (a flood cannot grow memory)

    def __init__(self, clock: Any, failure_limit: int, failure_window: float, max_calls_per_account: int) -> None:
        self.clock = clock
        self.failure_limit = failure_limit
        self.failure_window = failure_window
        self.max_calls_per_account = max_calls_per_account
        self._failures: "collections.OrderedDict[str, collections.deque]" = collections.OrderedDict()
        self._logged: dict[str, float] = {}
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
        if now - self._logged.get(host, -1e18) >= self.failure_window:
            self._logged[host] = now
            self._log.warn("Too many failed keys from {host}: refusing it for a while", event="auth.rate_limited",
                           host=host)
        return True

    def failed(self, host: str) -> None:
        if self.failure_limit:
            self._recent(host).append(self.clock.seconds())

    # --------------------------------------------------------- accounts
    def account_full(self, account: str) -> bool:
        return bool(self.max_calls_per_account) and self._accounts[account] >= self.max_calls_per_account

    def account_add(self, account: str) -> None:
        self._accounts[account] += 1

    def account_remove(self, account: str) -> None:
        self._accounts[account] -= 1
        if self._accounts[account] <= 0:
            del self._accounts[account]


def peer_host(peer: str) -> str:
    """'tcp4:1.2.3.4:5678' / 'tcp6:[::1]:5678' / a forwarded '1.2.3.4' -> the host."""
    if peer.startswith(("tcp4:", "tcp6:", "unix:")):
        peer = peer.split(":", 1)[1]
        host, _, _port = peer.rpartition(":")
        return host.strip("[]") or peer
    return peer
