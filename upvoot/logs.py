"""JSON logs, one object per line: ``twistd --logger=upvoot.logs.json_observer``.

Every line has the same fields, so a log shipper (journald, Loki, Vector)
needs no parsing rules:

| field | meaning |
|---|---|
| time | ISO 8601, UTC, milliseconds: ``2026-01-31T12:00:00.123+00:00`` |
| level | ``debug``, ``info``, ``warn``, ``error`` or ``critical`` |
| namespace | the logger's namespace (``upvoot.daemon.ws.VoiceProtocol``) |
| event | the stable event name our code passes (``call.ended``, ``auth.denied``), or null |
| message | the human-readable text |
| call_id | present when the event concerns a call |
| traceback | present when a failure was logged |
| data | the event's other fields that are plain JSON values (``reason``, ``duration``, ...) |

Events from Twisted itself and from libraries have ``event: null``.
API keys never reach the log in the first place (see ``upvoot.daemon.ws``).
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_PLAIN = (str, int, float, bool, type(None))
_CORE = {"event", "call_id", "message", "format", "time", "system", "isError", "why", "failure"}


def _level(event: dict) -> str:
    level = event.get("log_level")
    if isinstance(level, type(LogLevel.info)):  # a NamedConstant
        return level.name
    return "error" if event.get("isError") else "info"


def _time(event: dict) -> str | None:
    t = event.get("log_time")
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def event_as_dict(event: dict) -> dict[str, Any]:
    """The stable JSON shape of one ``twisted.logger`` event."""
    name = event.get("event")
    out: dict[str, Any] = {
        "time": _time(event),
        "level": _level(event),
        "namespace": event.get("log_namespace"),
        "event": name if isinstance(name, str) else None,
        "message": formatEvent(event),
    }
    call_id = event.get("call_id")
    if call_id is not None:
        out["call_id"] = str(call_id)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    data = {
        k: v for k, v in event.items()
        if not k.startswith("log_") and k not in _CORE and isinstance(k, str) and isinstance(v, _PLAIN)
    }
    if data:
        out["data"] = data
    return out


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event to ``out`` as one line of JSON and flushes."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        try:
            line = json.dumps(event_as_dict(event), default=repr)
        except Exception as e:  # never let a bad event break logging
            line = json.dumps({"time": _time(event), "level": "error", "namespace": __name__, "event": "log.unserializable",
                               "message": f"could not serialize a log event: {e!r}"})
        self._out.write(line + "\n")
        self._out.flush()


def json_observer() -> JSONLineObserver:
    """The factory for ``twistd --logger``: JSON lines on stdout.

    stdout is captured now, before twistd redirects ``sys.stdout`` into
    the log system (writing to the redirected stream would loop)."""
    return JSONLineObserver(sys.stdout)
