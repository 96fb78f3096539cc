"""The operator token, and the sessions a browser exchanges it for.

The token lives in a file (``[upvoot] admin_token_file``; empty: the file
``admin_token`` in ``state_dir``, allowed only while ``admin_listen`` is
on loopback). It is created on first start when missing: 32 random bytes,
URL-safe base64, mode 0600, written before anything reads it. ``upvoot
console-url`` prints it in the URL's fragment, which a browser never sends
to a server; the page posts it once to ``/console/api/login``.

A login makes a session: a random cookie value (``upvoot_console``,
HttpOnly, SameSite=Strict, Path=/console, Secure over TLS) and a CSRF token
the page sends back in ``X-CSRF-Token`` with every POST. Sessions live in
memory (a restart logs everybody out), each for ``SESSION_TTL``; the store
keeps them by the SHA-256 of the cookie, so no lookup ever compares the
secret itself, and every comparison of a secret is ``hmac.compare_digest``.
Failed logins are throttled. Neither the token nor a cookie is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from typing import Any

import attrs
from twisted.logger import Logger

from upvoot.console.address import loopback_only

TOKEN_BYTES = 32
DEFAULT_TOKEN_FILE = "admin_token"
COOKIE = "upvoot_console"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 64
#: Failed logins allowed from one address in ``LOGIN_WINDOW`` seconds, then 429 until it passes.
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW = 60.0
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,512}")

_log = Logger()


class ConsoleSetupError(Exception):
    """The console cannot start as configured: one line naming file, section and option."""


def token_path(config: Any) -> str:
    """The operator token's file: ``admin_token_file``, or ``admin_token`` in ``state_dir``."""
    return config.admin_token_file or os.path.join(config.state_dir, DEFAULT_TOKEN_FILE)


def check_console(config: Any) -> None:
    """Refuse a console an attacker could reach with a token nobody chose to
    keep: on an admin listener that is not loopback-only, the token file
    must be named explicitly (``admin_token_file``). Raises ``ConsoleSetupError``."""
    if not (config.console and config.admin_listen) or config.admin_token_file:
        return
    if not loopback_only(config.admin_listen):
        raise ConsoleSetupError(
            f"{config.path}: [upvoot] admin_token_file: the console on an admin listener that is not on"
            f" loopback (admin_listen = {config.admin_listen}) needs an explicit token file: set"
            " admin_token_file (created with a random token if missing), or set console = no")


def load_token(path: str, option: str) -> str:
    """The operator token in ``path``, creating the file (mode 0600, a random
    token) if it does not exist. ``option`` names the ini option in errors.
    Blocking: run it at start, before the reactor, or in a thread."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConsoleSetupError(f"{option}: cannot create {path}: {e.strerror or e}") from None
    else:
        try:
            os.write(fd, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        _log.info("Created the console's operator token file {path} (mode 0600)", event="console.token_created",
                  path=path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(4096)
    except OSError as e:
        raise ConsoleSetupError(f"{option}: cannot read {path}: {e.strerror or e}") from None
    try:
        token = text.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not _TOKEN.fullmatch(token):
        raise ConsoleSetupError(f"{option}: {path} must hold one token of 16 to 512 letters, digits, '-' and '_'"
                                " (delete it and a new one is made at the next start)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warn("The console's token file {path} is readable by other users: chmod 600 it",
                  event="console.token_mode", path=path)
    return token


def token_matches(given: object, token: str) -> bool:
    """Constant time in the token (both sides are hashed to one length first)."""
    if not isinstance(given, str) or len(given) > 1024:
        return False
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "replace")).digest(),
                               hashlib.sha256(token.encode("ascii")).digest())


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "replace")).hexdigest()


@attrs.define
class Session:
    csrf: str = attrs.field(repr=False)
    expires_at: float

    def csrf_matches(self, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                              self.csrf.encode("ascii"))


class Sessions:
    """Logged-in browsers, by the SHA-256 of their cookie; time from ``clock``."""

    def __init__(self, clock: Any, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.ttl = ttl
        self.limit = limit
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> tuple[str, Session]:
        """A new session: ``(cookie value, session)``. Past ``limit`` sessions
        the one that would expire first is ended."""
        now = self.clock.seconds()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
        while len(self._sessions) >= self.limit:
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].expires_at)]
        cookie = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires_at=now + self.ttl)
        self._sessions[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        key = _digest(cookie)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= self.clock.seconds():
            del self._sessions[key]
            return None
        return session

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_digest(cookie), None)


class LoginThrottle:
    """At most ``limit`` failed logins in ``window`` seconds from one address
    (then 429 for it until the window passes). The token has 256 bits: this
    keeps a guessing script from filling the log, and a stranger's script
    does not lock the operator out. At most ``MAX_ADDRESSES`` are tracked."""

    MAX_ADDRESSES = 1024

    def __init__(self, clock: Any, limit: int = MAX_LOGIN_FAILURES, window: float = LOGIN_WINDOW) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self._failures: dict[str, list[float]] = {}

    def _recent(self, host: str) -> list[float]:
        cutoff = self.clock.seconds() - self.window
        times = [t for t in self._failures.get(host, ()) if t > cutoff]
        if times:
            self._failures[host] = times
        else:
            self._failures.pop(host, None)
        return times

    def blocked(self, host: str) -> bool:
        return len(self._recent(host)) >= self.limit

    def failed(self, host: str) -> None:
        times = self._recent(host)
        if not times and len(self._failures) >= self.MAX_ADDRESSES:
            cutoff = self.clock.seconds() - self.window
            stale = [h for h, seen in self._failures.items() if seen[-1] <= cutoff]
            for old in stale or [next(iter(self._failures))]:  # none stale: the longest tracked goes
                del self._failures[old]
        self._failures[host] = times + [self.clock.seconds()]


def session_cookie(value: str, secure: bool, max_age: float) -> str:
    """The ``Set-Cookie`` value of a session."""
    cookie = f"{COOKIE}={value}; Path=/console; Max-Age={int(max_age)}; HttpOnly; SameSite=Strict"
    return cookie + ("; Secure" if secure else "")


def cleared_cookie(secure: bool) -> str:
    return session_cookie("", secure, 0)
