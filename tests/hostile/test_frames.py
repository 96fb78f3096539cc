"""Hostile WebSocket frames on an open call: RSV bits, bad opcodes, bad close
codes, broken fragmentation, unmasked frames, invalid UTF-8, a frame one
byte over max_frame_size, deep JSON (issue 9, items 6 and 8).

Each protocol failure must end in the close frame RFC 6455 and the README
name (1002 protocol error, 1007 invalid UTF-8, 1009 too big), not a TCP
reset (the client's 1006); the daemon still greets a legitimate call; no log
line holds a key."""

from __future__ import annotations

import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.hostile.conftest import (
    RawWS,
    assert_no_key_logged,
    assert_still_serves,
    close_payload,
    frame,
    held_call,
)

pytestmark = pytest.mark.slow

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
MAX_FRAME = 1_048_576  # the shipped max_frame_size and max_message_size
DEEP = b"[" * 50_000

VIOLATIONS = {
    "rsv1-text": (frame(TEXT, b'{"type":"dance"}', rsv=4), 1002),
    "rsv2-binary": (frame(BINARY, b"\x00\x00", rsv=2), 1002),
    "rsv3-ping": (frame(PING, b"", rsv=1), 1002),
    "opcode-3": (frame(0x3, b"x"), 1002),
    "opcode-7": (frame(0x7, b"x"), 1002),
    "opcode-0xB": (frame(0xB, b"x"), 1002),
    "opcode-0xF": (frame(0xF, b""), 1002),
    "continuation-first": (frame(CONT, b"x"), 1002),
    "data-inside-fragments": (frame(TEXT, b"{", fin=False) + frame(TEXT, b"}"), 1002),
    "fragmented-ping": (frame(PING, b"x", fin=False), 1002),
    "ping-over-125": (frame(PING, b"x" * 126), 1002),
    "unmasked": (frame(BINARY, b"\x00\x00", mask=False), 1002),
    "close-999": (frame(CLOSE, close_payload(999)), 1002),
    "close-1004": (frame(CLOSE, close_payload(1004)), 1002),
    "close-1005": (frame(CLOSE, close_payload(1005)), 1002),
    "close-1006": (frame(CLOSE, close_payload(1006)), 1002),
    "close-1015": (frame(CLOSE, close_payload(1015)), 1002),
    "close-2999": (frame(CLOSE, close_payload(2999)), 1002),
    "close-5000": (frame(CLOSE, close_payload(5000)), 1002),
    "close-one-byte": (frame(CLOSE, b"\x03"), 1002),
    "close-reason-bad-utf8": (frame(CLOSE, close_payload(1000, b"\xff\xfe")), 1007),
    "text-bad-utf8": (frame(TEXT, b'{"type": "\xff\xfe"}'), 1007),
    "text-bad-utf8-across-fragments": (frame(TEXT, b'{"a": "\xe2\x82', fin=False) + frame(CONT, b'\xff"}'), 1007),
    "fragments-over-max-message": (frame(BINARY, b"\x00" * 600_000, fin=False) + frame(CONT, b"\x00" * 600_000), 1009),
}


def _open_call(daemon) -> RawWS:
    ws = RawWS(daemon, f"/voice/{daemon.attacker}")
    ws.wait_json("audio_start")  # the call is up (raw, detected)
    return ws


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_protocol_violation_gets_its_close_code(daemon, case):
    data, expected = VIOLATIONS[case]
    ws = _open_call(daemon)
    try:
        ws.send(data)
        end = ws.until_close(timeout=5.0)
    finally:
        ws.close()
    assert end.how == "close", f"no close frame, the connection ended by {end.how} after {end.after:.2f}s (1006)"
    assert end.code == expected, end
    assert end.after < 3.0, end
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


