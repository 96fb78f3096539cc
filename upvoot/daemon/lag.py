"""The reactor's lag: how late it runs a 50 ms timer, averaged.

The admission policy (``upvoot.daemon.admission``) refuses upgrades while
the average is over ``lag_budget``; every sample also goes to the
``upvoot_reactor_lag_seconds`` histogram. The measurement itself is
``upvoot.timing`` (shared with the audio pacing tick).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.task import LoopingCall

from upvoot.timing import LagAverage, Lateness


class LagMonitor:
    """How late the reactor runs a timer: the admission signal for
    "this process is saturated". Exponentially averaged, sampled every 50 ms."""

    def __init__(self, clock: Any, interval: float = 0.05, on_lag: Callable[[float], None] | None = None) -> None:
        self.clock = clock
        self.interval = interval
        self._on_lag = on_lag  # called with each tick's lag (seconds): the metrics histogram
        self._lateness = Lateness(interval)
        self._stats = LagAverage()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    # tests (and the admission policy) read and set these
    @property
    def average(self) -> float:
        return self._stats.average

    @average.setter
    def average(self, value: float) -> None:
        self._stats.average = value

    @property
    def worst(self) -> float:
        return self._stats.worst

    def start(self) -> None:
        self._lateness.start(self.clock.seconds())
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._lateness.stop()

    def _tick(self) -> None:
        lag = self._lateness.tick(self.clock.seconds())
        self._stats.add(lag)
        if self._on_lag is not None:
            self._on_lag(lag)
