"""Fixtures and helpers of the attack suite.

``daemon`` (module scope): a real ``twistd upvoot`` on 127.0.0.1 with espeak
for speech (no piper model to load), no failed-key limit (the suite sends
hundreds of bad keys from one address), and ``start_timeout`` at
``START_TIMEOUT`` when the config knows the option. A test module tunes it
with ``DAEMON_OPTIONS`` ([upvoot] overrides) and ``EXTRA_INI`` (more sections).

Helpers: ``assert_still_serves`` (a legitimate raw-protocol call, over the
``websockets`` library, gets its greeting), ``assert_no_key_logged`` (no log
line holds any key the suite created or sent), ``exchange`` (one raw HTTP
request over TCP, the answer and how the connection ended), ``RawWS`` (a
WebSocket client that writes whatever frames it is told to, masked or not).
Every read and loop is bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import time
import urllib.request
from dataclasses import dataclass, field

import pytest
from websockets.sync.client import connect

from tests.daemon import Caller, Daemon, free_port, shipped_ini

#: [websocket] start_timeout in every hostile daemon (when the option exists)
START_TIMEOUT = 2.0
#: how late a bounded close may come after its deadline (2 shared cores)
SLACK = 2.0

HOSTILE_AGENT = """
[agent:hostile]
greeting = Hello, this is the hostile test line.
silence_timeout = 60s
silence_prompt =
wrap_up_before = 0
tts = espeak
"""


def _start_timeout_options(directory, seconds: float) -> tuple[dict, str]:
    """How to set start_timeout with the config as it is now: a [websocket]
    section, an [upvoot] option, or not at all (the option does not exist yet:
    the slot-holder tests then fail on the missing close, as they should)."""
    from upvoot.config import ConfigError, load_config

    probe = directory / "probe.ini"
    for main, extra in (({}, f"\n[websocket]\nstart_timeout = {seconds:g}s\n"),
                        ({"start_timeout": f"{seconds:g}s"}, "")):
        probe.write_text("[upvoot]\n" + "".join(f"{k} = {v}\n" for k, v in main.items())
                         + "[agent:probe]\nstt = whisper\n" + extra)
        try:
            config = load_config(str(probe))
        except ConfigError:
            continue
        if getattr(config.websocket, "start_timeout", None) == seconds:
            return main, extra
    return {}, ""


def hostile_ini(directory, options: dict, extra: str = "") -> tuple[str, int, bool]:
    """The shipped ini with espeak, the hostile agent and ``options``;
    returns (text, admin port, whether start_timeout could be set)."""
    admin_port = free_port()
    main = {"auth_failure_limit": "0", "drain_time": "0", "admin_listen": f"tcp:{admin_port}:interface=127.0.0.1"}
    ws_main, ws_extra = _start_timeout_options(directory, START_TIMEOUT)
    main.update(ws_main)
    main.update(options)
    text = re.sub(r"(?m)^tts = piper$", "tts = espeak", shipped_ini(**main))
    return text + HOSTILE_AGENT + extra + ws_extra, admin_port, bool(ws_main or ws_extra)


class Target(Daemon):
    """The daemon under attack; remembers every key used against it."""

    def __init__(self, directory, ini_text: str, admin_port: int, start_timeout_configured: bool, **kw) -> None:
        super().__init__(directory, ini_text, **kw)
        self.admin_port = admin_port
        self.secrets: set[str] = set()
        self.legit = ""  # the legitimate caller's key
        self.attacker = ""  # a valid key the attacks use (its account has points to spare)
        self.start_timeout_configured = start_timeout_configured
        self.log_mark = 0  # where the current test's log lines begin

    def test_log(self) -> str:
        """The log lines written since the current test started."""
        return self.log_text()[self.log_mark:]

    def key(self, agent: str = "hostile", account: str = "acme", points: int = 1000) -> str:
        key = super().key(agent=agent, account=account, points=points)
        self.secrets.add(key)
        return key

    def fake_key(self) -> str:
        """A well-formed key the daemon does not know (still a secret: never logged)."""
        key = "uvk_" + secrets.token_urlsafe(24)
        self.secrets.add(key)
        return key

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))

    def healthz(self) -> float:
        """Seconds /healthz took to answer 200."""
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=10) as r:
            assert r.status == 200
            r.read()
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def daemon(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    text, admin_port, configured = hostile_ini(directory, dict(getattr(request.module, "DAEMON_OPTIONS", {})),
                                               getattr(request.module, "EXTRA_INI", ""))
    d = Target(directory / "d", text, admin_port, configured)
    d.start()
    try:
        d.legit = d.key(account="legit", points=1_000_000)
        d.attacker = d.key(account="attacker", points=1_000_000)
        yield d
    finally:
        d.stop()


@pytest.fixture(autouse=True)
def _log_mark(request):
    """Each test checks the log lines written since it started, so one leak
    fails its own test, not every later test of the module."""
    if "daemon" in request.fixturenames:
        d = request.getfixturevalue("daemon")
        d.log_mark = len(d.log_text())
    yield


# ---- the checks every case makes -----------------------------------------------------


def assert_still_serves(daemon: Target, timeout: float = 5.0) -> float:
    """A legitimate raw-protocol call (the websockets library, not ours) is
    upgraded and gets its greeting; returns the seconds that took."""
    t0 = time.monotonic()
    with connect(daemon.url(f"/voice/{daemon.legit}"), open_timeout=timeout, close_timeout=2, max_size=None) as ws:
        first = ws.recv(timeout=timeout)
        assert json.loads(first) == {"type": "audio_start"}, first
    return time.monotonic() - t0


def assert_no_key_logged(daemon: Target) -> None:
    """No line the daemon logged during this test holds a key (the full key,
    or its secret part after the 12-character prefix)."""
    leaks = []
    for n, line in enumerate(daemon.test_log().splitlines(), 1):
        for key in daemon.secrets:
            if key in line or key[12:] in line:
                leaks.append(f"line +{n}: " + line.replace(key, "<KEY>").replace(key[12:], "<SECRET>")[:300])
    assert not leaks, f"{len(leaks)} log lines hold a key:\n" + "\n".join(leaks[:10])


@contextlib.contextmanager
def held_call(daemon: Target, timeout: float = 10.0):
    """A legitimate call opened before an attack, still open after it."""
    c = Caller(daemon.url(f"/voice/{daemon.legit}"))
    try:
        c.wait_json("audio_start", timeout=timeout)
        yield c
        assert not c.closed, f"the legitimate call was dropped: {c.summary()[-5:]}"
    finally:
        c.close()


# ---- raw HTTP over TCP --------------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: no HTTP status line came back
    head: bytes
    headers: dict[str, str]
    body: bytes
    ended: str  # "eof" | "reset" | "open" (101 seen, or nothing within the bound)
    elapsed: float  # seconds from sending to the answer's end (or the bound)

    @property
    def answered(self) -> bool:
        """An HTTP status came back or the server closed: never left hanging."""
        return self.status is not None or self.ended in ("eof", "reset")


def request_bytes(target: bytes | str, *, method: bytes = b"GET", version: bytes = b"HTTP/1.1",
                  headers: list[tuple[bytes, bytes]] | None = None, omit: tuple[bytes, ...] = (),
                  extra: list[tuple[bytes, bytes]] = (), line: bytes | None = None) -> bytes:
    """A WebSocket opening handshake, with the parts an attack changes."""
    if isinstance(target, str):
        target = target.encode()
    if headers is None:
        headers = [(b"Host", b"127.0.0.1"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                   (b"Sec-WebSocket-Key", base64.b64encode(os.urandom(16))), (b"Sec-WebSocket-Version", b"13")]
    omit_l = {o.lower() for o in omit}
    head = line if line is not None else b" ".join(p for p in (method, target, version) if p)
    out = [head] + [n + b": " + v for n, v in list(headers) + list(extra) if n.lower() not in omit_l]
    return b"\r\n".join(out) + b"\r\n\r\n"


def _parse_head(head: bytes) -> tuple[int | None, dict[str, str]]:
    lines = head.split(b"\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})(?: |$)", lines[0])
    headers = {}
    for raw in lines[1:]:
        name, _, value = raw.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return (int(m.group(1)) if m else None), headers


def exchange(daemon: Target, data: bytes, timeout: float = 5.0) -> Reply:
    """Send ``data`` on a fresh connection; read the answer until the server
    closes, a 101 head is complete, or ``timeout``."""
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)
    t0 = time.monotonic()
    buf, ended = b"", "open"
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            ended = "reset"
        deadline = t0 + timeout
        while ended == "open":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                ended = "reset"
                break
            if not chunk:
                ended = "eof"
                break
            buf += chunk
            if b"\r\n\r\n" in buf and buf.startswith(b"HTTP/1.1 101"):
                break  # upgraded: a call is open; we hang up
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    status, headers = _parse_head(head) if head else (None, {})
    return Reply(status, head, headers, body, ended, time.monotonic() - t0)


# ---- a WebSocket client that writes any frame -----------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None) -> bytes:
    """One WebSocket frame as a client writes it (``length`` may lie)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 65536:
        head = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


