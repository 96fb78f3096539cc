"""The one bounded pool where CPU-heavy model work runs, off the reactor.

Why a pool of our own instead of the reactor's: the reactor's thread pool is
shared with DNS and anything else, and unbounded. Speech models saturate the
cores; when they do, new work must be refused quickly (and logged) instead of
queueing forever while every call gets slower.

Rules:
- ``size`` threads (default: the number of cores); faster-whisper, piper and
  onnxruntime release the GIL, so threads scale across cores.
- *final* work (a final transcription, a synthesis) queues up to
  ``queue_limit`` jobs, first in first out; past that it fails at once with
  ``EngineBusy``.
- *interim* work (re-decoding a growing utterance) never queues: it runs only
  if no final work is waiting and, with two or more threads, at least one
  other thread stays idle for finals. So interims never delay a final, and
  they use at most ``size - 1`` threads of the machine at once.
- *urgent* work (the end-of-turn model: one short inference that decides
  when a caller's turn ends) has its own slot, one thread beyond ``size``,
  and its own queue: neither interims nor queued finals ever delay it.
- Cancelling the Deferred of queued work removes it; cancelling running work
  discards its result (the thread finishes the call it is in).

``SynchronousPool`` runs work inline: unit tests use it to keep threads out.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from upvoot.engines.interfaces import EngineBusy


class WorkerPool:
    _log = Logger()

    def __init__(self, reactor: Any, size: int = 0, queue_limit: int = 8, name: str = "upvoot-workers") -> None:
        self.size = size or (os.cpu_count() or 1)
        self.queue_limit = queue_limit
        self._reactor = reactor
        # one thread more than size: the slot of urgent work
        self._threads = ThreadPool(minthreads=self.size + 1, maxthreads=self.size + 1, name=name)
        self._queue: collections.deque = collections.deque()
        self._urgent: collections.deque = collections.deque()
        self.active = 0
        self.urgent_active = 0
        self.refused = 0
        self._started = False

    # lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._threads.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._threads.stop()

    # state ---------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._urgent)

    def saturated(self) -> bool:
        """True when new final work would be refused."""
        return self.active >= self.size and len(self._queue) >= self.queue_limit

    # work ----------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, interim: bool = False, urgent: bool = False) -> defer.Deferred:
        """Run ``fn(*args)`` on a worker thread; see the module docstring."""
        job = _Job(fn, args)
        job.deferred = defer.Deferred(lambda d: self._cancel(job))
        if urgent:
            job.urgent = True
            if self.urgent_active == 0:
                self._start(job)
            elif len(self._urgent) < max(self.queue_limit, self.size):
                self._urgent.append(job)
            else:
                self.refused += 1
                return defer.fail(EngineBusy("worker pool saturated: urgent work refused"))
            return job.deferred
        if interim:
            reserve = 1 if self.size > 1 else 0
            if self.active + reserve < self.size and not self._queue:
                self._start(job)
                return job.deferred
            return defer.fail(EngineBusy("worker pool busy: interim skipped"))
        if self.active < self.size and not self._queue:
            self._start(job)
        elif len(self._queue) < self.queue_limit:
            self._queue.append(job)
        else:
            self.refused += 1
            self._log.warn(
                "Worker pool saturated ({active} running, {queued} queued): work refused",
                event="workers.saturated", active=self.active, queued=len(self._queue),
            )
            return defer.fail(EngineBusy("worker pool saturated"))
        return job.deferred

    def _cancel(self, job: "_Job") -> None:
        job.cancelled = True
        try:
            (self._urgent if job.urgent else self._queue).remove(job)
        except ValueError:
            pass

    def _start(self, job: "_Job") -> None:
        if job.urgent:
            self.urgent_active += 1
        else:
            self.active += 1

        def done(success: bool, result: Any) -> None:
            self._reactor.callFromThread(self._finished, job, success, result)

        self._threads.callInThreadWithCallback(done, job.fn, *job.args)

    def _finished(self, job: "_Job", success: bool, result: Any) -> None:
        if job.urgent:
            self.urgent_active -= 1
            while self._urgent and not self.urgent_active:
                nxt = self._urgent.popleft()
                if not nxt.cancelled:
                    self._start(nxt)
        else:
            self.active -= 1
        while self._queue and self.active < self.size:
            nxt = self._queue.popleft()
            if not nxt.cancelled:
                self._start(nxt)
        if job.cancelled:
            return
        if success:
            job.deferred.callback(result)
        else:
            job.deferred.errback(result if isinstance(result, Failure) else Failure(result))


class _Job:
    __slots__ = ("fn", "args", "deferred", "cancelled", "urgent")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False
        self.urgent = False
        self.deferred: defer.Deferred


class SynchronousPool:
    """Runs work inline on the calling thread. For unit tests only."""

    size = 1
    queue_limit = 0
    active = 0
    queued = 0
    refused = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def saturated(self) -> bool:
        return False

    def run(self, fn: Callable[..., Any], *args: Any, interim: bool = False, urgent: bool = False) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args)
