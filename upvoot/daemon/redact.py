"""No key in a log line: redaction of ``/voice/<key>`` paths and ``uvk_`` keys.

UpVoot's own code logs a key only by its 12-character prefix. Autobahn's
logger quotes raw requests (``Bad HTTP request status line "GET
/voice/uvk_... extra HTTP/1.1"`` at warn level, whole requests at debug):
``RedactingLog`` wraps it, so every message and every field it logs is
redacted before any observer sees it.
"""

from __future__ import annotations

import re
from typing import Any

_KEY_IN_PATH = re.compile(r"/voice/[^\s\"?]+")
_KEY = re.compile(r"uvk_[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """``text`` with every ``/voice/<anything>`` and every ``uvk_...`` token hidden."""
    if "/voice/" not in text and "uvk_" not in text:
        return text
    return _KEY.sub("uvk_<redacted>", _KEY_IN_PATH.sub("/voice/<redacted>", text))


class _Redacted:
    """A log field (bytes, a dict of headers...) redacted when the event is formatted."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        text = self.value.decode("latin-1") if isinstance(self.value, bytes) else format(self.value, spec)
        return redact(text)

    def __str__(self) -> str:
        return format(self, "")

    def __repr__(self) -> str:
        return redact(repr(self.value))


def _clean(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _Redacted(value)


class RedactingLog:
    """Autobahn's logger (``self.log``) with every message and field redacted:
    Autobahn quotes raw requests ('Bad HTTP request status line "GET /voice/..."')."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @staticmethod
    def _clean(fmt: Any, kw: dict) -> tuple[Any, dict]:
        return (redact(fmt) if isinstance(fmt, str) else fmt), {k: _clean(v) for k, v in kw.items()}

    def critical(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.critical(f, **k)

    def error(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.error(f, **k)

    def warn(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.warn(f, **k)

    def info(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.info(f, **k)

    def debug(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.debug(f, **k)

    def trace(self, fmt: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.trace(f, **k)

    def failure(self, fmt: Any = None, failure: Any = None, **kw: Any) -> None:
        f, k = self._clean(fmt, kw)
        self._inner.failure(f, failure, **k)
