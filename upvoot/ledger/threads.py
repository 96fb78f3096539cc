"""Blocking file work off the reactor, and the Deferreds a stop waits for.

The ledger's file work (recordings, the spool) blocks on the disk, so it
runs in threads, never on the reactor. Whoever does such work takes a
``RunInThread``: ``reactor_threads(reactor)`` in the daemon, ``synchronous``
in unit tests (inline, so a ``task.Clock`` test stays deterministic).

``Pending`` keeps the Deferreds still in flight so that stopping waits for
every write instead of abandoning one halfway.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet import defer, threads

RunInThread = Callable[..., defer.Deferred]
_D = TypeVar("_D", bound=defer.Deferred)


def reactor_threads(reactor: Any) -> RunInThread:
    """A ``RunInThread`` on the reactor's thread pool."""

    def run(fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kw)

    return run


def synchronous(fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
    """A ``RunInThread`` that runs inline: for unit tests."""
    return defer.maybeDeferred(fn, *args, **kw)


class Pending:
    """The Deferreds still in flight; ``done()`` fires once all have."""

    def __init__(self) -> None:
        self._running: set[defer.Deferred] = set()

    def track(self, d: _D) -> _D:
        """Keep ``d`` until it fires; returns ``d`` (its result unchanged)."""
        self._running.add(d)

        def untrack(result: Any) -> Any:
            self._running.discard(d)
            return result

        d.addBoth(untrack)
        return d

    def __len__(self) -> int:
        return len(self._running)

    def done(self) -> defer.Deferred:
        """Deferred[None]: fires when every Deferred tracked so far has fired
        (whatever their results: those stay with their own callbacks)."""
        waiting = [_follow(d) for d in self._running]
        return defer.DeferredList(waiting).addCallback(lambda _: None)


def _follow(d: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires (with None) when ``d`` does, leaving ``d``'s own
    result to ``d``'s callbacks: waiting must neither eat nor add an error."""
    follower: defer.Deferred = defer.Deferred()

    def fire(result: Any) -> Any:
        follower.callback(None)
        return result

    d.addBoth(fire)
    return follower
