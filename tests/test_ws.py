"""upvoot.daemon.ws, the Autobahn adapter, without sockets.

Denied handshakes: raw HTTP upgrade bytes written into a ``VoiceProtocol``
over an ``iosim.FakeTransport`` (a denied handshake never fires the client
agent's Deferred, so we read the HTTP status line back instead). Accepted
calls: ``autobahn.twisted.testing.create_memory_agent`` with a pumper we
flush by hand, so nothing runs on the global reactor.

Three clocks, advanced together: the call's clock (the service's ``clock``
and ``Pacer``), Autobahn's timers on txaio's loop (``replace_loop``), and the
memory reactor the client agent connects through. Only the call's clock must
be empty when a call is over.

Keys are real: made by ``upvoot.ledger.store.create_key`` in a fresh SQLite file and
looked up with ``upvoot.ledger.store.lookup_key``, inline instead of on a thread.
"""

from __future__ import annotations

import json
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
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from upvoot.ledger import store
from upvoot.daemon.admission import AbuseGuard
from upvoot.audio import FRAME_BYTES
from upvoot.call.machine import state_of
from upvoot.config import load_config
from upvoot.call.playout import Pacer
from upvoot.testing import WORD_SECONDS, agent_config, make_agent, quiet
from upvoot.daemon.ws import VoiceFactory, VoiceProtocol

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


class FakeService:
    """What ``VoiceProtocol`` uses of ``UpVootService``, and nothing more."""

    retry_after = 7
    stall_timeout = 10.0

    def __init__(self, config, clock: Clock, db_path: str) -> None:
        self.config = config
        self.clock = clock
        self.pacer = Pacer(clock)
        self.guard = AbuseGuard(clock, config.auth_failure_limit, config.auth_failure_window,
                                config.max_calls_per_account)
        self.store = InlineStore(db_path)
        self.agents = SimpleNamespace(agents={"demo": make_agent(agent_config(name="demo"))})
        self.refusal: str | None = None
        self.refusals: dict[int, int] = {}
        self.calls: set = set()
        self.calls_reserved = 0
        self.opened: list = []
        self.ended: list[dict] = []

    def admission_refusal(self) -> str | None:
        return self.refusal

    def note_refusal(self, status: int) -> None:
        self.refusals[status] = self.refusals.get(status, 0) + 1

    def call_opened(self, proto) -> None:
        self.calls.add(proto)
        self.opened.append(proto)

    def call_ended(self, proto, summary: dict) -> None:
        self.calls.discard(proto)
        self.ended.append(summary)


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


# ------------------------------------------------------------- handshakes


def upgrade_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: localhost:8080\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")


def raw_upgrade(w, path: str, lose: bool = True) -> tuple[object, iosim.FakeTransport, bytes]:
    """Write an upgrade request into a fresh VoiceProtocol; what it answered."""
    proto = w.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = iosim.FakeTransport(proto, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    proto.dataReceived(upgrade_request(path))
    out = transport.getOutBuffer()
    if lose:
        proto.connectionLost(Failure(ConnectionDone()))
    return proto, transport, out


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


@pytest.mark.parametrize("why", ["starting", "draining", "max_calls (1) reached", "reactor lag 200 ms over budget"])
def test_admission_refusal_gets_503_with_retry_after(world, captured, why):
    key = world.service.store.key("acme")
    world.service.refusal = why
    _, _, out = raw_upgrade(world, f"/voice/{key}")
    status, headers = status_and_headers(out)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers["retry-after"] == "7"
    assert headers["content-length"] == "0"
    assert world.service.refusals == {503: 1}
    assert world.service.calls_reserved == 0
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
    monkeypatch.setattr(VoiceProtocol, "_log", Logger(namespace="upvoot.daemon.ws", observer=events.append))
    monkeypatch.setattr(world.service.store, "authenticate", lambda key: defer.fail(RuntimeError("disk on fire")))
    key = "uvk_" + "B" * 32
    _, _, out = raw_upgrade(world, f"/voice/{key}")
    assert status_and_headers(out)[0] == "HTTP/1.1 503 Service Unavailable"
    assert [e["event"] for e in events if e.get("log_failure") is not None] == ["auth.error"]
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
    assert world.service.opened == [] and proto.machine is None
    assert world.service.calls_reserved == 0
    assert not world.service.guard.account_full("acme")
    assert world.clock.getDelayedCalls() == []


def test_factory_takes_every_websocket_limit_from_config(world):
    ws = world.service.config.websocket
    assert (world.factory.maxMessagePayloadSize, world.factory.maxFramePayloadSize) == (65536, 32768)
    assert world.factory.openHandshakeTimeout == ws.open_handshake_timeout == 7.0
    assert world.factory.closeHandshakeTimeout == 3.0
    assert world.factory.maxConnections == 5
    assert world.factory.trustXForwardedFor == 0
    assert world.factory.server == "UpVoot"


# ------------------------------------------------------------------- calls


def dial(w, key: str) -> tuple[Client, object]:
    """Open a call through Autobahn's memory agent; (client, server protocol)."""
    servers: list = []

    def server_protocol():
        proto = w.factory.buildProtocol(None)
        servers.append(proto)
        return proto

    agent = create_memory_agent(w.net, w.pumper, server_protocol)
    d = agent.open(f"ws://localhost:8080/voice/{key}", {}, protocol_class=Client)
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


@pytest.fixture
def call(world):
    key = world.service.store.key("acme")
    client, server = dial(world, key)
    wait_for_framing(world, client)
    return SimpleNamespace(w=world, key=key, client=client, server=server)


def test_greeting_frames_arrive_in_order_and_paced(call):
    w, client = call.w, call.client
    assert w.service.opened == [call.server] and w.service.calls_reserved == 0
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
    assert state_of(call.server.machine) == "listening"


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
    assert state_of(call.server.machine) == "listening"


def test_end_call_says_goodbye_and_closes_1000(call):
    w, client = call.w, call.client
    advance(w, 1.2)
    mark = len(client.received)
    client.sendMessage(json.dumps({"type": "end_call"}).encode(), isBinary=False)
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
    assert not w.service.guard.account_full("acme")  # the account's call slot is free again


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
    assert state_of(call.server.machine) == "ended"
    advance(w, 5.0)
    assert len(w.service.ended) == 1
    assert w.clock.getDelayedCalls() == []
    assert w.service.calls == set() and w.service.calls_reserved == 0
    assert not w.service.guard.account_full("acme")


def test_a_raw_client_that_sends_audio_first_is_greeted_at_once(world):
    key = world.service.store.key("acme")
    client, server = dial(world, key)
    client.sendMessage(quiet(0.02), isBinary=True)
    world.pumper.flush()
    assert server.framing.name == "raw" and world.service.opened == [server]
    assert client.kinds() == ["audio_start", "audio"]
    client.dropConnection(abort=True)
    advance(world, 0.1)
    assert [s["end_reason"] for s in world.service.ended] == ["hangup"]
    assert world.clock.getDelayedCalls() == []


def test_a_client_that_stops_reading_is_disconnected(call):
    w = call.w
    producer = call.server.transport.producer
    producer.pauseProducing()  # what Twisted does when our send buffer fills up
    advance(w, w.service.stall_timeout - 0.5)
    assert w.service.ended == []
    advance(w, 1.0)
    (summary,) = w.service.ended
    assert summary["end_reason"] == "hangup"
    assert w.clock.getDelayedCalls() == []
