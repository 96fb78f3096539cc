"""Clients that never read: plain never-readers (their call ends by its
silence limit and the close they never answer is cut at close_timeout) and
never-readers that flood pings, a pong queued for each (issue 9, item 9).
The daemon's memory per hostile client stays under 1 MB (its RSS, from
/proc), a never-reader is dropped within a bound, and a legitimate call is
served meanwhile.

(The kernel's socket buffers, not the daemon, hold what a never-reader does
not read of paced audio: several MB on loopback, so a never-reader of audio
alone cannot be told from a slow one within a test's time.)"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from tests.hostile.conftest import (
    RawWS,
    assert_no_key_logged,
    assert_still_serves,
    frame,
    held_call,
)

pytestmark = pytest.mark.slow

#: a never-reader's call ends by its silence limit; the close it is sent is never
#: answered, so the daemon drops the connection after close_timeout
DAEMON_OPTIONS = {"close_timeout": "2s"}
EXTRA_INI = """
[agent:deaf]
greeting = Hello, this is the hostile test line.
silence_timeout = 2s
silence_prompt =
closing_silence = Goodbye.
wrap_up_before = 0
tts = espeak
"""

CLIENTS = 4
MB = 1024  # kB
#: greeting (about 2.5 s) + silence_timeout + closing line + close_timeout, with room to spare
NEVER_READER_BOUND = 20.0


class RssWatch:
    """Samples the daemon's RSS every 50 ms in a thread; ``peak`` in kB."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.peak = daemon.rss_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.daemon.rss_kb())
            except (OSError, AttributeError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def _baseline(daemon) -> int:
    for _ in range(2):
        assert_still_serves(daemon)
    time.sleep(0.5)
    return daemon.rss_kb()


def _dropped(sock: socket.socket) -> bool:
    """Has the server ended this connection? (without reading a byte)"""
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))


def test_never_readers_are_dropped_and_bounded(daemon):
    base = _baseline(daemon)
    key = daemon.key(agent="deaf", account="nonreader")
    t0 = time.monotonic()
    readers = [RawWS(daemon, f"/voice/{key}", rcvbuf=4096) for _ in range(CLIENTS)]
    watch = RssWatch(daemon)
    dropped: dict[int, float] = {}
    with held_call(daemon, timeout=10):
        try:
            deadline = t0 + NEVER_READER_BOUND
            while len(dropped) < CLIENTS and time.monotonic() < deadline:
                for i, r in enumerate(readers):
                    if i not in dropped and _dropped(r.sock):
                        dropped[i] = time.monotonic() - t0
                time.sleep(0.1)
            assert_still_serves(daemon, timeout=10)
        finally:
            peak = watch.stop()
            for r in readers:
                r.close()
    per_client = (peak - base) / CLIENTS
    print(f"\nnever-readers: dropped after {sorted(round(t, 1) for t in dropped.values())} s; RSS {base} -> "
          f"peak {peak} kB, {per_client:.0f} kB per client")
    assert len(dropped) == CLIENTS, \
        f"{CLIENTS - len(dropped)} never-readers still connected after {NEVER_READER_BOUND:g}s"
    assert per_client < 1 * MB, f"{per_client:.0f} kB of daemon memory per never-reader"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        settled = [c for c in daemon.calls() if c["account"] == "nonreader" and c["state"] == "settled"]
        if len(settled) == CLIENTS:
            break
        time.sleep(0.2)
    assert [c["end_reason"] for c in settled] == ["silence"] * CLIENTS, settled
    assert_no_key_logged(daemon)


def test_ping_flood_from_never_readers_costs_under_1mb_each(daemon):
    base = _baseline(daemon)
    flooders = [RawWS(daemon, f"/voice/{daemon.attacker}", rcvbuf=4096) for _ in range(CLIENTS)]
    burst = b"".join(frame(0x9, b"p" * 125) for _ in range(100))
    sent = [0] * CLIENTS
    watch = RssWatch(daemon)
    with held_call(daemon, timeout=10):
        try:
            for f in flooders:
                f.sock.setblocking(False)
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                progressed = False
                for i, f in enumerate(flooders):
                    try:
                        n = f.sock.send(burst)
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        continue  # dropped by the server: allowed
                    sent[i] += n
                    progressed = True
                if not progressed:
                    time.sleep(0.005)
            assert_still_serves(daemon, timeout=10)
        finally:
            peak = watch.stop()
            for f in flooders:
                f.close()
    per_client = (peak - base) / CLIENTS
    pings = sum(sent) // len(frame(0x9, b"p" * 125))
    print(f"\nping flood: {pings} pings from {CLIENTS} never-readers in 4 s; RSS {base} -> peak {peak} kB, "
          f"{per_client:.0f} kB per client")
    assert pings > 1000, "the flood did not get going: the test proves nothing"
    assert per_client < 1 * MB, f"{per_client:.0f} kB of daemon memory per ping-flooding never-reader"
    assert_no_key_logged(daemon)
