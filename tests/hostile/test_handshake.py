"""Hostile opening handshakes, over raw TCP: malformed request lines and
versions, missing or wrong WebSocket headers, traversal, percent-encoding,
NUL and unicode in keys, paths and headers, huge and endless headers, the
open redirect and the version banner (issue 9, items 4, 5 and 7).

Each case: the answer is an HTTP error status (or the server closes), never
101 nor a hang; the daemon still greets a legitimate call; no log line
holds a key."""

from __future__ import annotations

import re
import socket
import statistics
import threading
import time

import autobahn
import pytest

from tests.hostile.conftest import assert_no_key_logged, assert_still_serves, exchange, request_bytes

pytestmark = pytest.mark.slow

#: the default [websocket] max_handshake_size
HANDSHAKE_CAP = 8192

ERRORS = set(range(400, 600))


def _no_banner(reply) -> None:
    server = reply.headers.get("server")
    assert server is None or not re.search(r"autobahn|twisted|python|\d", server, re.I), f"Server: {server}"
    assert b"autobahn" not in reply.body.lower() and autobahn.__version__.encode() not in reply.body, reply.body[:200]
    assert "location" not in reply.headers, reply.headers


def _refused(daemon, data: bytes, allowed: set[int]):
    reply = exchange(daemon, data)
    assert reply.status != 101, "a malformed handshake was upgraded"
    assert reply.answered, f"no answer and not closed within {reply.elapsed:.1f}s"
    assert reply.status in allowed, (reply.status, reply.head[:200], reply.ended)
    if reply.status is not None:
        assert reply.ended in ("eof", "reset"), "the server keeps the connection after an error status"
    _no_banner(reply)
    return reply


# ---- malformed upgrades ---------------------------------------------------------------

def _malformed(key: str) -> dict[str, tuple[bytes, set[int]]]:
    path = f"/voice/{key}".encode()
    return {
        "extra-token": (request_bytes(path, line=b"GET " + path + b" extra HTTP/1.1"), {400}),
        "missing-version": (request_bytes(path, line=b"GET " + path), {400}),
        "http-1.0": (request_bytes(path, version=b"HTTP/1.0"), {400, 505}),
        "http-2.0": (request_bytes(path, version=b"HTTP/2.0"), {400, 505}),
        "http-1.1.1": (request_bytes(path, version=b"HTTP/1.1.1"), {400, 505}),
        "lowercase-http": (request_bytes(path, version=b"http/1.1"), {400, 505}),
        "post": (request_bytes(path, method=b"POST"), {400, 405}),
        "lowercase-get": (request_bytes(path, method=b"get"), {400, 405}),
        "no-sec-websocket-key": (request_bytes(path, omit=(b"Sec-WebSocket-Key",)), {400}),
        "short-sec-websocket-key": (request_bytes(path, omit=(b"Sec-WebSocket-Key",),
                                                  extra=[(b"Sec-WebSocket-Key", b"c2hvcnQ=")]), {400}),
        "version-8": (request_bytes(path, omit=(b"Sec-WebSocket-Version",),
                                    extra=[(b"Sec-WebSocket-Version", b"8")]), {400, 426}),
        "version-junk": (request_bytes(path, omit=(b"Sec-WebSocket-Version",),
                                       extra=[(b"Sec-WebSocket-Version", b"13, junk")]), {400, 426}),
        "no-host": (request_bytes(path, omit=(b"Host",)), {400}),
        "two-hosts": (request_bytes(path, extra=[(b"Host", b"evil.example")]), {400}),
        "bad-host-port": (request_bytes(path, omit=(b"Host",), extra=[(b"Host", b"127.0.0.1:http")]), {400}),
        "upgrade-h2c": (request_bytes(path, omit=(b"Upgrade",), extra=[(b"Upgrade", b"h2c")]), {400, 404, 426}),
        "no-connection": (request_bytes(path, omit=(b"Connection",)), {400}),
        "fragment": (request_bytes(path + b"#frag"), {400}),
    }


CASES = sorted(_malformed("uvk_" + "x" * 32))


@pytest.mark.parametrize("case", CASES)
def test_malformed_upgrade_is_refused_without_logging_the_key(daemon, case):
    data, allowed = _malformed(daemon.attacker)[case]
    reply = exchange(daemon, data)
    assert reply.status != 101, "a malformed handshake was upgraded"
    assert reply.answered, f"no answer and not closed within {reply.elapsed:.1f}s"
    assert reply.status in allowed | {None}, (reply.status, reply.head[:200])
    _no_banner(reply)
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


# ---- keys: traversal, percent-encoding, NUL, unicode, length ----------------------------

