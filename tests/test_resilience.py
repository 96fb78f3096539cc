"""Restarts and crashes with a real daemon: graceful drain on SIGTERM, a
kill -9 mid-call settled at the next start (also before its first loop
heartbeat), and a daemon that talks to nobody but its clients (no telemetry)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.daemon import Caller, Daemon, shipped_ini

pytestmark = pytest.mark.slow

LONG_AGENT = """
[agent:long]
greeting = Let me tell you a long story. Once upon a time there was a small village by the sea.
    Every morning the fishermen went out in their boats to catch fish for the market.
    The children played on the beach until the sun went down behind the hills.
silence_timeout = 60s
"""


def test_sigterm_drains_then_exits_zero(tmp_path):
    d = Daemon(tmp_path, shipped_ini(drain_time="2s") + LONG_AGENT).start()
    key = d.key(agent="long", account="drain", points=10)
    c = Caller(d.url(f"/voice/{key}"))
    c.wait_for(lambda ev: ev[1] == "audio", timeout=10)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # while draining, new calls are refused with 503 and a Retry-After
    with pytest.raises(InvalidStatus) as e:
        Caller(d.url(f"/voice/{key}"))
    assert e.value.response.status_code == 503 and e.value.response.headers["Retry-After"]
    assert not c.closed, "running calls are not cut off"
    code = c.wait_closed(timeout=30)
    assert code == 1000
    assert c.messages("transcript")[-1] == {"type": "transcript", "role": "agent",
                                             "text": "Thank you for calling. Goodbye!"}
    assert d.proc.wait(30) == 0
    records = [r for r in d.calls() if r["account"] == "drain"]
    assert len(records) == 1 and records[0]["state"] == "settled" and records[0]["end_reason"] == "shutdown"


def test_kill_9_mid_call_is_settled_once_at_the_next_start(tmp_path):
    ini = shipped_ini(heartbeat="1s") + LONG_AGENT
    d = Daemon(tmp_path, ini).start()
    key = d.key(agent="long", account="crash", points=10)
    c = Caller(d.url(f"/voice/{key}"))
    c.wait_for(lambda ev: ev[1] == "audio", timeout=10)
    time.sleep(3.5)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    c.close()
    (active,) = [r for r in d.calls() if r["account"] == "crash"]
    assert active["state"] == "active"
    assert d.cli("points", "show", "crash") == "10"
    d2 = Daemon(tmp_path, ini)
    d2.port = d.port
    d2.start()
    try:
        (settled,) = [r for r in d2.calls() if r["account"] == "crash"]
        assert settled["state"] == "settled" and settled["end_reason"] == "crash"
        assert 2.0 <= settled["duration"] <= 4.5, "charged to the last heartbeat"
        assert settled["points_charged"] == 1
        assert d2.cli("points", "show", "crash") == "9"
    finally:
        d2.stop()
    d3 = Daemon(tmp_path, ini)
    d3.start()
    d3.stop()
    assert d3.cli("points", "show", "crash") == "9", "never settled twice"


def test_kill_9_before_the_first_heartbeat_still_charges_the_started_increment(tmp_path):
    """The heartbeat is written when the call opens, not a beat later: a call
    killed within its first ``heartbeat`` is settled with what it held."""
    ini = shipped_ini(heartbeat="10m", lease="30m", reservation_horizon="11m") + LONG_AGENT
    d = Daemon(tmp_path, ini).start()
    key = d.key(agent="long", account="early", points=10)
    c = Caller(d.url(f"/voice/{key}"))
    c.wait_for(lambda ev: ev[1] == "audio", timeout=10)
    time.sleep(0.5)  # the opening heartbeat is written within milliseconds
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    c.close()
    (active,) = [r for r in d.calls() if r["account"] == "early"]
    assert active["state"] == "active"
    d2 = Daemon(tmp_path, ini)
    d2.port = d.port
    d2.start()
    try:
        (settled,) = [r for r in d2.calls() if r["account"] == "early"]
        assert settled["state"] == "settled" and settled["end_reason"] == "crash"
        assert 0.0 < settled["duration"] < 0.5
        assert settled["points_charged"] == 1
        assert d2.cli("points", "show", "early") == "9"
    finally:
        d2.stop()


def _sockets_of(pid: int) -> set[str]:
    """Remote addresses of the process's inet sockets (empty for listeners)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    remotes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[9] in inodes:
                remotes.add(cols[2])
    return remotes