@dataclass
class Ending:
    code: int | None  # the close code the server sent; None: no close frame (the client's 1006)
    how: str  # "close" (a close frame came) | "eof" | "reset" | "timeout"
    after: float  # seconds from the start of the wait
    texts: list = field(default_factory=list)  # JSON text messages received while waiting


class RawWS:
    """A client that completes a real upgrade on a raw socket, then writes
    frames of its choosing and reads the server's frames."""

    def __init__(self, daemon: Target, path: str, *, rcvbuf: int | None = None, timeout: float = 5.0,
                 extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", daemon.port))
        self.sock.sendall(request_bytes(path, extra=list(extra_headers)))
        self.buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise AssertionError("no upgrade answer within the bound")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"server closed during the upgrade: {self.buf[:200]!r}")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, _ = _parse_head(head)
        assert status == 101, f"upgrade refused: {head[:200]!r}"
        self.texts: list = []
        self.pongs: list[bytes] = []

    def send(self, data: bytes) -> bool:
        """Write raw bytes; False if the server already hung up."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send_frame(self, opcode: int, payload: bytes = b"", **kw) -> bool:
        return self.send(frame(opcode, payload, **kw))

    def send_json(self, obj) -> bool:
        return self.send_frame(0x1, json.dumps(obj).encode())

    def _read_frame(self, deadline: float):
        """(opcode, payload), or a string: "eof" | "reset" | "timeout"."""
        def need(n: int):
            while len(self.buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    return "timeout"
                except ConnectionResetError:
                    return "reset"
                if not chunk:
                    return "eof"
                self.buf += chunk
            return None

        if (end := need(2)) is not None:
            return end
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            if (end := need(4)) is not None:
                return end
            n, off = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            if (end := need(10)) is not None:
                return end
            n, off = int.from_bytes(self.buf[2:10], "big"), 10
        if (end := need(off + n)) is not None:
            return end
        payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
        return b0 & 0x0F, payload

    def wait_json(self, type_: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = self._read_frame(deadline)
            if isinstance(got, str):
                raise AssertionError(f"no {type_!r} message: connection {got}; texts {self.texts[-5:]}")
            opcode, payload = got
            if opcode == 0xA:
                self.pongs.append(payload)
            if opcode == 0x8:
                raise AssertionError(f"closed ({close_code(payload)}) while waiting for {type_!r}")
            if opcode == 0x1:
                msg = json.loads(payload)
                self.texts.append(msg)
                if msg.get("type") == type_ or msg.get("event") == type_:
                    return msg

    def until_close(self, timeout: float = 5.0) -> Ending:
        """Read until the server's close frame (answered, as a client must),
        the end of the connection, or ``timeout``."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            got = self._read_frame(deadline)
            if isinstance(got, str):
                return Ending(None, got, time.monotonic() - t0, self.texts)
            opcode, payload = got
            if opcode == 0x8:
                code = close_code(payload)
                self.send(frame(0x8, payload[:2]))
                return Ending(code, "close", time.monotonic() - t0, self.texts)
            if opcode == 0xA:
                self.pongs.append(payload)
            if opcode == 0x1:
                with contextlib.suppress(ValueError):
                    self.texts.append(json.loads(payload))

    def close(self) -> None:
        self.sock.close()


def close_code(payload: bytes) -> int | None:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