def test_traversal_and_encoded_keys_never_authenticate(daemon):
    key = daemon.attacker
    paths = [
        b"/voice/../x", b"/voice/..%2fx", b"/voice/%2e%2e", b"/voice/%2e%2e/%2e%2e/etc/passwd",
        b"/voice/" + key.encode() + b"%00", b"/voice/" + key.encode() + b"%00.wav",
        b"/voice/" + key.encode() + b"/..", b"/voice/" + key.encode() + b"/extra",
        b"/voice/" + key.upper().encode(), b"/voice/" + key[:-1].encode(), b"/voice/" + key.encode() + b"x",
        b"/voice/%20" + key.encode(), b"/voice/" + key.encode() + b"%20",
        b"/voice/" + key.encode() + b"\x00", b"/voice/uvk_\x00" + key[4:].encode(),
        "/voice/uvk_ünïcødé-ключ-钥匙".encode(), b"/voice/uvk_\xff\xfe\xfd", b"/voice/\xc0\xae\xc0\xae",
        b"/voice/uvk_" + b"a" * 4000, b"/voice/" + b"%41" * 2000,
        b"/voice//" + key.encode(), b"//voice/" + key.encode(), b"/VOICE/" + key.encode(),
        b"/voice/" + key.encode().replace(b"_", b"%5F", 1),
    ]
    statuses = {}
    for path in paths:
        reply = _refused(daemon, request_bytes(path), {400, 401, 404, 414, 431, None})
        statuses[path[:40]] = reply.status
    assert 401 in statuses.values() and 404 in statuses.values(), statuses
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def test_nul_and_unicode_in_headers_never_crash_nor_leak(daemon):
    key = daemon.attacker
    extras = [
        [(b"X-Nul", b"a\x00b")], [(b"X-Uni", "ünïcødé ключ 钥匙 🙂".encode())], [(b"X-Bad", b"\xff\xfe\x80")],
        [(b"X-\x00Name", b"v")], [("X-Ünï".encode(), b"v")], [(b"X-Key", key.encode())],
        [(b"Cookie", b"k=" + key.encode())], [(b"X-Forwarded-For", b"\x00, 1.2.3.4")],
        [(b"Origin", b"null\x00")], [(b"Sec-WebSocket-Protocol", b"\x00\xff")],
    ]
    for extra in extras:
        reply = exchange(daemon, request_bytes(f"/voice/{key}", extra=extra))
        assert reply.answered, f"{extra!r}: no answer within {reply.elapsed:.1f}s"
        assert reply.status in {101, 400}, (extra, reply.status, reply.head[:200])
    log = daemon.test_log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-2000:]
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


# ---- huge, many and endless headers -----------------------------------------------------

