"""Fuzz targets (issue 9): every framing's receive_text / receive_binary and
the Negotiation's receive / timeout take any input and answer with a list of
known events or actions, never an exception, in bounded time.

Inputs mix arbitrary text and bytes, JSON shaped like each provider's
messages (documented messages with fields replaced or removed), and hostile
JSON (deep nesting, long runs of brackets and escapes). EXAMPLES inputs per
target; the number run is counted in RUN and checked by the last test.
"""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upvoot.framing.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    Dtmf,
    EndCallRequested,
    Frame,
    PlayoutMark,
    ProtocolError,
)
from upvoot.framing.negotiate import AUTO, PROVIDERS, Chosen, Close, Deliver, Negotiation, Reply, Started, make_framing

EVENT_TYPES = (CallStarted, CallerAudio, Dtmf, PlayoutMark, EndCallRequested, CallStopped, ProtocolError)
ACTION_TYPES = (Chosen, Started, Deliver, Close, Reply)
EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RUN: Counter = Counter()  # inputs (frames or timeouts) run, per target

B64 = base64.b64encode(bytes(range(256)) * 2).decode()
STARTS = {
    "raw": {"type": "end_call"},
    "exotel": {"event": "start", "stream_sid": "MZ", "start": {
        "stream_sid": "MZ", "call_sid": "CA", "account_sid": "AC", "custom_parameters": {"a": "b"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"}}},
    "twilio": {"event": "start", "streamSid": "MZ", "start": {
        "streamSid": "MZ", "callSid": "CA", "accountSid": "AC", "customParameters": {"a": "b"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}},
    "plivo": {"event": "start", "start": {"callId": "c", "streamId": "s",
                                          "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000}},
              "extra_headers": "a=b;c=d"},
    "telnyx": {"event": "start", "stream_id": "s", "start": {
        "call_control_id": "v2:c", "client_state": "x", "media_format": {"encoding": "L16", "sample_rate": 16000}}},
    "vonage": {"event": "websocket:connected", "content-type": "audio/l16;rate=8000", "uuid": "u"},
}
MESSAGES = [
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    {"event": "media", "streamSid": "MZ", "media": {"track": "inbound", "chunk": "2", "payload": B64}},
    {"event": "media", "stream_id": "s", "sequence_number": "3", "media": {"chunk": 1, "payload": B64}},
    {"event": "mark", "mark": {"name": "upvoot-1"}},
    {"event": "dtmf", "dtmf": {"digit": "5"}},
    {"event": "playedStream", "name": "upvoot-1"},
    {"event": "clearedAudio", "streamId": "s"},
    {"event": "websocket:notify", "payload": {"name": "upvoot-1"}},
    {"event": "websocket:cleared"},
    {"event": "websocket:dtmf", "digit": "1"},
    {"event": "error", "payload": {"code": 100003, "title": "malformed_frame"}},
    {"event": "stop", "stop": {"reason": "callended"}},
    {"Event": "Start", "start": {"streamSid": "MZ", "callSid": "CA"}},
    {"callSid": "x", "sampleRate": 8000},
    {"type": "end_call"},
    {"type": "dance"},
]

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=16) | st.sampled_from([B64, "8000", "start", "media", "inbound"]))
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=12)


@st.composite
def mutated(draw) -> str:
    """A documented message with up to four fields replaced or removed."""
    msg = json.loads(json.dumps(draw(st.sampled_from(MESSAGES + list(STARTS.values())))))
    for _ in range(draw(st.integers(0, 4))):
        paths = [(msg, k) for k in msg] + [(v, k) for v in msg.values() if isinstance(v, dict) for k in v]
        if not paths:
            break
        obj, key = draw(st.sampled_from(paths))
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key, None)
    return json.dumps(msg)


hostile_text = st.one_of(
    st.integers(1, 60000).map(lambda n: "[" * n),
    st.integers(1, 20000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 20000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 20000).map(lambda n: '"\\"' * n),
    st.integers(30, 5000).map(lambda n: '{"event":"media","media":' + "[" * n + "]" * n + "}"),
    st.text(alphabet="[]{}\"\\:,", max_size=300),
)
texts = st.one_of(st.text(max_size=200), mutated(), json_values.map(json.dumps), hostile_text)
binaries = st.binary(max_size=2000)
frames = st.one_of(texts.map(lambda t: (t.encode("utf-8", "surrogatepass"), False)), binaries.map(lambda b: (b, True)))


def _check_events(events) -> None:
    assert isinstance(events, list)
    for e in events:
        assert isinstance(e, EVENT_TYPES), e
        if isinstance(e, CallerAudio):
            assert isinstance(e.pcm, bytes) and len(e.pcm) % 2 == 0


def _check_frames(out) -> None:
    assert isinstance(out, list) and all(isinstance(f, Frame) for f in out)


def _codec(name: str, started: bool):
    codec = make_framing(name, {})
    if started:
        _check_events(codec.receive_text(json.dumps(STARTS[name])))
    return codec


# ---- each framing --------------------------------------------------------------------

# pytest-twisted wraps every test function and trips over @given ones, so each
# target is a plain hypothesis function called from an ordinary test.


@pytest.mark.parametrize("name", PROVIDERS)
def test_fuzz_receive_text(name):
    _receive_text(name)


@FUZZ
@given(data=st.data())
def _receive_text(name, data):
    codec = _codec(name, data.draw(st.booleans()))
    for text in data.draw(st.lists(texts, min_size=1, max_size=6)):
        RUN[f"{name}.receive_text"] += 1
        _check_events(codec.receive_text(text))
        _check_frames(codec.drain())
    _check_frames(codec.audio(bytes(640)) + codec.flush() + codec.drain())


@pytest.mark.parametrize("name", PROVIDERS)
def test_fuzz_receive_binary(name):
    _receive_binary(name)


@FUZZ
@given(data=st.data())
def _receive_binary(name, data):
    codec = _codec(name, data.draw(st.booleans()))
    for payload in data.draw(st.lists(binaries, min_size=1, max_size=6)):
        RUN[f"{name}.receive_binary"] += 1
        _check_events(codec.receive_binary(payload))
        _check_frames(codec.drain())


# ---- negotiation -----------------------------------------------------------------------

params = st.dictionaries(st.sampled_from(["sample-rate", "sample_rate", "codec", "l16-byte-order", "x"]),
                         st.sampled_from(["", "8000", "16000", "12000", "PCMU", "L16", "big", "??"]), max_size=2)
steps = st.lists(st.one_of(frames, st.just("timeout"), st.sampled_from(list(STARTS.values())).map(
    lambda m: (json.dumps(m).encode(), False))), min_size=1, max_size=12)


@pytest.mark.parametrize("choice", (AUTO, *PROVIDERS))
def test_fuzz_negotiation(choice):
    _negotiation(choice)


@FUZZ
@given(params=params, steps=steps, max_early=st.integers(1, 60))
def _negotiation(choice, params, steps, max_early):
    n = Negotiation(choice, params, detect_timeout=0.15, start_timeout=10.0, max_early_frames=max_early)
    actions = n.begin()
    for step in steps:
        RUN[f"negotiation.{choice}"] += 1
        actions += n.timeout() if step == "timeout" else n.receive(*step)
        deadline = n.deadline
        assert deadline is None or deadline >= 0.0
    started = closed = False
    for a in actions:
        assert isinstance(a, ACTION_TYPES), a
        assert not closed, f"{a} after Close"
        if isinstance(a, Started):
            assert not started and isinstance(a.started, CallStarted)
            started = True
        elif isinstance(a, Deliver):
            assert started and isinstance(a.event, EVENT_TYPES) and not isinstance(a.event, CallStarted)
        elif isinstance(a, Reply):
            _check_frames(a.frames)
        elif isinstance(a, Close):
            assert 3000 <= a.code <= 4999 and a.reason
            closed = True
    assert sum(isinstance(a, Chosen) for a in actions) <= 1


def test_zz_fuzz_inputs_were_run():
    """The count of inputs run (printed with -s); every target that ran got
    at least one input per example."""
    targets = [k for k in RUN]
    print(f"\nfuzz inputs run: {sum(RUN.values())} over {len(targets)} targets "
          f"({EXAMPLES} examples each): {dict(sorted(RUN.items()))}")
    for target in targets:
        assert RUN[target] >= EXAMPLES, target
