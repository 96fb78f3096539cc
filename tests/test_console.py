"""The console's server side (upvoot.console), in memory.

The real resource tree (``upvoot.daemon.web.admin_resource`` with the
console mounted) over ``treq.testing.StubTreq``, on a real ``UpVootService``
whose database is a real SQLite file run inline and whose clock is a
``Clock`` (``tests.test_service.Ready``); the live stream over a real
``twisted.web`` HTTP channel on a ``StringTransport``, disconnected as a
browser would.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from http.cookies import SimpleCookie

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import failure, usage
from twisted.web.server import Site

from tests.test_service import INI_CALLS, T0, Ready
from upvoot import cli
from upvoot.config import load_config
from upvoot.console import address, auth
from upvoot.console.http import csp
from upvoot.console.resources import Console, ConsoleResource, static_files
from upvoot.daemon.seams import Admission, Refusal
from upvoot.daemon.tap import Options
from upvoot.daemon.web import admin_resource
from upvoot.framing.base import CallStarted
from upvoot.ledger import console_keys, store
from upvoot.ledger.records import CallRecord

ADMIN = "http://127.0.0.1:8081"
PUBLIC = ["tcp:8080:interface=127.0.0.1"]
TOKEN = "operator-token-for-tests-0123456789"
KEY = re.compile(r"uvk_[A-Za-z0-9_-]{32}")
HOSTILE = "</script><script>alert(1)</script>\u2028<img src=x onerror=alert(2)> & \"quotes\""
FILES = {"index.html": (b"<!doctype html><title>UpVoot</title>", "text/html; charset=utf-8"),
         "app.js": (b"export {};\n", "text/javascript; charset=utf-8")}


def _result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], failure.Failure):
        out[0].raiseException()
    return out[0]


class Browser:
    """The admin listener's tree in memory, and a cookie jar (StubTreq's)."""

    def __init__(self, ready: Ready, files=None) -> None:
        self.ready = ready
        self.clock = ready.clock
        # keys carry wall time: Store.authenticate's lookup_key compares with time.time()
        self.console = Console(ready.service, PUBLIC, TOKEN, clock=self.clock, wall=time.time,
                               files=FILES if files is None else files)
        self.stub = StubTreq(admin_resource(ready.service, lambda: True, ConsoleResource(self.console)))
        self.csrf: str | None = None

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, headers, body bytes)."""
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        d = self.stub.request(method, ADMIN + path, data=data, headers=headers, allow_redirects=False)
        self.stub.flush()
        response = _result(d)
        content = _result(response.content())
        return response.code, response.headers, content

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, csrf: bool = True, **kw):
        headers = dict(kw.pop("headers", {}))
        if csrf and self.csrf:
            headers["X-CSRF-Token"] = self.csrf
        return self.request("POST", path, body=body, headers=headers, **kw)

    def login(self, token: str = TOKEN):
        code, headers, body = self.post("/console/api/login", {"token": token}, csrf=False)
        if code == 200:
            self.csrf = json.loads(body)["csrf"]
        return code, headers, body

    def json(self, method: str, path: str, body=None, code: int = 200):
        got, _, content = self.post(path, body) if method == "POST" else self.get(path)
        assert got == code, (got, content)
        return json.loads(content)


@pytest.fixture
def ready(tmp_path):
    path = tmp_path / "upvoot.ini"
    path.write_text(INI_CALLS)
    return Ready(load_config(str(path)))


@pytest.fixture
def browser(ready):
    return Browser(ready)


def settle(ready: Ready, call_id: str, **fields) -> None:
    record = dict(call_id=call_id, key_prefix=ready.prefix, account="acme", agent="demo", provider="raw",
                  started_at=T0 + 10, ended_at=T0 + 40, duration=30.0, end_reason="hangup", turns=1)
    record.update(fields)
    conn = store.connect(ready.config.database)
    try:
        store.transact(conn, store.settle_call, CallRecord(**record))
    finally:
        conn.close()


# ---- login and sessions -----------------------------------------------------------


