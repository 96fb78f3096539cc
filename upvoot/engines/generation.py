"""A reply being generated on a worker thread and read on the reactor.

The worker produces text pieces and hands each over with
``reactor.callFromThread(generation.add, text)``; the reply coroutine on the
reactor reads them with ``await generation.next()``. Cancelling that read
(a barge-in, a hang-up) raises ``stop_requested``, which the worker checks
after every token. The engine marks the end (``finished``, ``error``) once
its worker has really left the model.
"""

from __future__ import annotations

import collections

from twisted.internet import defer
from twisted.python.failure import Failure


class Generation:
    """One reply being generated. ``pieces``, ``next`` and ``wake`` belong
    to the reactor; the worker thread only reads ``stop_requested`` and
    hands pieces over with ``callFromThread``."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.stop_requested = False  # returned by the stream callback after every token
        self.stopped_early = False  # the stream was stopped before the model ended it (worker thread)
        self.tokens = 0  # content pieces generated (worker thread)
        self.trimmed = 0  # turns dropped to fit n_ctx (worker thread)
        self.pieces: collections.deque[str] = collections.deque()
        self.end_call: dict | None = None  # the end_call tool's arguments, if the model called it
        self.finished = False  # the model is released (generation over)
        self.done = defer.Deferred()  # fires (None) when finished; for tests and logs
        self.error: Failure | None = None
        self._waiter: defer.Deferred | None = None

    # --- the reader (the reply coroutine)
    def next(self) -> defer.Deferred:
        """Fires with the next text piece, or None at the end."""
        if self.pieces:
            return defer.succeed(self.pieces.popleft())
        if self.finished:
            if self.error is not None:
                error, self.error = self.error, None
                return defer.fail(error)
            return defer.succeed(None)
        self._waiter = defer.Deferred(self._cancelled)
        return self._waiter

    def _cancelled(self, d: defer.Deferred) -> None:
        if self._waiter is d:
            self._waiter = None
        self.stop()

    def add(self, text: str) -> None:
        """A piece from the worker (on the reactor, by ``callFromThread``)."""
        self.pieces.append(text)
        self.wake()

    def wake(self) -> None:
        """Hand the reader what it waits for, if it is there."""
        if self._waiter is None:
            return
        if self.pieces:
            d, self._waiter = self._waiter, None
            d.callback(self.pieces.popleft())
        elif self.finished:
            d, self._waiter = self._waiter, None
            if self.error is not None:
                error, self.error = self.error, None
                d.errback(error)
            else:
                d.callback(None)

    def stop(self) -> None:
        """Ask the worker to stop after the token it is on (idempotent)."""
        self.stop_requested = True
