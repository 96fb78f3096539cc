"""The console's HTTP helpers: JSON in and out, the security headers, async handlers.

JSON goes out through ``json_bytes``: ``json.dumps`` with ``<``, ``>``,
``&`` and the two JavaScript line separators written as ``\\u`` escapes
(still the same JSON; nothing in it can close a tag or be sniffed as
HTML), and any API key that found its way into a call's text replaced by
its prefix (``redact_keys``). Every response under ``/console/`` carries
the headers of ``security_headers``; the API's also ``Cache-Control:
no-store``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

MAX_BODY = 16 * 1024
_KEY = re.compile(r"uvk_[A-Za-z0-9_-]{32}")
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ESCAPED = re.compile("[<>&\u2028\u2029]")

_log = Logger()


def header(request: Request, name: bytes) -> str:
    """A request header as text ("" when absent)."""
    value = request.getHeader(name)
    return value.decode("latin-1") if value else ""


def redact_keys(text: str) -> str:
    """``text`` with every API key cut to its prefix (``uvk_AbCdEfGh…``)."""
    return _KEY.sub(lambda m: m.group(0)[:12] + "\u2026", text)


def json_text(value: Any, keep_key: str | None = None) -> str:
    """``value`` as JSON for a page: escaped as above, API keys cut to their
    prefix (but ``keep_key``, the one a test-key response hands out)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
    text = _ESCAPED.sub(lambda m: _ESCAPES[m.group(0)], text)
    if keep_key is None:
        return redact_keys(text)
    return _KEY.sub(lambda m: m.group(0) if m.group(0) == keep_key else m.group(0)[:12] + "\u2026", text)


def json_bytes(value: Any, keep_key: str | None = None) -> bytes:
    return json_text(value, keep_key).encode("utf-8")


def csp(voice_origin: str | None) -> str:
    """The console's Content-Security-Policy: its own origin only, and the
    public listener the page calls (``connect-src``)."""
    connect = "'self'" + (f" {voice_origin}" if voice_origin else "")
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
            f" connect-src {connect}; frame-ancestors 'none'; base-uri 'none'")


def security_headers(request: Request, voice_origin: str | None) -> None:
    request.setHeader(b"content-security-policy", csp(voice_origin).encode("ascii"))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cross-origin-opener-policy", b"same-origin")


def send_json(request: Request, value: Any, code: int = 200, keep_key: str | None = None) -> bytes:
    """Set the status and Content-Type; the body to return from ``render_*``."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json_bytes(value, keep_key) + b"\n"


def error(request: Request, code: int, message: str) -> bytes:
    return send_json(request, {"error": message}, code)


class BadRequest(Exception):
    """A request the API refuses: ``code`` (400, 413, 415...) and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_json_object(request: Request) -> dict:
    """The request's body: a JSON object of at most ``MAX_BODY`` bytes, sent
    as ``application/json``; raises ``BadRequest``."""
    kind = header(request, b"content-type").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(415, "send JSON (Content-Type: application/json)")
    body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(body) > MAX_BODY:
        raise BadRequest(413, f"the body is over {MAX_BODY} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return value


def respond_later(request: Request, handler: Callable[[], Awaitable[bytes]]) -> Any:
    """Run ``async handler()`` (which returns the body, having set status and
    headers, or ``NOT_DONE_YET`` when a producer writes it) and finish the request with its result; ``NOT_DONE_YET`` to
    return from ``render_*``. A client gone meanwhile is no error."""
    finished = request.notifyFinish()
    gone: list[bool] = []
    finished.addErrback(lambda _: gone.append(True))

    def write(body: Any) -> None:
        if gone or request.finished or body is NOT_DONE_YET:  # NOT_DONE_YET: a producer writes the body
            return
        request.write(body)
        request.finish()

    def failed(f: Any) -> bytes:
        if f.check(BadRequest):
            return error(request, f.value.code, str(f.value))
        _log.failure("Console request {path} failed", f, event="console.error",
                     path=request.path.decode("ascii", "replace")[:80])
        return error(request, 500, "internal error (see the daemon's log)")

    d = defer.Deferred.fromCoroutine(handler())
    d.addErrback(failed)
    d.addCallback(write)
    d.addErrback(lambda f: _log.failure("Console response failed", f, event="console.error"))
    return NOT_DONE_YET
