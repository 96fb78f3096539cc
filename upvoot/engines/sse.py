"""An incremental parser for server-sent events (the ``text/event-stream``
format of the WHATWG HTML standard, as streamed by OpenAI-compatible APIs).

Pure: bytes in, events out, no I/O and no clock, so it is tested on its own
and fed straight from ``dataReceived``. The wire format::

    event: NAME            (optional; default "message")
    data: first line
    data: second line      (several data lines join with "\\n")
    id: 42
    : a comment            (ignored)
                           (a blank line dispatches the event)

Lines end with CRLF, LF or CR, and a chunk may end anywhere: in the middle
of a line, of a UTF-8 character, or between the CR and the LF of a CRLF.
One space after the colon is dropped. An event without any data line is
not dispatched; a last event not closed by a blank line is dropped at the
end of the stream (as the standard says).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Feed bytes as they arrive; get back the events they completed."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip_lf = False  # the last chunk ended with CR: drop a leading LF
        self._first = True  # a UTF-8 BOM may open the stream
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        self._buffer += chunk
        if self._first and len(self._buffer) >= 3:
            if self._buffer[:3] == b"\xef\xbb\xbf":
                del self._buffer[:3]
            self._first = False
        events: list[Event] = []
        start = 0
        buf = self._buffer
        n = len(buf)
        i = 0
        while i < n:
            c = buf[i]
            if c == 0x0A or c == 0x0D:
                line = bytes(buf[start:i])
                if c == 0x0D:
                    if i + 1 < n:
                        if buf[i + 1] == 0x0A:
                            i += 1
                    else:
                        self._skip_lf = True
                i += 1
                start = i
                event = self._line(line.decode("utf-8", errors="replace"))
                if event is not None:
                    events.append(event)
            else:
                i += 1
        del buf[:start]
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = Event("\n".join(self._data), self._event or "message", self._id)
            self._data = []
            self._event = ""
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        # "retry" and unknown fields are ignored
        return None

    @property
    def pending(self) -> bool:
        """True when a partial line or an undispatched event is held."""
        return bool(self._buffer) or bool(self._data)


__all__ = ["Event", "SSEParser"]
