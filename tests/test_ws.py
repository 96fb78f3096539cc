"""upvoot.daemon.ws, the socket, without sockets.

Denied handshakes: raw HTTP upgrade bytes written into a ``VoiceProtocol``
over an ``iosim.FakeTransport`` (a denied handshake never fires the client
agent's Deferred, so we read the HTTP status line back instead). Accepted
connections: ``autobahn.twisted.testing.create_memory_agent`` with a pumper
we flush by hand, so nothing runs on the global reactor.

The service is a fake that provides ``IVoiceService`` (checked with
``verifyObject``): ``admit`` is the real ``AdmissionPolicy`` over a real key
database run inline; ``start_call`` either runs a real call
(``upvoot.call.new_call``) or hands out a ``RecordingHandle``, so the
adapter's dispatch is seen without a call behind it.

Three clocks, advanced together: the call's clock (the service's ``clock``
and ``Pacer``), Autobahn's timers on txaio's loop (``replace_loop``), and the
memory reactor the client agent connects through. Only the call's clock must
be empty when a call is over.
"""

from __future__ import annotations

import json
import re
import uuid
from types import SimpleNamespace

import pytest
import txaio.testutil
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from upvoot.audio import FRAME_BYTES
from upvoot.call import new_call, state_of
from upvoot.call.handle import ICallHandle
from upvoot.call.playout import Pacer
from upvoot.config import load_config
from upvoot.daemon import ws as wsmod
from upvoot.daemon import bounds
from upvoot.daemon.admission import AbuseGuard, AdmissionPolicy
from upvoot.daemon.metrics import Metrics
from upvoot.daemon.seams import IVoiceService
from upvoot.daemon.redact import redact
from upvoot.daemon.ws import VoiceFactory, VoiceProtocol
from upvoot.ledger import store
from upvoot.testing import WORD_SECONDS, agent_config, make_agent, quiet

NOW = 1_700_000_000.0
STEP = 0.02
GREETING = "Hello there caller"  # upvoot.testing.agent_config's lines
GOODBYE = "Goodbye from us"

INI = """\
[upvoot]
playout_lead = 100ms
max_message_size = 65536
max_frame_size = 32768
open_handshake_timeout = 7s
close_timeout = 3s
auto_ping_interval = 0
max_connections = 5
max_calls_per_account = 1
start_timeout = 4s
max_handshake_size = 2048

[agent:demo]
"""


# ------------------------------------------------------------------ doubles


class InlineStore:
    """``Store.authenticate`` over a real database, run inline (no thread)."""

    def __init__(self, path: str) -> None:
        self.conn = store.connect(path)
        self.hold = False
        self.pending: list[tuple[defer.Deferred, str]] = []

    def key(self, account: str, agent: str = "demo", points: int = 10, revoked: bool = False) -> str:
        key, prefix = store.transact(self.conn, store.create_key, account, agent, NOW)
        if points:
            store.transact(self.conn, store.add_points, account, points)
        if revoked:
            store.transact(self.conn, store.revoke_key, prefix, NOW)
        return key

    def lookup(self, key: str):
        return store.transact(self.conn, store.lookup_key, key)

    def authenticate(self, key: str) -> defer.Deferred:
        if self.hold:  # a slow database: the test fires it
            d = defer.Deferred()
            self.pending.append((d, key))
            return d
        return defer.succeed(self.lookup(key))

    def active_calls(self, account: str) -> int:
        """The account's calls the ledger holds open (its limit is counted there)."""
        (n,) = self.conn.execute("SELECT COUNT(*) FROM calls WHERE account = ? AND state = 'active'",
                                 (account,)).fetchone()
        return n

    def run(self, fn, *args, **kw) -> defer.Deferred:
        """Any other transaction (the admission's reservation), inline."""
        return defer.maybeDeferred(store.transact, self.conn, fn, *args, **kw)


@implementer(ICallHandle)
class RecordingHandle:
    """An ``ICallHandle`` that records what the adapter does to it."""

    def __init__(self) -> None:
        self.call_id = uuid.uuid4().hex
        self.inputs: list[tuple] = []

    def start(self) -> None:
        self.inputs.append(("start",))

    def caller_audio(self, pcm: bytes) -> None:
        self.inputs.append(("audio", len(pcm)))

    def caller_dtmf(self, digit: str) -> None:
        self.inputs.append(("dtmf", digit))

    def playout_acknowledged(self, name: str, cleared: bool) -> None:
        self.inputs.append(("mark", name, cleared))

    def end_requested(self) -> None:
        self.inputs.append(("end_requested",))

    def shutdown(self) -> None:
        self.inputs.append(("shutdown",))

    def out_of_points(self) -> None:
        self.inputs.append(("out_of_points",))

    def hangup(self) -> None:
        self.inputs.append(("hangup",))