def test_login_sets_a_strict_httponly_cookie_and_the_session_answers_its_csrf_token(browser):
    code, headers, body = browser.login()
    assert code == 200
    (raw,) = headers.getRawHeaders("set-cookie")
    cookie = SimpleCookie(raw)[auth.COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # plain http on loopback; over TLS it is Secure
    assert TOKEN not in raw and TOKEN.encode() not in body
    csrf = json.loads(body)["csrf"]
    assert browser.json("GET", "/console/api/session")["csrf"] == csrf


def test_a_wrong_token_is_401_and_ten_of_them_a_minute_lock_that_address_out(browser):
    assert browser.login("not-the-token")[0] == 401
    for _ in range(9):
        browser.login("x" * 40)
    assert browser.login()[0] == 429  # even the right one, until the window passes
    browser.clock.advance(auth.LOGIN_WINDOW + 1)
    assert browser.login()[0] == 200
    throttle = auth.LoginThrottle(browser.clock, limit=1)
    throttle.failed("10.0.0.1")
    assert throttle.blocked("10.0.0.1") and not throttle.blocked("10.0.0.2")
    throttle.MAX_ADDRESSES = 2
    for host in ("10.0.0.2", "10.0.0.3"):
        throttle.failed(host)
    assert len(throttle._failures) == 2 and throttle.blocked("10.0.0.3")


def test_every_api_route_needs_a_session(browser):
    for method, path in [("GET", "session"), ("POST", "logout"), ("GET", "agents"), ("POST", "test-key"),
                         ("GET", "live"), ("GET", "calls"), ("GET", "calls/abc"), ("GET", "calls/abc/timeline.svg"),
                         ("GET", "calls/abc/recording")]:
        code, headers, body = browser.request(method, f"/console/api/{path}")
        assert code == 401, path
        assert json.loads(body) == {"error": "log in first"}


def test_a_post_without_the_csrf_token_or_from_another_origin_is_403(browser):
    browser.login()
    good = {"agent": "demo", "account": "acme"}
    assert browser.post("/console/api/test-key", good, csrf=False)[0] == 403
    assert browser.post("/console/api/test-key", good, csrf=False, headers={"X-CSRF-Token": "forged"})[0] == 403
    assert browser.post("/console/api/logout", csrf=False)[0] == 403
    assert browser.post("/console/api/test-key", good, headers={"Origin": "http://evil.example"})[0] == 403
    assert browser.post("/console/api/test-key", good, headers={"Origin": ADMIN})[0] == 200
    assert browser.post("/console/api/logout")[0] == 200
    assert browser.get("/console/api/session")[0] == 401


def test_a_session_ends_after_its_lifetime_on_the_clock(browser):
    browser.login()
    browser.clock.advance(auth.SESSION_TTL - 1)
    assert browser.get("/console/api/session")[0] == 200
    browser.clock.advance(2)
    assert browser.get("/console/api/session")[0] == 401


def test_sessions_are_bounded_and_kept_by_digest(ready):
    sessions = auth.Sessions(ready.clock, limit=3)
    cookies = [sessions.create()[0] for _ in range(4)]
    assert len(sessions) == 3 and sessions.get(cookies[0]) is None and sessions.get(cookies[3]) is not None
    assert not any(cookie in key for cookie in cookies for key in sessions._sessions)


def test_login_refuses_what_is_not_a_small_json_object(browser):
    assert browser.request("POST", "/console/api/login", raw=b"token=" + TOKEN.encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert browser.request("POST", "/console/api/login", raw=b"[1]", headers={"Content-Type": "application/json"})[0] == 400
    assert browser.post("/console/api/login", {"token": "x" * 20000}, csrf=False)[0] == 413
    assert browser.get("/console/api/login")[0] == 405


# ---- test keys ---------------------------------------------------------------------


def test_a_minted_key_opens_one_call_marked_as_a_console_call(browser, ready):
    browser.login()
    minted = browser.json("POST", "/console/api/test-key", {"agent": "demo", "account": "acme"})
    assert set(minted) == {"key", "prefix", "expires_at", "voice_url"}
    assert KEY.fullmatch(minted["key"]) and minted["prefix"] == minted["key"][:12]
    assert minted["voice_url"] == "ws://127.0.0.1:8080/voice/"
    assert minted["expires_at"] == pytest.approx(time.time() + ready.config.console_key_ttl, abs=5)
    admission = _result(ready.service.admit("/voice/" + minted["key"], "tcp4:127.0.0.1:5000", {}, {}))
    assert isinstance(admission, Admission) and admission.kind == "console"
    again = _result(ready.service.admit("/voice/" + minted["key"], "tcp4:127.0.0.1:5001", {}, {}))
    assert isinstance(again, Refusal) and again.status == 401  # single use
    handle = ready.start(CallStarted(provider="raw"), admission)
    (live,) = [c for c in ready.service.live_calls() if c["call_id"] == handle.call_id]
    assert live["console"] is True and live["key_prefix"] == minted["prefix"]
    assert set(live) >= {"call_id", "agent", "account", "provider", "state", "started_at", "duration", "turns"}
    assert ready.row(handle.call_id)["metadata"]["console"] is True  # the active row already
    handle.end()
    assert ready.row(handle.call_id)["metadata"]["console"] is True
    summary = browser.json("GET", "/console/api/calls")["calls"][0]
    assert summary["call_id"] == handle.call_id and summary["console"] is True
    for path in ("agents", "calls", f"calls/{handle.call_id}", f"calls/{handle.call_id}/timeline.svg", "session"):
        code, headers, body = browser.get("/console/api/" + path)
        assert code == 200 and minted["key"].encode() not in body, path  # the prefix only, from now on


def test_console_keys_expire_and_are_claimed_once_on_the_clock(ready):
    clock = Clock()
    clock.advance(T0)
    conn = store.connect(ready.config.database)
    try:
        key, prefix, expires_at = store.transact(conn, console_keys.mint_console_key, "acme", "demo",
                                                 clock.seconds(), 300.0)
        clock.advance(301)
        assert store.transact(conn, store.lookup_key, key, clock.seconds()) is None  # expired
        key, prefix, _ = store.transact(conn, console_keys.mint_console_key, "acme", "demo", clock.seconds(), 300.0)
        clock.advance(299)
        info = store.transact(conn, store.lookup_key, key, clock.seconds())
        assert info.kind == "console" and info.prefix == prefix
        assert store.transact(conn, store.lookup_key, key, clock.seconds()) is None  # used
        assert store.transact(conn, store.lookup_key, ready.key, clock.seconds()).kind == "api"
        (count,) = conn.execute("SELECT COUNT(*) FROM api_keys WHERE kind = 'console'").fetchone()
        assert count == 1  # minting deleted the key that expired unused
    finally:
        conn.close()


def test_a_key_minted_longer_ago_than_its_lifetime_is_refused(browser, ready):
    browser.console.wall = lambda: time.time() - ready.config.console_key_ttl - 1  # lookup_key's time is the wall's
    browser.login()
    minted = browser.json("POST", "/console/api/test-key", {"agent": "demo", "account": "acme"})
    refusal = _result(ready.service.admit("/voice/" + minted["key"], "tcp4:127.0.0.1:5000", {}, {}))
    assert isinstance(refusal, Refusal) and refusal.status == 401


def test_minting_names_what_is_wrong(browser):
    browser.login()
    assert browser.json("POST", "/console/api/test-key", {"agent": "nobody", "account": "acme"}, 404)["error"]
    assert browser.json("POST", "/console/api/test-key", {"agent": "demo", "account": "ghost"}, 404)["error"]
    assert browser.json("POST", "/console/api/test-key", {"agent": "demo"}, 400)["error"]


def test_agents_lists_the_agents_and_the_accounts_points(browser):
    browser.login()
    data = browser.json("GET", "/console/api/agents")
    assert data["agents"] == [{"name": "demo"}, {"name": "other"}]
    assert data["accounts"] == [{"name": "acme", "points": 100, "available": 100}]


# ---- history -----------------------------------------------------------------------


def test_hostile_call_text_is_escaped_in_json_and_keys_are_cut_to_prefixes(browser, ready):
    settle(ready, "c1", transcript=[{"role": "caller", "text": HOSTILE + " " + ready.key, "t": 1.0}],
           metadata={"custom": {"note": HOSTILE, "leak": ready.key}})
    browser.login()
    code, headers, body = browser.get("/console/api/calls/c1")
    assert code == 200 and headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    assert b"<" not in body and b">" not in body and b"&" not in body and "\u2028".encode() not in body
    assert ready.key.encode() not in body
    call = json.loads(body)
    assert call["transcript"][0]["text"] == HOSTILE + " " + ready.prefix + "\u2026"
    assert call["metadata"]["custom"]["note"] == HOSTILE
    assert call["key_prefix"] == ready.prefix and call["has_recording"] is False
    code, headers, svg = browser.get("/console/api/calls/c1/timeline.svg")
    assert code == 200 and headers.getRawHeaders("content-type") == ["image/svg+xml; charset=utf-8"]
    assert b"<script" not in svg and b"onerror=alert(2)>" not in svg


def test_the_calls_list_filters(browser, ready):
    settle(ready, "a1", started_at=T0 + 100, end_reason="hangup")
    settle(ready, "a2", started_at=T0 + 200, end_reason="max_duration", agent="other")
    settle(ready, "a3", started_at=T0 + 300, end_reason="hangup")
    browser.login()

    def ids(query: str) -> list[str]:
        return [c["call_id"] for c in browser.json("GET", "/console/api/calls" + query)["calls"]]

    assert ids("") == ["a3", "a2", "a1"]
    assert ids("?agent=other") == ["a2"]
    assert ids("?end_reason=hangup&limit=1") == ["a3"]
    assert ids(f"?since={T0 + 150}&until={T0 + 300}") == ["a2"]
    assert ids("?account=nobody") == []
    assert ids("?since=2023-11-14T22:15:00Z") == ["a3", "a2", "a1"]
    summary = browser.json("GET", "/console/api/calls")["calls"][0]
    assert "transcript" not in summary and summary["duration"] == 30.0
    for bad in ("?limit=0", "?limit=501", "?limit=x", "?since=soon"):
        assert browser.get("/console/api/calls" + bad)[0] == 400, bad
    assert browser.get("/console/api/calls/nope")[0] == 404
    assert browser.get("/console/api/calls/..%2f..%2fetc")[0] == 404


def test_a_recording_is_served_only_from_recordings_dir_and_only_the_calls_own(browser, ready):
    day = os.path.join(ready.config.recordings_dir, "2026-12-01")
    os.makedirs(day)
    with open(os.path.join(day, "r1.wav"), "wb") as f:
        f.write(b"RIFF....WAVEfmt ")
    secret = os.path.join(ready.config.state_dir, "secret.wav")
    with open(secret, "wb") as f:
        f.write(b"not yours")
    settle(ready, "r1", metadata={"recording": os.path.relpath(os.path.join(day, "r1.wav"), ready.config.state_dir)})
    settle(ready, "r2", metadata={"recording": "secret.wav"})
    settle(ready, "r3", metadata={"recording": "recordings/2026-12-01/../../upvoot.ini"})
    browser.login()
    code, headers, body = browser.get("/console/api/calls/r1/recording")
    assert code == 200 and body == b"RIFF....WAVEfmt " and headers.getRawHeaders("content-type") == ["audio/wav"]
    assert browser.json("GET", "/console/api/calls/r1")["has_recording"] is True
    code, headers, body = browser.get("/console/api/calls/r1/recording", headers={"Range": "bytes=4-7"})
    assert code == 206 and body == b"...." and headers.getRawHeaders("content-range") == ["bytes 4-7/16"]
    assert browser.get("/console/api/calls/r1/recording", headers={"Range": "bytes=-4"})[2] == b"fmt "
    assert browser.get("/console/api/calls/r1/recording", headers={"Range": "bytes=99-"})[0] == 416
    for call_id in ("r2", "r3", "nope"):
        assert browser.get(f"/console/api/calls/{call_id}/recording")[0] == 404, call_id


# ---- headers, static files ---------------------------------------------------------


def test_every_console_response_carries_the_csp_and_nosniff_and_the_api_no_store(browser):
    expected = csp("ws://127.0.0.1:8080")
    assert "connect-src 'self' ws://127.0.0.1:8080;" in expected and "'unsafe-inline'" not in expected
    responses = [browser.get(p) for p in ("/console", "/console/", "/console/static/app.js", "/console/nothing",
                                          "/console/api/agents", "/console/api/nothing")]
    browser.login()
    responses += [browser.get("/console/api/session"), browser.post("/console/api/session")]
    for code, headers, _ in responses:
        assert headers.getRawHeaders("content-security-policy") == [expected], code
        assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    for code, headers, _ in responses[4:]:
        assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert browser.get("/healthz")[1].getRawHeaders("content-security-policy") is None  # unchanged


def test_a_hostile_host_header_never_reaches_the_csp(browser):
    code, headers, _ = browser.get("/console/", headers={"Host": "x'; script-src *"})
    assert headers.getRawHeaders("content-security-policy") == [csp("ws://127.0.0.1:8080")]


def test_static_files_come_from_the_package_folder_only(ready):
    browser = Browser(ready, files=static_files())
    assert "index.html" in browser.console.files and "timeline.py" not in browser.console.files
    code, headers, body = browser.get("/console/")
    assert code == 200 and headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    code, headers, _ = browser.get("/console/static/app.js")
    assert code == 200 and headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert browser.get("/console")[0] == 301
    for path in ("/console/static/", "/console/static", "/console/static/..%2fauth.py", "/console/static/../auth.py",
                 "/console/static/%2e%2e/__init__.py", "/console/timeline.py", "/console/static/app.js/x",
                 "/console/static/.hidden", "/console/index.html/"):
        code, _, body = browser.get(path)
        assert code == 404, path
        assert b"import" not in body


# ---- live calls ----------------------------------------------------------------------


def test_the_live_stream_sends_calls_and_heartbeats_and_stops_when_the_browser_leaves(browser, ready):
    browser.login()
    session_cookie, _ = browser.console.sessions.create()
    site = Site(admin_resource(ready.service, lambda: True, ConsoleResource(browser.console)), timeout=None)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /console/api/live HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"
                         b"Cookie: upvoot_console=" + session_cookie.encode() + b"\r\n\r\n")
    head = transport.value()
    assert b"200 OK" in head and b"text/event-stream" in head and b"Content-Security-Policy" in head
    assert head.count(b"event: calls\ndata: []\n\n") == 1
    handle = ready.start()
    ready.clock.advance(0.5)  # a change is sent at the next look
    events = transport.value().split(b"event: calls\ndata: ")
    assert json.loads(events[-1].split(b"\n", 1)[0])[0]["call_id"] == handle.call_id
    n = len(events)
    ready.clock.advance(2.0)  # nothing changed: the heartbeat sends it again
    assert len(transport.value().split(b"event: calls\ndata: ")) == n + 1
    assert len(browser.console.live.streams) == 1 and ready.clock.getDelayedCalls()
    channel.connectionLost(failure.Failure(ConnectionDone()))
    assert browser.console.live.streams == set()
    assert [c for c in ready.clock.getDelayedCalls() if c.active()] == []  # no LoopingCall left behind


def test_live_streams_are_bounded_and_closed_with_the_console(browser, ready):
    browser.console.live.limit = 1
    browser.login()
    site = Site(admin_resource(ready.service, lambda: True, ConsoleResource(browser.console)), timeout=None)
    session_cookie, _ = browser.console.sessions.create()
    transports = []
    for _ in range(2):
        channel = site.buildProtocol(None)
        transports.append(StringTransport())
        channel.makeConnection(transports[-1])
        channel.dataReceived(b"GET /console/api/live HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"
                             b"Cookie: upvoot_console=" + session_cookie.encode() + b"\r\n\r\n")
    assert b"429" in transports[1].value().split(b"\r\n", 1)[0]
    browser.console.close()
    assert browser.console.live.streams == set() and not ready.clock.getDelayedCalls()
    assert transports[0].value().endswith(b"0\r\n\r\n")  # the chunked body ended


# ---- the token, the listener, the URL ----------------------------------------------


def _config(tmp_path, main: str = ""):
    path = tmp_path / "upvoot.ini"
    path.write_text(f"[upvoot]\n{main}\n[agent:demo]\n")
    return load_config(str(path))


def test_the_token_file_is_made_once_with_mode_0600(tmp_path):
    config = _config(tmp_path)
    path = auth.token_path(config)
    assert path == str(tmp_path / "admin_token")
    token = auth.load_token(path, "opt")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(token) >= 43
    assert auth.load_token(path, "opt") == token
    with open(path, "w") as f:
        f.write("short\n")
    with pytest.raises(auth.ConsoleSetupError, match=r"^opt: .*admin_token must hold one token"):
        auth.load_token(path, "opt")


def test_no_console_on_a_public_admin_listener_without_an_explicit_token_file(tmp_path):
    config = _config(tmp_path, "admin_listen = tcp:8081:interface=0.0.0.0")
    with pytest.raises(auth.ConsoleSetupError, match=r"upvoot.ini: \[upvoot\] admin_token_file: .*0\.0\.0\.0"):
        auth.check_console(config)
    with pytest.raises(usage.UsageError, match=r"\[upvoot\] admin_token_file"):
        Options().parseOptions(["--config", config.path])
    auth.check_console(_config(tmp_path, "admin_listen = tcp:8081\nadmin_token_file = /etc/upvoot/token"))
    auth.check_console(_config(tmp_path, "admin_listen = tcp:8081\nconsole = no"))
    auth.check_console(_config(tmp_path, "admin_listen = tcp:8081:interface=\\:\\:1"))
    assert not address.loopback_only("haproxy:tcp:8081:interface=127.0.0.1")
    assert address.loopback_only("unix:/run/upvoot/admin.sock")


def test_the_voice_url_is_the_public_listener_named_as_the_browser_named_the_console():
    assert address.voice_origin(PUBLIC, "localhost", False) == "ws://localhost:8080"
    assert address.voice_origin(["tcp:8080"], "voice.example", False) == "ws://voice.example:8080"
    assert address.voice_origin(["tcp:8080:interface=10.1.2.3"], "localhost", False) == "ws://10.1.2.3:8080"
    tls = ["tcp:8080:interface=127.0.0.1", "ssl:8443:privateKey=k.pem:certKey=c.pem"]
    assert address.voice_origin(tls, "h.example", True) == "wss://h.example:8443"
    assert address.voice_origin(tls, "h.example", False) == "ws://h.example:8080"
    assert address.voice_origin(["tcp6:8080:interface=\\:\\:1"], None, False) == "ws://127.0.0.1:8080"
    assert address.voice_origin(["systemd:domain=INET:index=0"], "h", False) is None
    assert address.browser_host("[::1]:8081") == "[::1]" and address.browser_host("a b") is None


def test_console_url_prints_the_admin_url_with_the_token_in_the_fragment(tmp_path, capsys):
    config = _config(tmp_path, "admin_listen = tcp:9091:interface=127.0.0.1")
    assert cli.run(["console-url", "-c", config.path]) == 0
    token = open(tmp_path / "admin_token").read().strip()
    assert capsys.readouterr().out == f"http://127.0.0.1:9091/console/#token={token}\n"
    off = _config(tmp_path, "console = no")
    assert cli.run(["--config", off.path, "console-url"]) == 2
    assert "[upvoot] console" in capsys.readouterr().err