def _is_loopback_or_unconnected(hex_addr: str) -> bool:
    host = hex_addr.split(":")[0]
    if set(host) == {"0"}:
        return True  # not connected (a listener)
    if len(host) == 8:  # IPv4, little-endian
        return host.endswith("7F")
    return host in ("00000000000000000000000001000000",) or host.startswith("0000000000000000FFFF0000") and host.endswith("7F")


def test_no_telemetry_no_sockets_but_our_own(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the daemon inherits it
    try:
        d = Daemon(tmp_path / "state", shipped_ini()).start()
    finally:
        if env_home is not None:
            os.environ["HOME"] = env_home
    try:
        key = d.key()
        c = Caller(d.url(f"/voice/{key}"))
        seen: set[str] = set()
        deadline = time.monotonic() + 14  # onnxruntime's telemetry starts ~9 s after load
        while time.monotonic() < deadline:
            seen |= _sockets_of(d.proc.pid)
            c.pause(0.2)
        c.close()
        strangers = {a for a in seen if not _is_loopback_or_unconnected(a)}
        assert strangers == set(), f"sockets to {strangers}"
        assert not (home / ".cache" / "Microsoft").exists(), "onnxruntime wrote its telemetry store"
    finally:
        d.stop()


def test_the_plugin_sets_the_offline_environment_before_engines_load():
    import subprocess
    import sys

    code = ("import os; os.environ.pop('ORT_DISABLE_TELEMETRY', None); os.environ.pop('HF_HUB_OFFLINE', None); "
            "import upvoot.daemon.tap, sys; print(os.environ['ORT_DISABLE_TELEMETRY'], os.environ['HF_HUB_OFFLINE'], "
            "'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "False"]


def test_sighup_picks_up_a_renewed_certificate_without_dropping_calls(tmp_path):
    import hashlib
    import socket
    import ssl

    from tests.daemon import client_ssl_context, make_self_signed

    certs = tmp_path / "certs"
    certs.mkdir()
    key_file, cert_file = make_self_signed(certs)
    d = Daemon(tmp_path / "tls", shipped_ini() + LONG_AGENT, scheme="wss",
               listen=f"ssl:{{port}}:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}")
    d.start()

    def served_cert() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", d.port)) as raw, ctx.wrap_socket(raw) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).digest()

    try:
        key = d.key(agent="long", account="tls", points=10)
        call = Caller(d.url(f"/voice/{key}"), ssl_context=client_ssl_context(cert_file))
        call.wait_for(lambda ev: ev[1] == "audio", timeout=10)
        before = served_cert()
        old_cert = cert_file.read_bytes()
        make_self_signed(certs)  # renewed on disk, same paths
        assert cert_file.read_bytes() != old_cert
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "TLS listener reloaded" not in d.log_text():
            call.pause(0.1)
        assert served_cert() != before, "new connections get the renewed certificate"
        call.pause(0.5)
        assert not call.closed, "the running call was not dropped"
        fresh = Caller(d.url(f"/voice/{key}"), ssl_context=client_ssl_context(cert_file))
        fresh.wait_for(lambda ev: ev[1] == "audio", timeout=10)
        fresh.close()
        call.close()
    finally:
        d.stop()


def test_a_call_the_ledger_cannot_open_is_refused_503_and_the_next_one_is_admitted(tmp_path):
    """Another process holds the write lock when a call arrives, so the
    ledger cannot open it (nor reserve its points): the call is refused
    with 503 and Retry-After before the upgrade, never admitted unbilled,
    and nothing of it is left behind. Once the lock is gone the next call
    is admitted and settled as usual."""
    import sqlite3

    ini = shipped_ini(heartbeat="1s") + LONG_AGENT
    d = Daemon(tmp_path, ini).start()
    try:
        key = d.key(agent="long", account="locked", points=10)
        locker = sqlite3.connect(str(tmp_path / "upvoot.sqlite3"), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # WAL: the key lookup still reads; every write waits, then fails
        try:
            with pytest.raises(InvalidStatus) as refused:
                Caller(d.url(f"/voice/{key}"))
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers.get("Retry-After")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert [r for r in d.calls() if r["account"] == "locked"] == [], "a refused call leaves no row"
        assert d.cli("points", "show", "locked") == "10"
        c = Caller(d.url(f"/voice/{key}"))
        c.wait_for(lambda ev: ev[1] == "audio", timeout=10)
        c.close()
    finally:
        d.stop()
    (settled,) = [r for r in d.calls() if r["account"] == "locked"]
    assert settled["state"] == "settled"
    assert d.cli("points", "show", "locked") == str(10 - settled["points_charged"])
