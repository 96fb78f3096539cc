"""The live calls as server-sent events: ``GET /console/api/live``.

Each stream is ``text/event-stream``: ``retry: 3000``, then ``event:
calls`` with ``data:`` the JSON list of ``service.live_calls()`` at once,
whenever it changes (looked at every ``POLL`` seconds) and at least every
``KEEPALIVE`` seconds (the heartbeat: a proxy or the browser sees the
stream alive, durations move on). One ``LoopingCall`` per stream on the
injected clock; it stops when the client goes away (``notifyFinish``) or
the console closes (``close_all``), so none outlives its connection. At
most ``MAX_STREAMS`` at once (then 429).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from upvoot.console.http import error, json_text

POLL = 0.5
KEEPALIVE = 2.0
MAX_STREAMS = 16


class _Stream:
    def __init__(self, request: Request, live_calls: Callable[[], list], clock: Any,
                 on_closed: Callable[["_Stream"], None]) -> None:
        self.request = request
        self.live_calls = live_calls
        self.clock = clock
        self.on_closed = on_closed
        self.last: str | None = None
        self.sent_at = 0.0
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self.closed = False

    def start(self) -> None:
        self.request.write(b"retry: 3000\n\n")
        self.request.notifyFinish().addBoth(lambda _: self.stop())
        self.loop.start(POLL, now=True).addErrback(self._failed)

    def tick(self) -> None:
        data = json_text(self.live_calls())
        now = self.clock.seconds()
        if data != self.last or now - self.sent_at >= KEEPALIVE:
            self.last, self.sent_at = data, now
            self.request.write(b"event: calls\ndata: " + data.encode("utf-8") + b"\n\n")

    def _failed(self, f: Any) -> None:
        Logger().failure("Live calls stream failed", f, event="console.live_failed")
        self.close()

    def stop(self) -> None:
        """The connection is gone (or going): no more ticks."""
        if self.closed:
            return
        self.closed = True
        if self.loop.running:
            self.loop.stop()
        self.on_closed(self)

    def close(self) -> None:
        """End the stream from this side."""
        finish = not self.closed and not self.request.finished
        self.stop()
        if finish:
            self.request.finish()


class LiveResource(Resource):
    isLeaf = True

    def __init__(self, live_calls: Callable[[], list], clock: Any, limit: int = MAX_STREAMS) -> None:
        super().__init__()
        self.live_calls = live_calls
        self.clock = clock
        self.limit = limit
        self.streams: set[_Stream] = set()

    def render_GET(self, request: Request) -> Any:
        if len(self.streams) >= self.limit:
            request.setHeader(b"retry-after", b"10")
            return error(request, 429, f"at most {self.limit} live views at once")
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"x-accel-buffering", b"no")  # a proxy in front must not sit on the events
        stream = _Stream(request, self.live_calls, self.clock, self.streams.discard)
        self.streams.add(stream)
        stream.start()
        return NOT_DONE_YET

    def close_all(self) -> None:
        for stream in list(self.streams):
            stream.close()