@implementer(IVoiceService)
class FakeService:
    """``IVoiceService`` for the adapter: the real admission policy; calls
    are real (``real_calls``) or ``RecordingHandle``s, at once or when the
    test fires ``self.starting``."""

    stall_timeout = VoiceFactory.stall_timeout

    def __init__(self, config, clock: Clock, db_path: str) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.pacer = Pacer(clock)
        self.store = InlineStore(db_path)
        self.guard = AbuseGuard(clock, config.auth_failure_limit, config.auth_failure_window,
                                config.max_calls_per_account)
        self.ready, self.draining = True, False
        self.agents = SimpleNamespace(agents={"demo": make_agent(agent_config(name="demo"))})
        self.lag = SimpleNamespace(average=0.0)
        self.pool = SimpleNamespace(saturated=lambda: False)
        self.policy = AdmissionPolicy(config, self, self.store, self.guard, self.pool, self.lag, self.metrics)
        self.policy.retry_after = 7
        self.real_calls = True
        self.hold_start = False
        self.starting: list[tuple[defer.Deferred, object]] = []  # (Deferred, admission) when hold_start
        self.handles: list[RecordingHandle] = []
        self.calls: set = set()
        self.opened: list = []
        self.ended: list[dict] = []
        self.disconnects: list = []

    # IVoiceService
    def admit(self, path, peer, headers, params):
        return self.policy.admit(path, peer, headers, params)

    def note_refusal(self, status: int) -> None:
        self.policy.note_refusal(status)

    def live_calls(self) -> list:
        return []  # the console's view; the socket never asks

    def start_call(self, admission, started, line, disconnect):
        self.disconnects.append(disconnect)
        if self.hold_start:
            d = defer.Deferred()
            self.starting.append((d, admission))
            return d
        return defer.succeed(self.begin(admission, started, line))

    def begin(self, admission, started, line):
        """What ``start_call`` does once the agent is known."""
        release = admission.take_over()
        if not self.real_calls:
            handle = RecordingHandle()
            self.handles.append(handle)
            handle.start()
            return handle
        def ended(outcome) -> None:
            self.calls.discard(box[0])
            release()
            self.ended.append({"end_reason": outcome.end_reason, "transcript": list(outcome.transcript),
                               "key_prefix": admission.key_prefix, "account": admission.account,
                               "provider": started.provider})

        box: list = []
        handle = new_call(self.agents.agents[admission.agent], line, self.clock, self.pacer, ended,
                          call_id=uuid.uuid4().hex, lead=self.config.playout_lead, log_transcripts=False, recorder=None)
        box.append(handle)
        self.calls.add(handle)
        self.opened.append(handle)
        handle.start()
        return handle

    # what the tests read
    @property
    def refusals(self) -> dict[int, int]:
        return self.policy.refusals

    @property
    def calls_reserved(self) -> int:
        """Slots held by connections that are not (yet) calls."""
        return self.policy.held - len(self.calls) - len(self.handles)


class Pumper:
    """An ``IPumper`` for create_memory_agent that pumps only when told."""

    def __init__(self) -> None:
        self.pumps: list = []

    def add(self, pump) -> None:
        self.pumps.append(pump)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


class Client(WebSocketClientProtocol):
    """The provider's side: records every message in order."""

    def onOpen(self) -> None:
        self.received: list = []
        self.closed: tuple | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(("audio", len(payload)) if isBinary else ("json", json.loads(payload)))

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        self.closed = (wasClean, code)
        self.close_reason = reason

    # ------------------------------------------------------------ reading
    def kinds(self, since: int = 0) -> list[str]:
        """Message kinds in order, runs of audio frames collapsed to one."""
        out: list[str] = []
        for kind, payload in self.received[since:]:
            name = "audio" if kind == "audio" else payload["type"]
            if not (name == "audio" and out and out[-1] == "audio"):
                out.append(name)
        return out

    def messages(self, type_: str) -> list[dict]:
        return [p for k, p in self.received if k == "json" and p["type"] == type_]

    def audio_bytes(self) -> int:
        return sum(n for k, n in self.received if k == "audio")


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def captured():
    """Every log event published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def world(tmp_path):
    """A factory on a fake service; Autobahn's timers on a Clock of their own."""
    ini = tmp_path / "upvoot.ini"
    ini.write_text(INI)
    config = load_config(str(ini))
    call_clock = Clock()
    call_clock.advance(1000.0)
    autobahn_clock = Clock()
    with txaio.testutil.replace_loop(autobahn_clock):
        service = FakeService(config, call_clock, str(tmp_path / "upvoot.sqlite3"))
        factory = VoiceFactory(service)
        w = SimpleNamespace(service=service, factory=factory, clock=call_clock,
                            autobahn_clock=autobahn_clock, pumper=Pumper(), net=MemoryReactorClock())
        yield w
    service.store.conn.close()


