"""Per-connection bounds of the public socket: a client that stops reading,
and one that keeps sending messages UpVoot cannot understand.

Sans-IO but for the clock (an injected ``IReactorTime``), so unit tests
drive them with ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: Bytes queued for a client that stopped reading (beyond the transport's 64 KiB) before it is
#: dropped. Audio alone queues at most ~32 KB/s: a stalled call still gets its ``stall_timeout``.
MAX_STALLED_BYTES = 512 * 1024


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@implementer(IPushProducer)
class StallWatch:
    """The transport's producer: Twisted pauses it when the client stops
    reading and our outbound buffer fills up. Paused for ``timeout`` seconds,
    or ``MAX_STALLED_BYTES`` queued since, and ``on_stall`` is called."""

    def __init__(self, clock: Any, timeout: float, on_stall: Any) -> None:
        self.clock = clock
        self.timeout = timeout
        self.on_stall = on_stall
        self.paused = False
        self.queued = 0
        self.timer: Any = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self.timer is None:
            self.timer = self.clock.callLater(self.timeout, self._stalled, "timeout")

    def resumeProducing(self) -> None:
        self.paused = False
        self.queued = 0
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    stopProducing = resumeProducing

    def wrote(self, n: int) -> bool:
        """Count ``n`` bytes queued; True once a paused client is over its bound."""
        if self.paused:
            self.queued += n
            if self.queued > MAX_STALLED_BYTES:
                self._stalled("bytes")
                return True
        return False

    def _stalled(self, why: str) -> None:
        self.resumeProducing()
        self.on_stall(why)


class Complaints:
    """Bad client messages of one connection, logged without flooding the
    log: the first ``FIRST``, then one summary per ``EVERY`` seconds."""

    FIRST = 5
    EVERY = 10.0

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.seen = self.unlogged = 0
        self.since = 0.0

    def note(self) -> bool:
        """Count one; True when this one is to be logged in full."""
        self.seen += 1
        if self.seen <= self.FIRST:
            self.since = self.clock.seconds()
        else:
            self.unlogged += 1
        return self.seen <= self.FIRST

    def summary_due(self, last: bool = False) -> int:
        """The count to summarise now (``last``: the connection closed), or 0."""
        if self.unlogged and (last or self.clock.seconds() - self.since >= self.EVERY):
            n, self.unlogged, self.since = self.unlogged, 0, self.clock.seconds()
            return n
        return 0