@pytest.mark.parametrize("code", [1000, 3000, 4999])
def test_a_valid_client_close_is_answered(daemon, code):
    ws = _open_call(daemon)
    try:
        ws.send(frame(CLOSE, close_payload(code, "bye ✓".encode())))
        end = ws.until_close(timeout=5.0)
    finally:
        ws.close()
    assert end.how == "close" and end.code in (1000, code), end
    assert_still_serves(daemon)


def test_fragmented_messages_with_a_ping_between_are_reassembled(daemon):
    ws = _open_call(daemon)
    try:
        ws.send(frame(TEXT, b'{"ty', fin=False) + frame(CONT, b'pe": "da', fin=False) + frame(PING, b"probe")
                + frame(CONT, b'nce"}'))
        assert "unknown message type" in ws.wait_json("error", timeout=5)["message"]
        ws.send(frame(BINARY, b"\x00" * 640, fin=False) + frame(CONT, b"\x00" * 641))  # audio, odd split
        ws.send(frame(PING, b"second"))
        deadline = time.monotonic() + 5
        while len(ws.pongs) < 2 and time.monotonic() < deadline:
            got = ws._read_frame(deadline)
            assert not isinstance(got, str), f"connection {got}"
            assert got[0] != CLOSE, f"closed with {got[1][:2]!r}"
            if got[0] == PONG:
                ws.pongs.append(got[1])
        assert ws.pongs == [b"probe", b"second"]
    finally:
        ws.close()
    assert_still_serves(daemon)


def test_a_frame_one_byte_over_the_limit_is_closed_with_1009(daemon):
    with held_call(daemon):
        with connect(daemon.url(f"/voice/{daemon.attacker}"), open_timeout=5, close_timeout=5, max_size=None) as ws:
            assert ws.recv(timeout=5) == '{"type":"audio_start"}'
            try:
                ws.send(b"\x00" * (MAX_FRAME + 1))
            except ConnectionClosed:
                pass
            deadline = time.monotonic() + 5
            code = "open"
            while time.monotonic() < deadline:
                try:
                    ws.recv(timeout=max(0.01, deadline - time.monotonic()))
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd is not None else 1006
                    break
                except TimeoutError:
                    break
        assert code == 1009, f"a {MAX_FRAME + 1}-byte frame got {code}, not 1009"
        assert_still_serves(daemon)
    assert_no_key_logged(daemon)


def test_deep_json_as_the_first_frame_gets_an_error_or_a_close(daemon):
    ws = RawWS(daemon, f"/voice/{daemon.attacker}")
    try:
        ws.send(frame(TEXT, DEEP))  # before the 150 ms detection has chosen a framing
        end = ws.until_close(timeout=3.0)
    finally:
        ws.close()
    errors = [t for t in end.texts if t.get("type") == "error"]
    assert end.how in ("close", "timeout"), f"dropped: connection {end.how} with no close frame after {end.after:.2f}s"
    assert errors or end.how == "close", f"neither an error reply nor a close: {end.texts[:5]}"
    log = daemon.test_log()
    assert "RecursionError" not in log and "Unhandled" not in log and "Traceback" not in log, log[-2000:]
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def test_deep_json_mid_call_gets_an_error_and_the_call_goes_on(daemon):
    with held_call(daemon):
        ws = _open_call(daemon)
        try:
            ws.send(frame(TEXT, DEEP))
            ws.send(frame(TEXT, b'{"key": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001))
            first = ws.wait_json("error", timeout=5)
            second = ws.wait_json("error", timeout=5)
            ws.send_json({"type": "dance"})
            third = ws.wait_json("error", timeout=5)
            assert "unknown message type" in third["message"], (first, second, third)
            ws.send(frame(CLOSE, close_payload(1000)))
            assert ws.until_close(timeout=5).code == 1000
        finally:
            ws.close()
        log = daemon.test_log()
        assert "RecursionError" not in log and "Traceback" not in log, log[-2000:]
        assert_still_serves(daemon)
    assert_no_key_logged(daemon)
