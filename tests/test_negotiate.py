"""Provider negotiation without sockets: which dialect a connection speaks,
what happens to its early frames, and when a connection that never becomes
a call is closed (upvoot.framing.negotiate.Negotiation)."""

from __future__ import annotations

import base64
import json

import attrs
import pytest
from twisted.internet import task

from upvoot.framing.base import CallerAudio, CallStarted, Dtmf, Frame, PlayoutMark, ProtocolError
from upvoot.framing.negotiate import (
    AUTO,
    CLOSE_BAD_PARAMETERS,
    CLOSE_NO_START,
    CLOSE_UNRECOGNISED,
    JAMBONZ,
    PROVIDERS,
    Chosen,
    Close,
    Deliver,
    Negotiation,
    Reply,
    Started,
    State,
    detect,
)

DETECT, START = 0.15, 10.0

CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).encode()
TWILIO_START = json.dumps({
    "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
    "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
              "customParameters": {"agent": "sales"}},
}).encode()
VONAGE_CONNECTED = json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}).encode()
JAMBONZ_METADATA = json.dumps({"callSid": "x", "sampleRate": 8000, "from": "a"}).encode()
DEEP = b"[" * 50000
ULAW_20MS = base64.b64encode(b"\xff" * 160).decode()

STARTS = {  # the start message of each provider, as its first text frame
    "exotel": json.dumps({"event": "start", "stream_sid": "MZ1", "start": {
        "stream_sid": "MZ1", "call_sid": "CA1", "account_sid": "AC1",
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"}}}).encode(),
    "twilio": TWILIO_START,
    "plivo": json.dumps({"event": "start", "start": {"callId": "c1", "streamId": "s1",
                                                     "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 8000}}}).encode(),
    "telnyx": json.dumps({"event": "start", "stream_id": "s1", "start": {
        "call_control_id": "v2:c1", "media_format": {"encoding": "PCMU", "sample_rate": 8000}}}).encode(),
    "vonage": VONAGE_CONNECTED,
}


def twilio(event: str, **body) -> bytes:
    return json.dumps({"event": event, "streamSid": "MZ1", **body}).encode()


def media(n: int) -> bytes:
    return twilio("media", media={"track": "inbound", "chunk": str(n), "payload": ULAW_20MS})


def negotiation(choice: str = AUTO, params: dict | None = None, **kw) -> Negotiation:
    return Negotiation(choice, params or {}, detect_timeout=DETECT, start_timeout=START, **kw)


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


# ---- choosing the dialect -------------------------------------------------------------


def test_a_configured_raw_choice_starts_at_once():
    n = negotiation("raw")
    chosen, started = n.begin()
    assert isinstance(chosen, Chosen) and chosen.framing.name == "raw" and chosen.why == "configured"
    assert started == Started(CallStarted(provider="raw"))
    assert n.state is State.STARTED and n.deadline is None


def test_auto_and_a_binary_frame_is_raw():
    n = negotiation()
    assert n.begin() == [] and n.state is State.WAITING_FIRST and n.deadline == DETECT
    actions = n.receive(b"\x01\x00\x02", True)
    assert kinds(actions) == ["Chosen", "Started", "Deliver"]
    assert actions[0].framing.name == "raw" and actions[0].why == "detected"
    assert actions[1].started.provider == "raw"
    assert actions[2] == Deliver(CallerAudio(b"\x01\x00"))  # the odd byte waits for the next frame
    assert n.state is State.STARTED and n.deadline is None
    assert n.receive(b"\x03", True) == [Deliver(CallerAudio(b"\x02\x03"))]


def test_auto_and_raw_json_is_raw():
    n = negotiation()
    n.begin()
    actions = n.receive(json.dumps({"type": "end_call"}).encode(), False)
    assert kinds(actions) == ["Chosen", "Started", "Deliver"]
    assert actions[0].framing.name == "raw"
    assert type(actions[2].event).__name__ == "EndCallRequested"


def test_auto_and_text_that_is_not_json_is_raw_with_an_error_to_answer():
    n = negotiation()
    n.begin()
    actions = n.receive(b"hello?", False)
    assert kinds(actions) == ["Chosen", "Started", "Deliver"]
    assert actions[2] == Deliver(ProtocolError("text frame is not JSON"))


def test_auto_and_silence_is_raw_after_the_detect_timeout():
    n = negotiation()
    n.begin()
    chosen, started = n.timeout()
    assert chosen.framing.name == "raw" and chosen.why == "timeout" and started.started.provider == "raw"
    assert n.timeout() == [] and n.state is State.STARTED


def test_twilio_connected_then_start():
    n = negotiation()
    n.begin()
    assert n.receive(CONNECTED, False) == []
    assert n.state is State.WAITING_PROVIDER and n.deadline == START
    actions = n.receive(TWILIO_START, False)
    assert kinds(actions) == ["Chosen", "Started"]
    assert actions[0].framing.name == "twilio" and actions[0].why == "detected"
    started = actions[1].started
    assert (started.provider, started.call_id, started.stream_id) == ("twilio", "CA1", "MZ1")
    assert started.custom == {"agent": "sales"}
    assert n.state is State.STARTED and n.deadline is None
    audio = [a for i in range(12) for a in n.receive(media(i + 1), False)]
    assert audio and all(isinstance(a, Deliver) and isinstance(a.event, CallerAudio) for a in audio)


@pytest.mark.parametrize("name", sorted(STARTS))
def test_every_provider_is_detected_from_its_start(name):
    n = negotiation()
    n.begin()
    actions = n.receive(STARTS[name], False)
    assert kinds(actions) == ["Chosen", "Started"]
    assert actions[0].framing.name == name == actions[1].started.provider


@pytest.mark.parametrize("name", sorted(STARTS))
def test_every_provider_can_be_configured(name):
    n = negotiation(name)
    [chosen] = n.begin()
    assert chosen.framing.name == name and chosen.why == "configured"
    assert n.state is State.WAITING_START and n.deadline == START
    assert kinds(n.receive(STARTS[name], False)) == ["Started"]


def test_the_provider_list_is_the_one_everybody_uses():
    from upvoot import options as config
    from upvoot.dial import providers

    assert PROVIDERS == ("raw", "exotel", "twilio", "plivo", "telnyx", "vonage")
    assert providers.PROVIDERS is PROVIDERS
    assert set(config._PROVIDERS) == {AUTO, *PROVIDERS}


# ---- connections that never become calls ------------------------------------------------


def test_connected_without_start_is_closed_after_start_timeout():
    n = negotiation()
    n.begin()
    n.receive(CONNECTED, False)
    assert n.deadline == START
    assert n.timeout() == [Close(CLOSE_NO_START, "no start message")] == [Close(4408, "no start message")]
    assert n.state is State.CLOSED and n.deadline is None
    assert n.receive(TWILIO_START, False) == [] and n.timeout() == []


def test_an_explicit_provider_waits_for_its_start_only_start_timeout():
    n = negotiation("twilio")
    n.begin()
    assert n.deadline == START  # issue 9 item 1: it used to wait forever
    assert n.receive(CONNECTED, False) == []
    assert n.timeout() == [Close(4408, "no start message")]


def test_bad_provider_parameters_close_4400():
    n = negotiation("vonage", {"sample-rate": "12000"})
    assert n.begin() == [Close(CLOSE_BAD_PARAMETERS, "bad provider parameters")] == [Close(4400, "bad provider parameters")]
    assert n.state is State.CLOSED
    n = negotiation(AUTO, {"sample-rate": "12000"})
    n.begin()
    assert n.receive(VONAGE_CONNECTED, False) == [Close(4400, "bad provider parameters")]
    assert negotiation("jambonz").begin() == [Close(4400, "bad provider parameters")]


def test_more_than_max_early_frames_without_a_start_close_4002():
    n = negotiation()
    n.begin()
    for _ in range(50):
        assert n.receive(CONNECTED, False) == []
    assert n.receive(CONNECTED, False) == [Close(CLOSE_UNRECOGNISED, "unrecognised protocol")]
    assert CLOSE_UNRECOGNISED == 4002 and n.state is State.CLOSED
    n = negotiation("twilio", max_early_frames=5)
    n.begin()
    for i in range(5):
        assert n.receive(media(i), False) == []  # media before start: held (its errors), not delivered
    assert n.receive(media(6), False) == [Close(4002, "unrecognised protocol")]


def test_close_codes_are_sendable_by_a_server():
    for code in (CLOSE_BAD_PARAMETERS, CLOSE_NO_START, CLOSE_UNRECOGNISED):
        assert 3000 <= code <= 4999


# ---- early frames ----------------------------------------------------------------------


def test_early_events_are_held_then_delivered_after_start_in_order():
    n = negotiation("twilio")
    n.begin()
    assert n.receive(media(1), False) == []
    assert n.receive(twilio("dtmf", dtmf={"digit": "5"}), False) == []
    assert n.receive(twilio("mark", mark={"name": "m0"}), False) == []
    actions = n.receive(TWILIO_START, False)
    assert kinds(actions) == ["Started", "Deliver", "Deliver", "Deliver"]
    assert [a.event for a in actions[1:]] == [
        ProtocolError("media before start (dropped)"), Dtmf("5"), ProtocolError("mark 'm0' was not pending")]


def test_frames_before_detection_are_replayed_to_the_chosen_codec_in_order():
    n = negotiation()
    n.begin()
    n.receive(CONNECTED, False)
    assert n.receive(twilio("dtmf", dtmf={"digit": "7"}), False) == []
    actions = n.receive(TWILIO_START, False)
    assert kinds(actions) == ["Chosen", "Started", "Deliver"] and actions[2] == Deliver(Dtmf("7"))


def test_output_queued_before_the_start_is_replied_on_start():
    n = negotiation("twilio")
    [chosen] = n.begin()
    framing = chosen.framing
    assert framing.audio(bytes(640)) + framing.mark("m1") + framing.audio_end(False) == []  # no streamSid yet
    actions = n.receive(TWILIO_START, False)
    assert kinds(actions) == ["Started", "Reply"]
    frames = actions[1].frames
    assert frames and all(isinstance(f, Frame) for f in frames)
    assert json.loads(frames[-1].payload) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}}
    assert n.receive(twilio("mark", mark={"name": "m1"}), False) == [Deliver(PlayoutMark("m1"))]


def test_jambonz_metadata_decides_nothing_and_its_audio_picks_raw():
    assert detect(JAMBONZ_METADATA.decode()) == JAMBONZ
    n = negotiation()
    n.begin()
    assert n.receive(JAMBONZ_METADATA, False) == []
    assert n.state is State.WAITING_FIRST and n.deadline == DETECT  # not a provider's "connected"
    actions = n.receive(b"\x00\x00", True)
    assert kinds(actions) == ["Chosen", "Started", "Deliver", "Deliver"]
    assert actions[0].framing.name == "raw"
    assert isinstance(actions[2].event, ProtocolError)  # the metadata, replayed to raw: answered with an error
    assert actions[3] == Deliver(CallerAudio(b"\x00\x00"))


# ---- hostile first frames (issue 9 item 8) -----------------------------------------------


def test_deep_json_as_the_first_frame_is_an_error_reply_not_a_traceback():
    n = negotiation()
    n.begin()
    actions = n.receive(DEEP, False)
    assert kinds(actions) == ["Chosen", "Started", "Deliver"]
    assert actions[0].framing.name == "raw" and isinstance(actions[2].event, ProtocolError)
    assert detect(DEEP.decode()) is None


@pytest.mark.parametrize("name", sorted(STARTS))
def test_deep_json_before_a_configured_providers_start(name):
    n = negotiation(name)
    n.begin()
    assert n.receive(DEEP, False) == []
    actions = n.receive(STARTS[name], False)
    assert kinds(actions) == ["Started", "Deliver"] and isinstance(actions[1].event, ProtocolError)
    assert [type(a.event) for a in n.receive(DEEP, False)] == [ProtocolError]  # and mid-call


# ---- the timer ------------------------------------------------------------------------


def test_with_a_clock_frames_do_not_extend_the_start_wait():
    clock = task.Clock()
    n = negotiation("twilio", clock=clock)
    n.begin()
    assert n.deadline == START
    for _ in range(9):
        clock.advance(1.0)
        n.receive(CONNECTED, False)
    assert n.deadline == pytest.approx(START - 9.0)
    clock.advance(5.0)
    assert n.deadline == 0.0
    assert n.timeout() == [Close(4408, "no start message")]


def test_with_a_clock_the_detected_provider_keeps_the_start_wait_it_began():
    clock = task.Clock()
    n = negotiation(clock=clock)
    n.begin()
    clock.advance(0.1)
    n.receive(CONNECTED, False)
    clock.advance(4.0)
    assert n.deadline == pytest.approx(START - 4.0)


def test_actions_are_frozen():
    n = negotiation("raw")
    chosen, started = n.begin()
    for action, field in ((chosen, "why"), (started, "started"), (Close(4408, "x"), "code"),
                          (Deliver(Dtmf("1")), "event"), (Reply([]), "frames")):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(action, field, None)


def test_receive_before_begin_is_ignored():
    n = negotiation()
    assert n.receive(b"\x00\x00", True) == [] and n.timeout() == [] and n.deadline is None
