"""Past calls: the list with its filters, one call whole, its picture and its recording.

``GET /console/api/calls?account=&agent=&end_reason=&since=&until=&limit=``
answers ``{"calls": [summary, ...]}`` newest first (``since``/``until``:
Unix seconds, or an ISO 8601 date or time, UTC unless it says otherwise;
``limit`` 1..500, default 50). ``GET /console/api/calls/<id>`` answers the
call record: metadata (transcript timestamps, ``latencies``, ``timeline``),
``transcript``, ``has_recording``; the key only as ``key_prefix``.
``.../timeline.svg`` is ``upvoot.console.timeline.render(call)``;
``.../recording`` the WAV, when the call was recorded and the file is
still there (404 otherwise), served only from ``recordings_dir`` and only
the file named after the call, whatever the record says.

A call id is letters, digits, ``-`` and ``_`` (at most 64); anything else
is a 404 before the database is asked.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from upvoot.console.http import BadRequest, header, send_json
from upvoot.ledger import call_search, store as storemod

CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
_FILTERS = ("account", "agent", "end_reason")


def _arg(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    try:
        value = values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest(400, f"{name} is not UTF-8") from None
    if len(value) > 200:
        raise BadRequest(400, f"{name} is too long")
    return value or None


def parse_time(name: str, text: str) -> float:
    """Unix seconds from ``text``: a number, or an ISO 8601 date or date-time
    (UTC when it names no zone)."""
    try:
        return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else _iso(text)
    except (ValueError, OverflowError):
        raise BadRequest(400, f"{name} must be Unix seconds or an ISO 8601 date, got {text[:40]!r}") from None


def _iso(text: str) -> float:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def filters(request: Request) -> dict[str, Any]:
    """The keyword arguments of ``call_search.search_calls`` from the query."""
    out: dict[str, Any] = {name: _arg(request, name) for name in _FILTERS}
    for name in ("since", "until"):
        text = _arg(request, name)
        out[name] = None if text is None else parse_time(name, text)
    text = _arg(request, "limit")
    if text is None:
        out["limit"] = DEFAULT_LIMIT
    elif text.isdigit() and 1 <= int(text) <= MAX_LIMIT:
        out["limit"] = int(text)
    else:
        raise BadRequest(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return out


async def list_calls(console: Any, request: Request) -> bytes:
    calls = await console.service.store.run(call_search.search_calls, **filters(request))
    return send_json(request, {"calls": calls})


async def get_call(console: Any, call_id: str) -> dict | None:
    """The call record as the page shows it, or None."""
    if not CALL_ID.fullmatch(call_id):
        return None
    call = await console.service.store.run(storemod.get_call, call_id)
    if call is None:
        return None
    call.pop("key", None)  # there is none; never let one appear
    call["has_recording"] = await console.run_in_thread(recording_path, console.service.config, call) is not None
    return call


async def show_call(console: Any, request: Request, call_id: str) -> bytes:
    call = await get_call(console, call_id)
    if call is None:
        raise BadRequest(404, "no such call")
    return send_json(request, call)


async def timeline_svg(console: Any, request: Request, call_id: str) -> bytes:
    from upvoot.console import timeline

    call = await get_call(console, call_id)
    if call is None:
        raise BadRequest(404, "no such call")
    svg = timeline.render(call)
    request.setHeader(b"content-type", b"image/svg+xml; charset=utf-8")
    return svg.encode("utf-8")


def recording_path(config: Any, call: dict) -> str | None:
    """The call's WAV: ``recordings_dir``/.../``<call_id>.wav`` as the record
    names it (relative to ``state_dir``), if it resolves inside
    ``recordings_dir`` and exists; else None."""
    relpath = (call.get("metadata") or {}).get("recording")
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath:
        return None
    path = os.path.realpath(os.path.join(config.state_dir, relpath))
    root = os.path.realpath(config.recordings_dir)
    if os.path.commonpath([root, path]) != root or os.path.basename(path) != f"{call['call_id']}.wav":
        return None
    return path if os.path.isfile(path) else None


def recording_file(config: Any, call: dict) -> tuple[str, int] | None:
    """``(path, size)`` of the call's WAV (``recording_path``), or None."""
    path = recording_path(config, call)
    if path is None:
        return None
    try:
        return path, os.path.getsize(path)
    except OSError:
        return None


def byte_range(text: str, size: int) -> tuple[int, int] | tuple[()] | None:
    """The inclusive ``(first, last)`` of a ``Range: bytes=...`` header with one
    range; None for no header or one this does not serve (the whole file is
    sent then); ``()`` for a range outside a file of ``size`` bytes."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", text or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n and size else ()
    start = int(first)
    end = min(size - 1, int(last)) if last else size - 1
    return (start, end) if start < size and start <= end else ()


@implementer(IPushProducer)
class FileStream:
    """A file as a response body, read in chunks in threads (``run_in_thread``)
    as fast as the client takes them: a push producer, paused while the
    transport's buffer is full, so a long recording never sits in memory."""

    CHUNK = 256 * 1024

    def __init__(self, request: Request, path: str, size: int, run_in_thread: Callable[..., Any]) -> None:
        self.request = request
        self.path = path
        self.run_in_thread = run_in_thread
        self.offset, self.size = 0, size  # bytes offset..size-1 are sent
        self.paused = self.reading = self.done = False

    def start(self) -> Any:
        """Send the file, or the one byte range the request asks for (206;
        416 for a range outside it): an ``<audio>`` element seeks that way."""
        total = self.size
        self.request.setHeader(b"accept-ranges", b"bytes")
        wanted = byte_range(header(self.request, b"range"), total)
        if wanted == ():
            self.request.setResponseCode(416)
            self.request.setHeader(b"content-range", f"bytes */{total}".encode("ascii"))
            return b""
        if wanted is not None:
            self.offset, self.size = wanted[0], wanted[1] + 1
            self.request.setResponseCode(206)
            self.request.setHeader(b"content-range", f"bytes {wanted[0]}-{wanted[1]}/{total}".encode("ascii"))
        self.request.setHeader(b"content-length", str(self.size - self.offset).encode("ascii"))
        self.request.notifyFinish().addBoth(lambda _: self.stopProducing())
        self.request.registerProducer(self, True)
        self._next()
        return NOT_DONE_YET

    def _read(self, offset: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(min(self.CHUNK, self.size - offset))

    def _next(self) -> None:
        if self.paused or self.reading or self.done:
            return
        if self.offset >= self.size:
            self._finish()
            return
        self.reading = True
        self.run_in_thread(self._read, self.offset).addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self.reading = False
        if self.done:
            return
        if not data:  # the file shrank: end what was promised short
            self._failed(None)
            return
        self.offset += len(data)
        self.request.write(data)
        self._next()

    def _failed(self, f: Any) -> None:
        self.reading = False
        if not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.loseConnection()  # a short body must not look complete

    def _finish(self) -> None:
        self.done = True
        self.request.unregisterProducer()
        self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._next()

    def stopProducing(self) -> None:
        self.done = True
