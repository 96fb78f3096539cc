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
import threading
import time
import urllib.request

import pytest
from twisted.internet.task import Clock

from tests.daemon import Caller, Daemon, free_port, shipped_ini
from tests.test_admin import Admin, FakeStore, value
from upvoot.config import load_config
from upvoot.daemon.service import UpVootService

HAS_PROC = os.path.isdir("/proc/self/fd")


@pytest.fixture
def service(tmp_path):
    """A real UpVootService, not started, on a Clock (as in tests/test_admin.py)."""
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\n[agent:demo]\n")
    svc = UpVootService(load_config(str(ini)), Clock())
    svc.store = FakeStore()
    return svc


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
    other = UpVootService(load_config(str(tmp_path / "upvoot.ini")), Clock())
    other.store = FakeStore()
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
