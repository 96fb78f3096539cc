"""How late a periodic timer runs: the one lag measurement of UpVoot.

A reactor that is blocked (a slow callback, a finalizer waiting on a lock)
runs its timers late; how late is the figure that matters, for admission
(``upvoot.daemon.lag``) and for the audio pacing tick
(``upvoot.call.playout.Pacer``). Both measure it here, the same way.

Pure arithmetic on the times it is given: no reactor, no import of any
other UpVoot package, so every layer may use it.
"""

from __future__ import annotations


class Lateness:
    """The lateness of each run of a timer that should run every ``interval``.

    ``start(now)`` when the timer is started, ``tick(now)`` from each run:
    it returns how many seconds after its due time that run came (never
    negative). A late run does not make the next look early: each run is due
    ``interval`` after the previous one actually ran.
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        self._due: float | None = None

    def start(self, now: float) -> None:
        self._due = now + self.interval

    def stop(self) -> None:
        self._due = None

    def tick(self, now: float) -> float:
        """This run's lateness in seconds (0.0 for a timer not started)."""
        late = 0.0 if self._due is None else max(0.0, now - self._due)
        self._due = now + self.interval
        return late


class LagAverage:
    """Lateness, exponentially averaged (``weight`` of each new sample), and
    the worst seen: the admission signal "this process is saturated"."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.average = 0.0
        self.worst = 0.0

    def add(self, late: float) -> None:
        self.average = (1.0 - self.weight) * self.average + self.weight * late
        self.worst = max(self.worst, late)


class PeakLateness:
    """The worst recent lateness: a new sample at least as late as the
    current value replaces it, and the value halves every ``half_life``
    seconds after it (so one stall raises it at once, and a calm spell
    brings it back down)."""

    def __init__(self, half_life: float = 5.0) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life!r}")
        self.half_life = half_life
        self._peak = 0.0
        self._at = 0.0

    def value(self, now: float) -> float:
        return self._peak * 0.5 ** (max(0.0, now - self._at) / self.half_life)

    def add(self, late: float, now: float) -> None:
        if late >= self.value(now):
            self._peak, self._at = late, now
