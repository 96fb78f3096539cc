"""Floods and the figures that show leaks.

In memory: the leak-hunting metrics on the service's own registry
(``upvoot_reactor_delayed_calls``, read at scrape time, and
prometheus_client's ``ProcessCollector``: ``process_resident_memory_bytes``,
``process_open_fds``...), over the real admin resources as in
tests/test_admin.py.

Over real ports (slow): a handshake flood against the real daemon. Many TCP
connections that send nothing, or half an HTTP request, are dropped by the
server when ``open_handshake_timeout`` runs out; meanwhile a real call gets
its greeting; afterwards the daemon holds as many file descriptors as before.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import statistics
import threading
import time
import urllib.request

import pytest
from twisted.internet.task import Clock
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.daemon import Caller, Daemon, free_port, shipped_ini
from tests.test_admin import Admin, FakeStore, value
from tests.test_service import FakeProcess
from upvoot.config import load_config
from upvoot.daemon.tap import build_service
from upvoot.ledger.threads import synchronous

HAS_PROC = os.path.isdir("/proc/self/fd")


@pytest.fixture
def service(tmp_path):
    """A real UpVootService, not started, on a Clock (as in tests/test_admin.py)."""
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\n[agent:demo]\n")
    return build_service(load_config(str(ini)), Clock(), store=FakeStore(), run_in_thread=synchronous,
                         process=FakeProcess())


# ---- the leak-hunting metrics ---------------------------------------------------------


def test_reactor_delayed_calls_are_counted_at_scrape_time(service):
    admin = Admin(service)
    clock = service.clock
    base = value(admin.metrics(), "upvoot_reactor_delayed_calls")
    assert base == len(clock.getDelayedCalls())
    first = clock.callLater(5, lambda: None)
    clock.callLater(10, lambda: None)
    assert value(admin.metrics(), "upvoot_reactor_delayed_calls") == base + 2
    first.cancel()
    assert value(admin.metrics(), "upvoot_reactor_delayed_calls") == base + 1
    clock.advance(10)
    assert value(admin.metrics(), "upvoot_reactor_delayed_calls") == base


@pytest.mark.skipif(not HAS_PROC, reason="ProcessCollector reads /proc")
def test_process_collector_is_on_the_service_registry(service, tmp_path):
    m = Admin(service).metrics()
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * page
    rss = value(m, "process_resident_memory_bytes")
    assert rss == pytest.approx(resident, rel=0.2)
    open_fds = len(os.listdir("/proc/self/fd"))
    assert abs(value(m, "process_open_fds") - open_fds) <= 3
    assert value(m, "process_max_fds") > 0
    assert value(m, "process_start_time_seconds") > 0
    # a second service in the same process has its own collector: no
    # "Duplicated timeseries" error, and its own figures
    other = build_service(load_config(str(tmp_path / "upvoot.ini")), Clock(), store=FakeStore(),
                          run_in_thread=synchronous, process=FakeProcess())
    assert value(Admin(other).metrics(), "process_open_fds") > 0


# ---- the handshake flood (real daemon) ------------------------------------------------

FLOOD = 200
HANDSHAKE_TIMEOUT = 2.0
#: Autobahn's handshake timer is batched and its deadline rounded down to a
#: whole second, so it may fire up to a second early.
EARLY = 1.0
LATE = 3.0
HALF_REQUEST = (b"GET /voice/uvk_half_a_request HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n")  # no blank line: never complete


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_fds(pid: int, seconds: float = 1.0) -> int:
    """The daemon's fd count once it has not changed for ``seconds`` (at most 10 s)."""
    deadline = time.monotonic() + 10
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
    return last


