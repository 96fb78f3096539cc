"""The console's resource tree, mounted at ``/console/`` on the admin listener.

::

    /console            -> 301 /console/
    /console/           index.html
    /console/static/F   a file shipped in upvoot/console/static/ (read once, at start; no listing)
    /console/api/...    the JSON API (``Api``): login, session, logout, agents, test-key,
                        live (server-sent events), calls, calls/ID, calls/ID/timeline.svg,
                        calls/ID/recording

Every response under ``/console`` carries the security headers
(``http.security_headers``: the CSP whose ``connect-src`` names the public
listener the page calls, ``nosniff``, no framing); the API's carry
``Cache-Control: no-store`` too. Every API route but ``login`` needs a
session (else 401); every POST but ``login`` needs the session's CSRF
token in ``X-CSRF-Token`` (else 403), and a POST from another origin
(``Origin`` naming another host) is refused (403) whatever it carries.
"""

from __future__ import annotations

import importlib.resources
import re
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from upvoot.console import address, history, keys
from upvoot.console.auth import (
    COOKIE, LoginThrottle, Sessions, cleared_cookie, load_token, session_cookie, token_matches, token_path,
)
from upvoot.console.http import BadRequest, error, header, read_json_object, respond_later, security_headers, send_json
from upvoot.console.live import LiveResource
from upvoot.ledger.threads import synchronous

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json",
    ".wav": "audio/wav", ".txt": "text/plain; charset=utf-8",
}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
MAX_STATIC_BYTES = 8 << 20

_log = Logger()


def static_files(package: str = "upvoot.console") -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every file in the package's
    ``static/`` folder (not below it) with a known type. Blocking: at start."""
    out: dict[str, tuple[bytes, str]] = {}
    folder = importlib.resources.files(package).joinpath("static")
    if not folder.is_dir():
        return out
    total = 0
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        suffix = "." + entry.name.rsplit(".", 1)[-1].lower() if "." in entry.name else ""
        if entry.is_file() and _STATIC_NAME.fullmatch(entry.name) and suffix in STATIC_TYPES:
            data = entry.read_bytes()
            total += len(data)
            if total > MAX_STATIC_BYTES:
                raise ValueError(f"upvoot/console/static holds over {MAX_STATIC_BYTES} bytes")
            out[entry.name] = (data, STATIC_TYPES[suffix])
    return out


class Console:
    """What the console's resources share: the service, the public
    listeners, the token, the sessions, the clock."""

    def __init__(self, service: Any, endpoints: list[str] | tuple[str, ...], token: str, *, clock: Any = None,
                 run_in_thread: Callable[..., Any] = synchronous, wall: Callable[[], float] = time.time,
                 files: dict[str, tuple[bytes, str]] | None = None) -> None:
        """``service``: has ``config``, ``store.run``, ``live_calls()``,
        ``clock``; ``endpoints``: the public listeners' endpoint strings;
        ``token``: the operator token (``auth.load_token``);
        ``run_in_thread``: for file work (``upvoot.ledger.threads``);
        ``clock``: the sessions' time (default the service's); ``wall``: the
        time of keys in the database (what ``lookup_key`` compares with)."""
        self.service = service
        self.endpoints = tuple(endpoints)
        self.token = token
        self.clock = clock if clock is not None else service.clock
        self.run_in_thread = run_in_thread
        self.wall = wall
        self.sessions = Sessions(self.clock)
        self.throttle = LoginThrottle(self.clock)
        self.files = static_files() if files is None else files
        self.live = LiveResource(service.live_calls, self.clock)

    def voice_origin(self, request: Request) -> str | None:
        return address.voice_origin(self.endpoints, address.browser_host(header(request, b"host")),
                                    request.isSecure())

    def cookie(self, request: Request) -> str | None:
        value = request.getCookie(COOKIE.encode("ascii"))
        return value.decode("ascii", "replace") if value else None

    def close(self) -> None:
        """End the live streams (the daemon is stopping)."""
        self.live.close_all()


class _Bytes(Resource):
    isLeaf = True

    def __init__(self, data: bytes, content_type: str) -> None:
        super().__init__()
        self.data = data
        self.content_type = content_type.encode("ascii")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.data


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return error(request, 404, "not found")


class _Static(Resource):
    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        super().__init__()
        self.files = files

    def getChild(self, path: bytes, request: Request) -> Resource:
        name = path.decode("utf-8", "replace")
        if request.postpath or name not in self.files:  # one level, known names: no listing, no ../
            return _NotFound()
        return _Bytes(*self.files[name])

    def render(self, request: Request) -> bytes:
        return error(request, 404, "not found")


class ConsoleResource(Resource):
    """``/console``: the security headers on everything below it."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.api = Api(console)
        self.static = _Static(console.files)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        security_headers(request, self.console.voice_origin(request))
        if path == b"" and not request.postpath and "index.html" in self.console.files:
            return _Bytes(*self.console.files["index.html"])
        if path == b"static":
            return self.static
        if path == b"api":
            return self.api
        return _NotFound()

    def render(self, request: Request) -> bytes:
        security_headers(request, self.console.voice_origin(request))
        request.setResponseCode(301)
        request.setHeader(b"location", b"/console/")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"/console/\n"


