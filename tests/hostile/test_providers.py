"""Hostile provider clients (Twilio's wire format): slot holders that never
start a call, events out of order, bad base64 media (issue 9, items 1 and 12).

A connection that never becomes a call is closed within [websocket]
start_timeout with UpVoot's close code 4408, and counts against its
account's max_calls_per_account while it waits (others of that account get
429); provider events out of order are ignored without ending a good call;
bad media is counted, not logged line by line."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.hostile.conftest import (
    SLACK,
    START_TIMEOUT,
    RawWS,
    assert_no_key_logged,
    assert_still_serves,
    close_payload,
    exchange,
    frame,
    held_call,
    request_bytes,
)

pytestmark = pytest.mark.slow

#: a provider connection holds one of its account's two call slots
DAEMON_OPTIONS = {"max_calls_per_account": "2"}
NO_START = 4408  # UpVoot's close code: no call started within start_timeout
UNRECOGNISED = 4002  # UpVoot's close code: unrecognised protocol before the call started
SILENCE = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of μ-law silence


def connected() -> dict:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start(sid: str) -> dict:
    return {"event": "start", "sequenceNumber": "1", "streamSid": f"MZ{sid}",
            "start": {"accountSid": "AChostile", "streamSid": f"MZ{sid}", "callSid": f"CA{sid}",
                      "tracks": ["inbound"], "customParameters": {},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def media(sid: str, payload, n: int = 1) -> dict:
    return {"event": "media", "sequenceNumber": str(n + 1), "streamSid": f"MZ{sid}",
            "media": {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n), "payload": payload}}


def stop(sid: str) -> dict:
    return {"event": "stop", "sequenceNumber": "99", "streamSid": f"MZ{sid}",
            "stop": {"accountSid": "AChostile", "callSid": f"CA{sid}"}}


def records_naming(daemon, sid: str, wait: float = 0.0) -> list[dict]:
    """Call records whose metadata names Twilio call ``CA<sid>`` (waits up to
    ``wait`` seconds for one to be settled)."""
    deadline = time.monotonic() + wait
    while True:
        found = [c for c in daemon.calls() if f"CA{sid}" in json.dumps(c.get("metadata", {}))]
        if all(c["state"] == "settled" for c in found) and (found or time.monotonic() >= deadline):
            return found
        if time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def _assert_closed_for_no_start(end, started: float, daemon) -> float:
    configured = "" if daemon.start_timeout_configured else ", not in the config yet"
    took = time.monotonic() - started
    assert end.how == "close", (f"a connection with no call was not closed within {START_TIMEOUT + SLACK:g}s "
                                f"(start_timeout {START_TIMEOUT:g}s{configured}): {end.how} after {took:.1f}s")
    assert end.code == NO_START, end
    assert START_TIMEOUT - 1.0 <= took <= START_TIMEOUT + SLACK, took
    return took


# ---- slot holders -------------------------------------------------------------------

def test_connected_without_start_is_closed_within_start_timeout(daemon):
    with held_call(daemon):
        ws = RawWS(daemon, f"/voice/{daemon.attacker}")
        t0 = time.monotonic()
        try:
            ws.send_json(connected())
            end = ws.until_close(timeout=START_TIMEOUT + SLACK + 1)
        finally:
            ws.close()
        took = _assert_closed_for_no_start(end, t0, daemon)
        print(f"\nslot holder (auto, connected, no start) closed with {end.code} after {took:.2f}s")
        assert_still_serves(daemon)
    assert_no_key_logged(daemon)


@pytest.mark.parametrize("say_connected", [False, True], ids=["silent", "connected"])
def test_explicit_provider_without_start_is_closed_within_start_timeout(daemon, say_connected):
    ws = RawWS(daemon, f"/voice/{daemon.attacker}?provider=twilio")
    t0 = time.monotonic()
    try:
        if say_connected:
            ws.send_json(connected())
        end = ws.until_close(timeout=START_TIMEOUT + SLACK + 1)
    finally:
        ws.close()
    took = _assert_closed_for_no_start(end, t0, daemon)
    print(f"\nslot holder (?provider=twilio, connected={say_connected}) closed with {end.code} after {took:.2f}s")
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def test_slot_holders_count_against_the_account_until_closed(daemon):
    key = daemon.key(account="holder")
    holders = [RawWS(daemon, f"/voice/{key}?provider=twilio"), RawWS(daemon, f"/voice/{key}")]
    t0 = time.monotonic()
    try:
        holders[1].send_json(connected())
        third = exchange(daemon, request_bytes(f"/voice/{key}"))
        assert third.status == 429, f"a third connection of a 2-call account got {third.status}"
        assert_still_serves(daemon)  # other accounts are not affected
        ends = [h.until_close(timeout=max(0.1, t0 + START_TIMEOUT + SLACK - time.monotonic())) for h in holders]
    finally:
        for h in holders:
            h.close()
    for end in ends:
        _assert_closed_for_no_start(end, t0, daemon)
    assert [c for c in daemon.calls() if c["account"] == "holder"] == [], "a connection with no start made a call"
    time.sleep(0.3)  # the slots come back once the connections are gone
    again = exchange(daemon, request_bytes(f"/voice/{key}"))
    assert again.status == 101, f"after the holders were closed the account got {again.status}"
    assert_no_key_logged(daemon)


# ---- events out of order --------------------------------------------------------------

def test_media_before_start_is_ignored_and_the_call_then_starts(daemon):
    sid = "mediafirst"
    ws = RawWS(daemon, f"/voice/{daemon.attacker}?provider=twilio")
    try:
        for n in range(5):
            ws.send_json(media(sid, SILENCE, n))
        ws.send_json(start(sid))
        greeting = ws.wait_json("media", timeout=5)
        assert greeting["streamSid"] == f"MZ{sid}"
        for n in range(5, 30):
            ws.send_json(media(sid, SILENCE, n))
        ws.send_json(stop(sid))
        end = ws.until_close(timeout=5)
    finally:
        ws.close()
    assert end.how == "close" and end.code == 1000, end
    assert [c["end_reason"] for c in records_naming(daemon, sid, wait=10)] == ["hangup"]
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


@pytest.mark.parametrize("path", ["?provider=twilio", ""], ids=["twilio", "auto"])
def test_stop_before_start_closes_without_a_call(daemon, path):
    sid = "stopfirst" + ("t" if path else "a")
    ws = RawWS(daemon, f"/voice/{daemon.attacker}{path}")
    t0 = time.monotonic()
    try:
        ws.send_json(connected())
        ws.send_json(stop(sid))
        end = ws.until_close(timeout=START_TIMEOUT + SLACK + 1)
    finally:
        ws.close()
    took = time.monotonic() - t0
    assert end.how == "close", f"not closed within {START_TIMEOUT + SLACK:g}s: {end.how} after {took:.1f}s"
    assert end.code in (1000, UNRECOGNISED, NO_START), end
    assert took <= START_TIMEOUT + SLACK, took
    assert records_naming(daemon, sid) == [], "a stop before any start made a call"
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


def test_a_second_start_is_ignored(daemon):
    sid, other = "twice", "twiceagain"
    ws = RawWS(daemon, f"/voice/{daemon.attacker}?provider=twilio")
    try:
        ws.send_json(connected())
        ws.send_json(start(sid))
        ws.wait_json("media", timeout=5)
        ws.send_json(start(other))
        for n in range(20):
            ws.send_json(media(sid, SILENCE, n))
        ws.send_json(stop(sid))
        end = ws.until_close(timeout=5)
    finally:
        ws.close()
    assert end.how == "close" and end.code == 1000, end
    assert [c["end_reason"] for c in records_naming(daemon, sid, wait=10)] == ["hangup"]
    assert records_naming(daemon, other) == []
    assert_no_key_logged(daemon)
    assert_still_serves(daemon)


# ---- bad base64 ---------------------------------------------------------------------

BAD_PAYLOADS = ["!!!not base64!!!", "=", "A", "AAA", "====", "\u00ff\u00fe", "QUJD\x00", None, 7, [], {"a": 1},
                "A" * 100_001]


def test_bad_base64_media_is_counted_not_logged_and_the_call_goes_on(daemon):
    sid = "badb64"
    burst = 300
    with held_call(daemon):
        ws = RawWS(daemon, f"/voice/{daemon.attacker}?provider=twilio")
        try:
            ws.send_json(start(sid))
            ws.wait_json("media", timeout=5)
            before = len(daemon.test_log().splitlines())
            for n in range(burst):
                ws.send_json(media(sid, BAD_PAYLOADS[n % len(BAD_PAYLOADS)], n))
            ws.send(frame(0x1, b'{"event": "media", "media": "not an object"}'))
            for n in range(burst, burst + 25):
                ws.send_json(media(sid, SILENCE, n))
            ws.send_json({"event": "dtmf", "streamSid": f"MZ{sid}", "dtmf": {"track": "inbound_track", "digit": "1"}})
            time.sleep(0.5)
            lines = len(daemon.test_log().splitlines()) - before
            ws.send_json(stop(sid))
            end = ws.until_close(timeout=5)
        finally:
            ws.close()
        assert end.how == "close" and end.code == 1000, f"the call did not go on after bad media: {end}"
        assert [c["end_reason"] for c in records_naming(daemon, sid, wait=10)] == ["hangup"]
        print(f"\n{burst + 1} bad provider frames -> {lines} log lines")
        assert lines <= 30, f"{burst + 1} bad provider frames wrote {lines} log lines (rate-limit them per call)"
        log = daemon.test_log()
        assert "Traceback" not in log and "Unhandled" not in log, log[-2000:]
        assert_still_serves(daemon)
    assert_no_key_logged(daemon)


def test_provider_close_frame_is_answered(daemon):
    ws = RawWS(daemon, f"/voice/{daemon.attacker}?provider=twilio")
    try:
        ws.send_json(start("closer"))
        ws.wait_json("media", timeout=5)
        ws.send(frame(0x8, close_payload(1000)))
        end = ws.until_close(timeout=5)
    finally:
        ws.close()
    assert end.how == "close" and end.code == 1000, end
    assert [c["end_reason"] for c in records_naming(daemon, "closer", wait=10)] == ["hangup"]