def watch_drops(socks: list[socket.socket], deadline: float, out: dict) -> None:
    """Record, per socket index, (monotonic time, "eof" | "reset" | "data")
    when the server ends the connection; stops at ``deadline``."""
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    try:
        while len(out) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, min(0.2, deadline - time.monotonic()))):
                i = key.data
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    kind = "reset"
                except BlockingIOError:
                    continue
                else:
                    if data:
                        kind = "data"  # the server answered something: not expected
                    else:
                        kind = "eof"
                out[i] = (time.monotonic(), kind)
                sel.unregister(key.fileobj)
    finally:
        sel.close()


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads /proc/PID/fd")
def test_handshake_flood_is_dropped_while_a_real_call_is_greeted(tmp_path):
    admin_port = free_port()
    # backlog: with Twisted's default of 50 the kernel's accept queue overflows
    # and the rest of the flood waits for SYN retransmits (1 s, 2 s...), so the
    # server would never hold the whole flood at once
    d = Daemon(tmp_path / "d", shipped_ini(open_handshake_timeout=f"{HANDSHAKE_TIMEOUT:g}s", drain_time="0",
                                           admin_listen=f"tcp:{admin_port}:interface=127.0.0.1"),
               listen="tcp:{port}:interface=127.0.0.1:backlog=%d" % (FLOOD + 56))
    d.start()
    socks: list[socket.socket] = []
    try:
        pid = d.proc.pid
        key = d.key()
        # a whole call first, so what opens on first use is open before the baseline
        warm = Caller(d.url(f"/voice/{key}"))
        warm.wait_json("audio_start", timeout=15)
        warm.close()
        d.call()
        before = steady_fds(pid)

        opened: list[float] = []
        for i in range(FLOOD):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            if i % 2:
                s.sendall(HALF_REQUEST)
            socks.append(s)
            opened.append(time.monotonic())
        drops: dict[int, tuple[float, str]] = {}
        watcher = threading.Thread(target=watch_drops, args=(socks, opened[-1] + HANDSHAKE_TIMEOUT + LATE + 2, drops),
                                   daemon=True)
        watcher.start()
        # the server really holds them (not the kernel's accept queue)
        deadline = time.monotonic() + 1.5
        peak = fd_count(pid)
        while peak < before + FLOOD and time.monotonic() < deadline:
            time.sleep(0.05)
            peak = max(peak, fd_count(pid))
        assert peak >= before + FLOOD, (before, peak)

        # meanwhile a real call is answered and greeted
        call = Caller(d.url(f"/voice/{key}"))
        call.wait_json("audio_start", timeout=15)
        call.wait_for(lambda ev: ev[1] == "audio", timeout=5)
        watcher.join(HANDSHAKE_TIMEOUT + LATE + 10)
        assert not watcher.is_alive()

        # every flood connection was ended by the server, within the timeout
        assert len(drops) == FLOOD, f"{FLOOD - len(drops)} connections still open"
        kinds = {kind for _, kind in drops.values()}
        assert kinds <= {"eof", "reset"}, kinds  # Autobahn aborts the connection: a reset
        assert d.log_text().count("opening handshake timeout") == FLOOD
        after_open = [drops[i][0] - opened[i] for i in range(FLOOD)]
        assert min(after_open) >= HANDSHAKE_TIMEOUT - EARLY - 0.1, min(after_open)
        assert max(after_open) <= HANDSHAKE_TIMEOUT + LATE, max(after_open)
        # the real call was not collateral damage
        assert not call.closed
        call.wait_for(lambda ev: ev[1] == "json" and ev[2].get("type") == "audio_end", timeout=20)
        call.close()
        deadline = time.monotonic() + 10
        while len(settled := [c for c in d.calls() if c["state"] == "settled"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [c["end_reason"] for c in settled] == ["hangup", "hangup"]  # the warm-up call and this one

        # the daemon's figures: back where they started
        for s in socks:
            s.close()
        socks.clear()
        end = before + 1000
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            end = fd_count(pid)
            if end <= before + 2:
                break
            time.sleep(0.2)
        assert end <= before + 2, (before, peak, end)

        text = http_get(f"http://127.0.0.1:{admin_port}/metrics")
        assert abs(metric(text, "process_open_fds") - fd_count(pid)) <= 3  # the scrape's own connection
        assert metric(text, "process_resident_memory_bytes") > 10 * 2**20
        assert metric(text, "upvoot_reactor_delayed_calls") >= 1  # the pacer, heartbeat, lag monitor...
        assert metric(text, "upvoot_calls_active") == 0
        log = d.log_text()
        assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    finally:
        for s in socks:
            s.close()
        d.stop()


# ---- hostile clients of the public port (real daemon, real wire) ------------------------


def ws_handshake(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    """A raw WebSocket connection after its 101 (for frames no client library sends)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def client_frame(opcode: int, payload: bytes, rsv: int = 0) -> bytes:
    """One masked client frame (mask of zeros: the payload goes as it is)."""
    n = len(payload)
    head = bytes([0x80 | rsv << 4 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def close_code_from(s: socket.socket, timeout: float = 10.0) -> int | None:
    """Read server frames until a close frame: its code (None: the connection just ended)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[off:off + n], buf[off + n:]
            if opcode == 8:
                return int.from_bytes(payload[:2], "big")
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return None
        if not chunk:
            return None
        buf += chunk


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def hostile(tmp_path):
    """A real daemon with short waits, and a key."""
    admin_port = free_port()
    d = Daemon(tmp_path / "d", shipped_ini(start_timeout="2s", max_handshake_size="4096", max_calls_per_account="3",
                                           drain_time="0", admin_listen=f"tcp:{admin_port}:interface=127.0.0.1"))
    d.start()
    d.admin_port = admin_port
    try:
        d.the_key = d.key()
        yield d
    finally:
        d.stop()


@pytest.mark.slow
def test_slot_holders_are_closed_4408_at_start_timeout_and_hold_their_account_s_calls(hostile):
    d, key = hostile, hostile.the_key
    t0 = time.monotonic()
    holders = [connect(d.url(f"/voice/{key}?provider=twilio"), open_timeout=10).__enter__() for _ in range(3)]
    try:
        with pytest.raises(Exception) as refused:  # the account's 3 calls are held by the 3 silent connections
            connect(d.url(f"/voice/{key}"), open_timeout=10)
        assert "429" in str(refused.value)
        closed = []
        for ws in holders:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            closed.append((time.monotonic() - t0, ws.close_code, ws.close_reason))
        assert [c[1:] for c in closed] == [(4408, "no start message")] * 3
        assert max(t for t, _, _ in closed) <= 2.0 + 1.0, closed
        assert min(t for t, _, _ in closed) >= 2.0 - 0.2, closed
        print(f"slot holders closed after {min(t for t, _, _ in closed):.2f}..{max(t for t, _, _ in closed):.2f} s")
    finally:
        for ws in holders:
            ws.close()
    call = Caller(d.url(f"/voice/{key}"))  # the slots are free again
    call.wait_json("audio_start", timeout=15)
    call.close()
    log = d.log_text()
    assert log.count("call.no_start") >= 3 or log.count("No call on this connection") == 3
    assert key not in log


@pytest.mark.slow
def test_oversized_and_invalid_frames_get_their_close_codes_not_a_reset(hostile):
    d, key = hostile, hostile.the_key
    with connect(d.url(f"/voice/{key}?provider=raw"), open_timeout=10, max_size=None) as ws:
        ws.send(b"\0" * 1_048_577)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1009, (ws.close_code, ws.close_reason)
    s = ws_handshake(d.port, f"/voice/{key}?provider=raw")
    s.sendall(client_frame(0x1, b"\xff\xfe\xfd"))  # a text frame that is not UTF-8
    assert close_code_from(s) == 1007
    s.close()
    for bad in (client_frame(0x3, b"x"), client_frame(0x2, b"\0\0", rsv=4), client_frame(0x9, b"p" * 126)):
        s = ws_handshake(d.port, f"/voice/{key}?provider=raw")
        s.sendall(bad)  # a reserved opcode, an RSV bit, a control frame over 125 bytes
        assert close_code_from(s) == 1002, bad[:2]
        s.close()
    assert "Traceback" not in d.log_text()


@pytest.mark.slow
def test_no_fuzzed_request_puts_the_key_in_the_log_and_nothing_answers_with_a_banner(hostile):
    from tests.test_ws import fuzzed_request_lines

    d, key = hostile, hostile.the_key
    requests = fuzzed_request_lines(key) + [
        b"GET /x?redirect=https%3A%2F%2Fevil.example%2F HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET /voice/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
    ]
    answers = []
    for data in requests:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(data)
            out = b""
            while b"\r\n\r\n" not in out:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        answers.append(out)
    for data, out in zip(requests, answers):
        assert re.match(rb"HTTP/1\.1 (4\d\d|505) ", out), (data[:80], out[:80])
        assert b"server:" not in out.lower() and b"autobahn" not in out.lower() and b"location" not in out.lower()
    assert all(a.startswith(b"HTTP/1.1 404 ") for a in answers[-3:])  # no redirect, no status page
    time.sleep(0.5)
    log = d.log_text()
    assert "/voice/<redacted>" in log
    assert key not in log and key[12:] not in log


@pytest.mark.slow
def test_an_endless_header_is_cut_at_the_cap_and_healthz_stays_fast(hostile):
    d = hostile
    sent: list[int] = []
    ended: list[float] = []

    def pad() -> None:
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        n, t0 = 0, time.monotonic()
        try:
            s.sendall(b"GET /voice/uvk_pad HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
            while time.monotonic() - t0 < 10:
                n += s.send(b"A" * 4096)
        except OSError:
            ended.append(time.monotonic() - t0)
        finally:
            sent.append(n)
            s.close()

    threads = [threading.Thread(target=pad, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    timings = []
    for _ in range(20):
        t0 = time.monotonic()
        http_get(f"http://127.0.0.1:{d.admin_port}/healthz")
        timings.append(time.monotonic() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join(15)
    assert len(ended) == 4, (sent, ended)  # every one was cut off
    assert max(ended) < 5.0, ended
    # two test workers share two cores: one answer may wait a scheduler slice
    # behind the other worker; a reactor rescanning its buffers stalls them all
    assert statistics.median(timings) < 0.05, timings
    assert max(timings) < 1.0, timings
    print(f"endless headers: cut after {max(ended):.2f} s, {max(sent)} bytes accepted (kernel buffers included);"
          f" /healthz max {max(timings) * 1000:.1f} ms")
    assert d.log_text().count("handshake.too_large") + d.log_text().count("Opening handshake over") >= 4


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads /proc/PID/status")
def test_ping_flooding_never_readers_cost_under_1_mb_each(hostile):
    d, key = hostile, hostile.the_key
    n_clients = 6
    keys = [d.key(account=f"flood{i}") for i in range(n_clients)]  # an account each: a never-reader is a call
    warm = Caller(d.url(f"/voice/{key}"))
    warm.wait_json("audio_end", timeout=20)
    warm.close()
    time.sleep(1.0)
    pid = d.proc.pid
    before = rss(pid)
    peak = before
    stop = threading.Event()
    pings_sent: list[int] = []
    dropped: list[float] = []

    def flood(k: str) -> None:
        s = ws_handshake(d.port, f"/voice/{k}?provider=raw", rcvbuf=4096)
        ping = client_frame(0x9, b"p" * 125)
        n, t0 = 0, time.monotonic()
        try:
            while not stop.is_set() and time.monotonic() - t0 < 20:
                s.sendall(ping * 64)
                n += 64
        except OSError:
            dropped.append(time.monotonic() - t0)
        finally:
            pings_sent.append(n)
            s.close()

    threads = [threading.Thread(target=flood, args=(k,), daemon=True) for k in keys]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 25
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak = max(peak, rss(pid))
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(5)
    per_client = (peak - before) / n_clients
    print(f"ping flood: {sum(pings_sent)} pings from {n_clients} never-readers, dropped after "
          f"{min(dropped, default=-1):.1f}..{max(dropped, default=-1):.1f} s; RSS {before / 2**20:.1f} -> "
          f"{peak / 2**20:.1f} MiB, {per_client / 2**20:.2f} MiB per client")
    assert len(dropped) == n_clients, (dropped, pings_sent)
    assert per_client < 2**20, per_client
    call = Caller(d.url(f"/voice/{key}"))  # the daemon still serves
    call.wait_json("audio_start", timeout=15)
    call.close()