#: (route, method) -> handler name; a route is the API path with "*" for a call id
ROUTES = {
    (("login",), b"POST"): "login", (("session",), b"GET"): "session", (("logout",), b"POST"): "logout",
    (("agents",), b"GET"): "agents", (("test-key",), b"POST"): "test_key", (("live",), b"GET"): "live",
    (("calls",), b"GET"): "calls", (("calls", "*"), b"GET"): "call",
    (("calls", "*", "timeline.svg"), b"GET"): "timeline", (("calls", "*", "recording"), b"GET"): "recording",
}
_ROUTES = {route for route, _ in ROUTES}


class Api(Resource):
    """``/console/api/...``: one leaf that routes on the rest of the path."""

    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render(self, request: Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        call_id = parts[1] if len(parts) > 1 and parts[0] == "calls" else None
        route = tuple("*" if i == 1 and call_id is not None else p for i, p in enumerate(parts))
        if route not in _ROUTES:
            return error(request, 404, "not found")
        method = b"GET" if request.method == b"HEAD" and route != ("live",) else request.method
        name = ROUTES.get((route, method))
        if name is None:
            request.setHeader(b"allow", b", ".join(m for (r, m) in ROUTES if r == route))
            return error(request, 405, "method not allowed")
        if method == b"POST" and not self._same_origin(request):
            return error(request, 403, "cross-origin request refused")
        if name == "login":
            return respond_later(request, lambda: self.login(request))
        session = self.console.sessions.get(self.console.cookie(request))
        if session is None:
            return error(request, 401, "log in first")
        if method == b"POST" and not session.csrf_matches(header(request, b"x-csrf-token")):
            return error(request, 403, "missing or wrong X-CSRF-Token")
        if name == "session":
            return send_json(request, {"csrf": session.csrf, "expires_at": session.expires_at})
        if name == "logout":
            self.console.sessions.end(self.console.cookie(request))
            request.setHeader(b"set-cookie", cleared_cookie(request.isSecure()).encode("ascii"))
            return send_json(request, {"ok": True})
        if name == "live":
            return self.console.live.render_GET(request)
        return respond_later(request, lambda: getattr(self, name)(request, call_id))

    def _same_origin(self, request: Request) -> bool:
        origin = header(request, b"origin")
        if not origin:
            return True  # not a browser's cross-site request (they always send Origin on POST)
        return urlsplit(origin).netloc.lower() == header(request, b"host").lower()

    async def login(self, request: Request) -> bytes:
        console = self.console
        host = getattr(request.getClientAddress(), "host", "?")
        if console.throttle.blocked(host):
            request.setHeader(b"retry-after", str(int(console.throttle.window)).encode("ascii"))
            return error(request, 429, "too many failed logins; try again in a minute")
        body = read_json_object(request)
        if not token_matches(body.get("token"), console.token):
            console.throttle.failed(host)
            _log.warn("Console login refused: wrong token from {peer}", event="console.login_refused",
                      peer=_peer(request))
            return error(request, 401, "wrong token")
        console.sessions.end(console.cookie(request))
        cookie, session = console.sessions.create()
        request.setHeader(b"set-cookie",
                          session_cookie(cookie, request.isSecure(), console.sessions.ttl).encode("ascii"))
        _log.info("Console login from {peer}", event="console.login", peer=_peer(request))
        return send_json(request, {"csrf": session.csrf, "expires_at": session.expires_at})

    async def agents(self, request: Request, _: Any) -> bytes:
        return await keys.agents(self.console, request)

    async def test_key(self, request: Request, _: Any) -> bytes:
        return await keys.mint(self.console, request, read_json_object(request))

    async def calls(self, request: Request, _: Any) -> bytes:
        return await history.list_calls(self.console, request)

    async def call(self, request: Request, call_id: str) -> bytes:
        return await history.show_call(self.console, request, call_id)

    async def timeline(self, request: Request, call_id: str) -> bytes:
        return await history.timeline_svg(self.console, request, call_id)

    async def recording(self, request: Request, call_id: str) -> Any:
        call = await history.get_call(self.console, call_id)
        found = None if call is None else await self.console.run_in_thread(
            history.recording_file, self.console.service.config, call)
        if found is None:
            raise BadRequest(404, "no recording of this call")
        request.setHeader(b"content-type", b"audio/wav")
        request.setHeader(b"content-disposition", f'inline; filename="{call["call_id"]}.wav"'.encode("ascii"))
        return history.FileStream(request, *found, self.console.run_in_thread).start()


def _peer(request: Request) -> str:
    peer = request.getClientAddress()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


def console_resource(service: Any, endpoints: list[str] | tuple[str, ...],
                     run_in_thread: Callable[..., Any] = synchronous) -> ConsoleResource:
    """The ``/console`` resource of ``service`` (the daemon's composition
    root calls this at start): reads, or creates, the operator token file
    and the static files. Raises ``auth.ConsoleSetupError``."""
    config = service.config
    token = load_token(token_path(config), f"{config.path}: [upvoot] admin_token_file")
    return ConsoleResource(Console(service, endpoints, token, run_in_thread=run_in_thread))