def test_huge_and_many_headers_are_refused_at_the_cap(daemon):
    key = daemon.attacker
    one_huge = request_bytes(f"/voice/{key}", extra=[(b"X-Pad", b"A" * 3 * HANDSHAKE_CAP)])
    many = request_bytes(f"/voice/{key}", extra=[(f"X-H{i}".encode(), b"v" * 20) for i in range(1000)])
    for data in (one_huge, many):
        reply = exchange(daemon, data)
        assert reply.status != 101, "an oversized handshake was upgraded"
        assert reply.answered
        assert reply.status in (431, 400, None), reply.head[:200]
    # a handshake under the cap is still fine
    ok = exchange(daemon, request_bytes(f"/voice/{key}", extra=[(b"X-Pad", b"A" * (HANDSHAKE_CAP // 2))]))
    assert ok.status == 101, ok.head[:200]
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def _pad_until_cut(port: int, budget: float, out: list) -> None:
    """Send an endless X-Pad header in 1 KB steps; record (bytes sent, how it
    ended, seconds) when the server answers or closes, or the budget runs out."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    t0 = time.monotonic()
    sent = 0
    chunk = b"A" * 1024
    pending = b"GET /voice/uvk_endless HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Pad: "
    how = "budget"
    try:
        while time.monotonic() - t0 < budget:
            try:
                data = s.recv(4096)
                how = (data.split(b"\r\n", 1)[0].decode("latin-1") or "eof") if data else "eof"
                break
            except BlockingIOError:
                pass
            except ConnectionResetError:
                how = "reset"
                break
            try:
                n = s.send(pending or chunk)
                sent += n
                pending = pending[n:]
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                how = "reset"
                break
            if sent < 64 * 1024:
                time.sleep(0.002)  # near the cap: small steps, so what we sent is close to what the server took
    finally:
        s.close()
    out.append((sent, how, time.monotonic() - t0))


def test_endless_header_is_cut_at_the_cap_and_healthz_stays_fast(daemon):
    quiet = sorted(daemon.healthz() for _ in range(5))
    # one endless header: where is it cut?
    first: list = []
    _pad_until_cut(daemon.port, 5.0, first)
    sent, how, took = first[0]
    print(f"\nendless header: cut after {sent} bytes sent ({how}) in {took:.3f}s")
    assert how != "budget", f"an endless header was never cut: {sent} bytes in {took:.1f}s"
    assert how in ("eof", "reset") or how.startswith("HTTP/1.1 431") or how.startswith("HTTP/1.1 400"), how
    assert sent <= HANDSHAKE_CAP + 16 * 1024, f"cut only after {sent} bytes (cap {HANDSHAKE_CAP})"
    # four attackers, each starting a new endless header whenever one is cut, for 3 s
    results: list = []
    stop = time.monotonic() + 3.0

    def attacker():
        while time.monotonic() < stop:
            _pad_until_cut(daemon.port, max(0.1, stop - time.monotonic()), results)

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    loaded = []
    while time.monotonic() < stop:
        loaded.append(daemon.healthz())
        time.sleep(0.1)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    print(f"healthz quiet median {statistics.median(quiet) * 1000:.1f} ms, under attack median "
          f"{statistics.median(loaded) * 1000:.1f} ms p90 {statistics.quantiles(loaded, n=10)[-1] * 1000:.1f} ms "
          f"max {max(loaded) * 1000:.1f} ms; "
          f"{len(results)} padded connections")
    # The suite runs in two workers on two cores: a single answer can wait a
    # scheduler slice or two behind the other worker's model work (measured:
    # max 190-210 ms with two CPU hogs beside this test, 40-65 ms without).
    # What the cap must prevent is the reactor rescanning ever-growing
    # buffers, which stalls every answer for seconds: so the median and the
    # 90th percentile are held tight, and the worst answer only to "not stalled".
    p90 = statistics.quantiles(loaded, n=10)[-1]
    assert statistics.median(loaded) < 0.05, f"/healthz median {statistics.median(loaded):.3f}s under the attack"
    assert p90 < 0.25, f"/healthz 90th percentile {p90:.3f}s under the attack: {sorted(loaded)}"
    assert max(loaded) < 1.0, f"/healthz max {max(loaded):.3f}s under the attack: stalled"
    assert_still_serves(daemon)


# ---- open redirect, banner, plain statuses ---------------------------------------------

def test_no_open_redirect_and_no_status_page(daemon):
    key = daemon.attacker
    plain = [(b"Host", b"127.0.0.1")]
    for target in (b"/x?redirect=https%3A%2F%2Fevil.example%2F", b"/?redirect=https%3A%2F%2Fevil.example%2F&after=0",
                   b"/", b"/index.html", b"/voice"):
        reply = exchange(daemon, request_bytes(target, headers=plain))
        assert reply.status == 404, (target, reply.status, reply.head[:200], reply.body[:200])
        _no_banner(reply)
        assert b"evil.example" not in reply.head + reply.body
    # a key path without Upgrade: refused, no page, no redirect
    reply = exchange(daemon, request_bytes(f"/voice/{key}?redirect=https%3A%2F%2Fevil.example%2F".encode(),
                                           headers=plain))
    assert reply.status in (400, 404, 426), (reply.status, reply.head[:200])
    _no_banner(reply)
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def test_no_version_banner_in_any_answer(daemon):
    key = daemon.attacker
    answers = [exchange(daemon, request_bytes(p)) for p in (f"/voice/{key}", "/voice/uvk_" + "b" * 32, "/elsewhere")]
    assert [a.status for a in answers] == [101, 401, 404]
    for reply in answers:
        _no_banner(reply)
    assert_still_serves(daemon)


def test_bad_keys_get_401_before_the_upgrade_and_other_paths_404(daemon):
    revoked = daemon.key(account="revoked")
    daemon.cli("keys", "revoke", revoked[:12])
    broke = daemon.key(account="broke", points=0)
    expected = {
        f"/voice/{daemon.fake_key()}": 401, "/voice/": 401, "/voice/not-a-key": 401, f"/voice/{revoked}": 401,
        f"/voice/{broke}": 402, "/elsewhere": 404, "/": 404, "/voicex/" + daemon.fake_key(): 404,
        "/metrics": 404, "/healthz": 404,
    }
    got = {path: exchange(daemon, request_bytes(path)) for path in expected}
    assert {p: r.status for p, r in got.items()} == expected
    for reply in got.values():
        assert reply.ended in ("eof", "reset") and reply.elapsed < 2.0, (reply.ended, reply.elapsed)
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)