def advance(w, seconds: float) -> None:
    """Let ``seconds`` of time pass on every clock, pumping bytes each 20 ms."""
    for _ in range(int(round(seconds / STEP))):
        w.clock.advance(STEP)
        w.autobahn_clock.advance(STEP)
        w.net.advance(STEP)
        w.pumper.flush()


def test_the_fake_service_provides_the_seam(world):
    assert verifyObject(IVoiceService, world.service)
    assert verifyObject(ICallHandle, RecordingHandle())


# ------------------------------------------------------------- handshakes


def upgrade_request(path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: localhost:8080\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{extra}"
        "\r\n"
    ).encode("ascii")


def connect_raw(w) -> tuple[object, iosim.FakeTransport]:
    proto = w.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = iosim.FakeTransport(proto, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return proto, transport


def raw_request(w, data: bytes, lose: bool = True) -> tuple[object, iosim.FakeTransport, bytes]:
    """Write request bytes into a fresh VoiceProtocol; what it answered."""
    proto, transport = connect_raw(w)
    proto.dataReceived(data)
    out = transport.getOutBuffer()
    if lose:
        proto.connectionLost(Failure(ConnectionDone()))
    return proto, transport, out


def raw_upgrade(w, path: str, lose: bool = True) -> tuple[object, iosim.FakeTransport, bytes]:
    return raw_request(w, upgrade_request(path), lose)


def status_and_headers(response: bytes) -> tuple[str, dict[str, str]]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("ascii")
    status, *lines = head.split("\r\n")
    return status, {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


def assert_not_logged(events: list[dict], secret: str) -> None:
    for event in events:
        text = (formatEvent(event) or "") + repr(event)
        assert secret not in text, f"the key leaked into a log event: {event.get('log_format')!r}"


@pytest.mark.parametrize("path", ["/", "/elsewhere", "/voice", "/voices/uvk_abc", "/Voice/uvk_abc"])
def test_other_paths_get_404(world, path):
    _, _, out = raw_upgrade(world, path)
    status, _ = status_and_headers(out)
    assert status == "HTTP/1.1 404 Not Found"
    assert world.service.refusals == {404: 1}
    assert world.service.opened == []


def test_unknown_revoked_and_malformed_keys_get_401_and_never_reach_the_log(world, captured):
    db = world.service.store
    revoked = db.key("gone", revoked=True)
    unknown = "uvk_" + "A" * 32
    assert db.lookup(revoked).revoked and db.lookup(unknown) is None
    bad = [unknown, revoked, "not-a-key", "uvk_short", "", revoked + "/extra", revoked[:-1] + "!"]
    for key in bad:
        _, _, out = raw_upgrade(world, f"/voice/{key}")
        status, headers = status_and_headers(out)
        assert status == "HTTP/1.1 401 Unauthorized", key
        assert "retry-after" not in headers
    assert world.service.refusals == {401: len(bad)}
    assert world.service.opened == [] and world.service.calls_reserved == 0
    assert any(e.get("event") == "auth.denied" for e in captured), "denials are logged under a stable name"
    for key in (unknown, revoked, "uvk_short"):
        assert_not_logged(captured, key)


def test_zero_points_get_402_and_the_log_names_only_the_prefix(world, captured):
    db = world.service.store
    broke = db.key("broke", points=0)
    _, _, out = raw_upgrade(world, f"/voice/{broke}")
    assert status_and_headers(out)[0] == "HTTP/1.1 402 Payment Required"
    assert world.service.refusals == {402: 1}
    assert_not_logged(captured, broke)
    denied = [e for e in captured if e.get("event") == "auth.no_points"]
    assert denied and denied[0]["prefix"] == broke[:12]


def _starting(s):
    s.ready = False


def _draining(s):
    s.draining = True


def _full(s):
    s.policy.held = s.config.max_calls


def _lagging(s):
    s.lag.average = s.config.lag_budget + 0.2


@pytest.mark.parametrize("make_busy, why", [
    (_starting, "starting"), (_draining, "draining"), (_full, "max_calls (50) reached"),
    (_lagging, "reactor lag 350 ms over budget"),
])
def test_admission_refusal_gets_503_with_retry_after(world, captured, make_busy, why):
    key = world.service.store.key("acme")
    make_busy(world.service)
    held = world.service.policy.held
    _, _, out = raw_upgrade(world, f"/voice/{key}")
    status, headers = status_and_headers(out)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers["retry-after"] == "7"
    assert headers["content-length"] == "0"
    assert world.service.refusals == {503: 1}
    assert world.service.policy.held == held
    busy = [e for e in captured if e.get("event") == "handshake.busy"]
    assert busy and busy[0]["why"] == why
    assert_not_logged(captured, key)


def test_key_for_an_agent_no_longer_configured_gets_503(world, captured):
    key = world.service.store.key("acme", agent="retired")
    _, _, out = raw_upgrade(world, f"/voice/{key}")
    status, headers = status_and_headers(out)
    assert status == "HTTP/1.1 503 Service Unavailable" and headers["retry-after"] == "7"
    assert_not_logged(captured, key)


def test_a_store_failure_is_a_503_not_a_500(world, monkeypatch):
    # the failure is expected: log it to this test only, not to the checker in conftest
    events: list[dict] = []
    monkeypatch.setattr(AdmissionPolicy, "_log", Logger(namespace="upvoot.daemon.admission", observer=events.append))
    key = "uvk_" + "B" * 32
    monkeypatch.setattr(world.service.store, "authenticate",
                        lambda k: defer.fail(RuntimeError(f"disk on fire reading {k}")))
    _, _, out = raw_upgrade(world, f"/voice/{key}")
    assert status_and_headers(out)[0] == "HTTP/1.1 503 Service Unavailable"
    assert [e["event"] for e in events if e["log_level"] >= LogLevel.error] == ["auth.error"]
    assert world.service.refusals == {503: 1} and world.service.calls_reserved == 0
    assert_not_logged(events, key)


def test_hanging_up_during_the_key_lookup_opens_no_call(world):
    """The lookup is asynchronous; a client gone before it answers must not
    get a ghost call (nor leave a reservation behind)."""
    db = world.service.store
    key = db.key("acme")
    db.hold = True
    proto, transport, out = raw_upgrade(world, f"/voice/{key}", lose=True)
    assert not out  # nothing answered yet
    (d, asked), = db.pending
    d.callback(db.lookup(asked))
    advance(world, 1.0)  # past detect_timeout, when a raw call would start
    assert world.service.opened == [] and proto.handle is None
    assert world.service.calls_reserved == 0
    assert world.service.refusals == {408: 1}
    assert world.service.store.active_calls("acme") == 0
    assert world.clock.getDelayedCalls() == []


def test_factory_takes_every_websocket_limit_from_config(world):
    ws = world.service.config.websocket
    assert (world.factory.maxMessagePayloadSize, world.factory.maxFramePayloadSize) == (65536, 32768)
    assert world.factory.openHandshakeTimeout == ws.open_handshake_timeout == 7.0
    assert world.factory.closeHandshakeTimeout == 3.0
    assert world.factory.maxConnections == 5
    assert world.factory.trustXForwardedFor == 0
    # no banner, no status page, no open redirect; bad frames get their close code
    assert world.factory.server is None
    assert world.factory.webStatus is False and world.factory.failByDrop is False


# ------------------------------------------------------- the public port


@pytest.mark.parametrize("request_bytes", [
    b"GET /x?redirect=https%3A%2F%2Fevil.example%2F HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /x?redirect=https%3A%2F%2Fevil.example%2F&after=0 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /voice/uvk_whatever HTTP/1.1\r\nHost: localhost\r\n\r\n",
])
def test_a_request_that_is_no_upgrade_gets_404_without_redirect_or_banner(world, request_bytes):
    _, _, out = raw_request(world, request_bytes)
    status, headers = status_and_headers(out)
    assert status == "HTTP/1.1 404 Not Found"
    assert "location" not in headers and "server" not in headers
    assert b"autobahn" not in out.lower() and b"evil" not in out and b"<html" not in out.lower()


def test_autobahn_s_own_refusals_never_echo_the_request(world, captured):
    key = world.service.store.key("acme")
    _, _, out = raw_request(world, f"GET /voice/{key} extra HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers = status_and_headers(out)
    assert status == "HTTP/1.1 400 Bad Request" and "server" not in headers
    assert key.encode() not in out
    assert_not_logged(captured, key)


def fuzzed_request_lines(key: str) -> list[bytes]:
    """Odd request lines that all quote the key somewhere."""
    path = f"/voice/{key}"
    lines = [
        f"GET {path} extra HTTP/1.1", f"GET {path}", f"{path} HTTP/1.1", f"GET {path} HTTP/1.0",
        f"GET {path} HTTP/2", f"GET {path} FTP/1.1", f"POST {path} HTTP/1.1", f"GET  {path}  HTTP/1.1 x",
        f"GET {path}#frag HTTP/1.1", f"GET {path}?provider=twilio extra HTTP/1.1", f"GET http://h{path} x HTTP/1.1",
        f"GET /x HTTP/1.1 {path}", f"GET {path}\"{{}} HTTP/1.1 x", f"GET {path}%00 HTTP/1.1 z",
        f"GET {path} HTTP/1.1 " + "A" * 1500, f"GET {key} HTTP/1.1 extra", f"GET {path}/{key} HTTP/9.9",
    ]
    out = [f"{line}\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n\r\n".encode("latin-1") for line in lines]
    out.append(upgrade_request(path, extra="X-Pad: " + "A" * 9000 + "\r\n"))  # over the cap
    out.append(upgrade_request(path, extra=f"Host: {path}\r\n"))  # two Host headers
    out.append(upgrade_request(path, extra=f"Referer: {path}\r\nSec-WebSocket-Version: 99\r\n"))
    out.append(f"GET {path} HTTP/1.1\r\nHost: localhost:{key}\r\nUpgrade: websocket\r\n\r\n".encode())
    return out


def test_no_odd_request_line_puts_the_key_in_a_log_line(world, captured):
    """Autobahn quotes bad request lines (``Bad HTTP request status line
    "GET /voice/uvk_... extra HTTP/1.1"``, at warn level): every message of
    a fuzzed run is grepped for the key."""
    key = world.service.store.key("acme")
    txaio.set_global_log_level("debug")  # Autobahn's debug lines quote whole requests
    try:
        for data in fuzzed_request_lines(key):
            _, _, out = raw_request(world, data)
            assert re.match(rb"HTTP/1\.1 (4\d\d|505) ", out), (data[:60], out[:60])
    finally:
        txaio.set_global_log_level("info")
    assert len(captured) > 40  # Autobahn really spoke
    assert any("/voice/<redacted>" in formatEvent(e) for e in captured)
    assert_not_logged(captured, key)
    assert_not_logged(captured, key[12:])  # not even the part after the prefix


def test_redact_hides_paths_and_keys():
    assert redact('Bad HTTP request status line "GET /voice/uvk_abc/def x HTTP/1.1"') == \
        'Bad HTTP request status line "GET /voice/<redacted> x HTTP/1.1"'
    assert redact("/voice/k?provider=raw") == "/voice/<redacted>?provider=raw"
    assert redact("key uvk_AbCdEfGh123") == "key uvk_<redacted>"


def test_an_endless_header_is_cut_at_max_handshake_size_with_431(world, captured):
    cap = world.service.config.websocket.max_handshake_size
    proto, transport = connect_raw(world)
    proto.dataReceived(b"GET /voice/uvk_x HTTP/1.1\r\nHost: localhost\r\nX-Pad: ")
    sent = 0
    for _ in range(1000):  # 1 MB in 1 KB reads: what a slow endless client does
        proto.dataReceived(b"A" * 1024)
        sent += 1024
        assert len(proto.data) <= cap  # Autobahn's buffer (rescanned on each read) never grows past the cap
    out = transport.getOutBuffer()
    assert status_and_headers(out)[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert transport.disconnecting
    assert [e["limit"] for e in captured if e.get("event") == "handshake.too_large"] == [cap]
    proto.connectionLost(Failure(ConnectionDone()))


def test_a_handshake_just_under_the_cap_is_served(world):
    cap = world.service.config.websocket.max_handshake_size
    base = upgrade_request("/elsewhere", extra="X-Pad: \r\n")
    data = upgrade_request("/elsewhere", extra="X-Pad: " + "A" * (cap - len(base)) + "\r\n")
    assert len(data) == cap
    _, _, out = raw_request(world, data)
    assert status_and_headers(out)[0] == "HTTP/1.1 404 Not Found"  # decided by admission, not cut


# ------------------------------------------------------------------- calls


def dial(w, key: str, query: str = "") -> tuple[Client, object]:
    """Open a WebSocket through Autobahn's memory agent; (client, server protocol)."""
    servers: list = []

    def server_protocol():
        proto = w.factory.buildProtocol(None)
        servers.append(proto)
        return proto

    agent = create_memory_agent(w.net, w.pumper, server_protocol)
    d = agent.open(f"ws://localhost:8080/voice/{key}{query}", {}, protocol_class=Client)
    opened: list = []
    d.addCallback(opened.append)
    w.pumper.flush()
    assert opened, "the handshake completed"
    return opened[0], servers[0]


def wait_for_framing(w, client) -> None:
    """A raw client that says nothing gets its greeting after detect_timeout."""
    assert client.received == [] and w.service.opened == []
    for clock in (w.clock, w.autobahn_clock, w.net):
        clock.advance(w.service.config.detect_timeout)
    w.pumper.flush()


def send_json(client, obj) -> None:
    client.sendMessage(json.dumps(obj).encode(), isBinary=False)


def test_the_handshake_answer_has_no_server_header(world):
    key = world.service.store.key("acme")
    world.service.real_calls = False
    client, server = dial(world, key)
    assert b"server:" not in server.http_response_data.lower().encode()
    client.dropConnection(abort=True)
    advance(world, 0.1)


@pytest.fixture
def call(world):
    key = world.service.store.key("acme")
    client, server = dial(world, key)
    wait_for_framing(world, client)
    return SimpleNamespace(w=world, key=key, client=client, server=server)


def test_greeting_frames_arrive_in_order_and_paced(call):
    w, client = call.w, call.client
    assert w.service.opened == [call.server.handle] and w.service.calls_reserved == 0
    # the greeting starts at once: audio_start, then its first frames within the lead
    assert client.kinds() == ["audio_start", "audio"]
    assert client.received[0] == ("json", {"type": "audio_start"})
    assert all(n == FRAME_BYTES for k, n in client.received if k == "audio")
    assert 0 < client.audio_bytes() <= int(0.1 * 32000) + FRAME_BYTES
    advance(w, 3 * WORD_SECONDS + 0.3)
    assert client.kinds() == ["audio_start", "audio", "audio_end", "transcript"]
    assert client.messages("audio_end") == [{"type": "audio_end", "interrupted": False}]
    assert client.messages("transcript") == [{"type": "transcript", "role": "agent", "text": GREETING}]
    assert client.audio_bytes() == int(3 * WORD_SECONDS * 32000)
    assert state_of(call.server.handle) == "listening"


def test_text_that_is_not_json_gets_an_error_and_the_call_goes_on(call):
    w, client = call.w, call.client
    advance(w, 1.2)
    before = len(client.received)
    client.sendMessage(b"hello?", isBinary=False)
    client.sendMessage(json.dumps({"type": "dance"}).encode(), isBinary=False)
    client.sendMessage(b"\x00\x00\x00", isBinary=True)  # odd-sized audio is fine too
    w.pumper.flush()
    errors = [p for k, p in client.received[before:]]
    assert errors[0] == {"type": "error", "message": "text frame is not JSON"}
    assert errors[1]["type"] == "error" and "dance" in errors[1]["message"]
    advance(w, 1.0)
    assert client.closed is None and w.service.ended == []
    assert state_of(call.server.handle) == "listening"


def test_end_call_says_goodbye_and_closes_1000(call):
    w, client = call.w, call.client
    advance(w, 1.2)
    mark = len(client.received)
    send_json(client, {"type": "end_call"})
    w.pumper.flush()
    advance(w, 3 * WORD_SECONDS + 0.5)
    assert client.kinds(since=mark) == ["audio_start", "audio", "audio_end", "transcript"]
    assert client.messages("transcript")[-1] == {"type": "transcript", "role": "agent", "text": GOODBYE}
    assert client.closed == (True, 1000)
    (summary,) = w.service.ended
    assert summary["end_reason"] == "end_call"
    assert summary["key_prefix"] == call.key[:12] and summary["account"] == "acme" and summary["provider"] == "raw"
    assert w.clock.getDelayedCalls() == []
    assert w.service.calls == set() and w.service.calls_reserved == 0


@pytest.mark.parametrize("how", ["close_handshake", "tcp_drop"])
def test_hanging_up_mid_greeting_ends_the_call_once(call, how):
    w, client = call.w, call.client
    advance(w, 0.2)
    assert client.kinds() == ["audio_start", "audio"]  # still greeting
    if how == "close_handshake":
        client.sendClose(1000)
    else:
        client.dropConnection(abort=True)
    advance(w, 0.1)
    (summary,) = w.service.ended
    assert summary["end_reason"] == "hangup"
    assert summary["transcript"] == []  # the greeting was cut: it is never "said"
    assert state_of(call.server.handle) == "ended"
    advance(w, 5.0)
    assert len(w.service.ended) == 1
    assert w.clock.getDelayedCalls() == []
    assert w.service.calls == set() and w.service.calls_reserved == 0


def test_a_raw_client_that_sends_audio_first_is_greeted_at_once(world):
    key = world.service.store.key("acme")
    client, server = dial(world, key)
    client.sendMessage(quiet(0.02), isBinary=True)
    world.pumper.flush()
    assert server.line.framing.name == "raw" and world.service.opened == [server.handle]
    assert client.kinds() == ["audio_start", "audio"]
    client.dropConnection(abort=True)
    advance(world, 0.1)
    assert [s["end_reason"] for s in world.service.ended] == ["hangup"]
    assert world.clock.getDelayedCalls() == []


def test_a_client_that_stops_reading_is_disconnected(call):
    w = call.w
    producer = call.server.transport.producer
    producer.pauseProducing()  # what Twisted does when our send buffer fills up
    advance(w, w.factory.stall_timeout - 0.5)
    assert w.service.ended == []
    advance(w, 1.0)
    (summary,) = w.service.ended
    assert summary["end_reason"] == "hangup"
    assert w.clock.getDelayedCalls() == []


# ------------------------------------------------- slot holders, close codes


def test_a_slot_holder_is_closed_4408_at_start_timeout_and_holds_its_limits_meanwhile(world, captured):
    """``?provider=twilio`` and then nothing: no start message, ever."""
    key = world.service.store.key("acme")
    client, server = dial(world, key, "?provider=twilio")
    assert world.service.calls_reserved == 1 and world.service.store.active_calls("acme") == 1
    _, _, out = raw_upgrade(world, f"/voice/{key}")  # the account's one call is held
    assert status_and_headers(out)[0] == "HTTP/1.1 429 Too Many Requests"
    start_timeout = world.service.config.websocket.start_timeout
    advance(world, start_timeout - 0.1)
    assert client.closed is None
    advance(world, 0.2)
    assert client.closed == (True, 4408) and client.close_reason == "no start message"
    (no_start,) = [e for e in captured if e.get("event") == "call.no_start"]
    assert no_start["prefix"] == key[:12] and no_start["peer"] == server.peer and no_start["code"] == 4408
    assert world.service.calls_reserved == 0 and world.service.store.active_calls("acme") == 0
    assert world.service.opened == [] and world.service.disconnects == []
    assert world.clock.getDelayedCalls() == []
    assert_not_logged(captured, key)


def test_a_provider_that_says_connected_but_never_starts_is_closed_4408(world):
    key = world.service.store.key("acme")
    client, _ = dial(world, key)  # agent provider "auto"
    send_json(client, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
    world.pumper.flush()
    advance(world, world.service.config.websocket.start_timeout + 0.1)
    assert client.closed == (True, 4408)
    assert world.service.calls_reserved == 0 and world.clock.getDelayedCalls() == []


def test_frames_that_never_name_a_provider_are_closed_4002(world):
    key = world.service.store.key("acme")
    client, _ = dial(world, key)
    for i in range(60):
        send_json(client, {"event": "connected", "n": i})
    world.pumper.flush()
    advance(world, 0.1)
    assert client.closed == (True, 4002)
    assert world.service.calls_reserved == 0 and world.clock.getDelayedCalls() == []


def test_bad_provider_parameters_are_closed_4400(world, captured):
    key = world.service.store.key("acme")
    client, _ = dial(world, key, "?provider=exotel&sample-rate=7")
    advance(world, 0.1)
    assert client.closed == (True, 4400)
    assert [e["code"] for e in captured if e.get("event") == "call.no_start"] == [4400]
    assert world.service.calls_reserved == 0 and world.clock.getDelayedCalls() == []


# ------------------------------------------------------------- dispatch


@pytest.fixture
def recorded(world):
    """A raw connection whose call is a RecordingHandle, started when the test says."""
    world.service.real_calls = False
    world.service.hold_start = True
    key = world.service.store.key("acme")
    client, server = dial(world, key, "?provider=raw")
    return SimpleNamespace(w=world, client=client, server=server, key=key)


def test_events_wait_for_the_handle_then_reach_it_in_order(recorded):
    w, client, server = recorded.w, recorded.client, recorded.server
    (d, admission), = w.service.starting
    client.sendMessage(quiet(0.02), isBinary=True)
    send_json(client, {"type": "end_call"})
    client.sendMessage(quiet(0.04), isBinary=True)
    w.pumper.flush()
    assert server.handle is None
    d.callback(w.service.begin(admission, None, server.line))
    (handle,) = w.service.handles
    assert server.handle is handle
    assert handle.inputs == [("start",), ("audio", 640), ("end_requested",), ("audio", 1280)]
    client.sendMessage(quiet(0.02), isBinary=True)
    w.pumper.flush()
    assert handle.inputs[-1] == ("audio", 640)
    client.dropConnection(abort=True)
    advance(w, 0.1)
    assert handle.inputs[-1] == ("hangup",)
    assert w.clock.getDelayedCalls() == []


def test_a_caller_gone_while_the_call_starts_releases_the_admission(recorded):
    w, client, server = recorded.w, recorded.client, recorded.server
    (d, admission), = w.service.starting
    client.dropConnection(abort=True)
    advance(w, 0.1)
    assert admission.released and w.service.calls_reserved == 0
    d.callback(None)  # the service saw the release: no call
    assert server.handle is None and w.service.handles == []
    assert w.service.store.active_calls("acme") == 0


def test_a_call_that_could_not_start_closes_the_socket(recorded):
    w, client = recorded.w, recorded.client
    (d, admission), = w.service.starting
    admission.release()
    d.callback(None)
    advance(w, 0.1)
    assert client.closed == (True, 1000) and client.close_reason == "call could not start"


def test_the_service_gets_a_disconnect_that_cuts_the_socket(recorded):
    w, client = recorded.w, recorded.client
    (disconnect,) = w.service.disconnects
    (d, admission), = w.service.starting
    d.callback(w.service.begin(admission, None, recorded.server.line))
    disconnect()
    advance(w, 0.1)
    assert client.closed is not None and client.closed[0] is False
    assert w.service.handles[0].inputs[-1] == ("hangup",)


def test_bad_messages_are_all_answered_but_logged_sparingly_and_counted(recorded, captured):
    w, client, server = recorded.w, recorded.client, recorded.server
    (d, admission), = w.service.starting
    d.callback(w.service.begin(admission, None, server.line))
    for _ in range(300):
        client.sendMessage(b"not json", isBinary=False)
    w.pumper.flush()
    assert len(client.messages("error")) == 300  # every one is answered
    warned = [e for e in captured if e.get("event") == "call.bad_message"]
    assert len(warned) == 5
    assert w.factory.metrics.bad_messages._value.get() == 300
    advance(w, 10.1)
    client.sendMessage(b"not json", isBinary=False)  # the next one after 10 s brings a summary
    w.pumper.flush()
    summaries = [e["n"] for e in captured if e.get("event") == "call.bad_messages"]
    assert summaries == [296]
    client.sendMessage(b"not json", isBinary=False)
    w.pumper.flush()
    client.dropConnection(abort=True)
    advance(w, 0.1)
    summaries = [e["n"] for e in captured if e.get("event") == "call.bad_messages"]
    assert summaries == [296, 1]  # the rest, when the connection closes
    assert len([e for e in captured if e.get("event") == "call.bad_message"]) == 5


# ------------------------------------------------------- never-readers


def test_the_stall_watch_drops_on_bytes_as_well_as_on_time():
    clock = Clock()
    stalls: list[str] = []
    watch = bounds.StallWatch(clock, 10.0, stalls.append)
    assert not watch.wrote(10 * bounds.MAX_STALLED_BYTES)  # not paused: the transport takes it
    watch.pauseProducing()
    written = 0
    while not watch.wrote(1000):
        written += 1000
    assert stalls == ["bytes"] and written <= bounds.MAX_STALLED_BYTES
    assert clock.getDelayedCalls() == []
    watch.pauseProducing()
    clock.advance(10.0)
    assert stalls == ["bytes", "timeout"]
    watch.pauseProducing()
    watch.resumeProducing()  # the client read again
    clock.advance(20.0)
    assert stalls == ["bytes", "timeout"] and clock.getDelayedCalls() == []


def test_a_client_that_does_not_read_gets_no_pongs_and_a_bounded_queue(recorded):
    w, server = recorded.w, recorded.server
    (d, admission), = w.service.starting
    d.callback(w.service.begin(admission, None, server.line))
    server.onPing(b"p" * 125)
    w.pumper.flush()
    server.transport.producer.pauseProducing()  # the client stopped reading
    queued = []
    real_write = server.transport.write
    server.transport.write = lambda data: queued.append(len(data)) or real_write(data)
    for _ in range(10_000):
        server.onPing(b"p" * 125)
    assert queued == []  # no pong is queued for a client that does not read
    for _ in range(10_000):
        server.sendMessage(b"\x00" * 640, isBinary=True)
        if server.state == server.STATE_CLOSED:
            break
    assert server.state == server.STATE_CLOSED  # dropped once over the bound, long before the stall timeout
    assert sum(queued) <= bounds.MAX_STALLED_BYTES + 1024
    advance(w, 0.1)
    assert w.service.handles[0].inputs[-1] == ("hangup",)
    assert w.clock.getDelayedCalls() == []


@pytest.mark.parametrize("payload, expected", [
    ((1004).to_bytes(2, "big"), 1002),  # a reserved close code
    ((1000).to_bytes(2, "big") + b"\xff\xfe", 1007),  # a close reason that is not UTF-8
])
def test_a_bad_close_frame_gets_its_close_code_not_a_reset(recorded, payload, expected):
    w, client = recorded.w, recorded.client
    closes: list[bytes] = []
    real_process = client.processControlFrame

    def watch():  # the close frame the server sent back, before the connection goes
        if client.current_frame.opcode == 8:
            closes.append(b"".join(client.control_frame_data))
        return real_process()

    client.processControlFrame = watch
    client.sendFrame(opcode=8, payload=payload)
    advance(w, 0.1)
    assert [int.from_bytes(c[:2], "big") for c in closes] == [expected]
    assert recorded.server.state == recorded.server.STATE_CLOSED
    assert w.clock.getDelayedCalls() == []
