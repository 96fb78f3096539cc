"""The provider codecs (sans-IO): G.711, streaming conversion, chunking,
each provider's messages as documented, dialect detection, and properties
(no input makes a codec raise; no output breaks a provider's rules)."""

from __future__ import annotations

import base64
import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upvoot import audio
from upvoot.framing import g711
from upvoot.framing.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    Dtmf,
    FRAMING_MEMBERS,
    EndCallRequested,
    Frame,
    Framing,
    PlayoutMark,
    ProtocolError,
)
from upvoot.framing import convert
from upvoot.framing.convert import Chunker, Decoder, Encoder, Outbound
from upvoot.framing.negotiate import detect, make_framing
from upvoot.framing.exotel import ExotelFraming
from upvoot.framing.plivo import PlivoFraming
from upvoot.framing.raw import RawFraming
from upvoot.framing.telnyx import TelnyxFraming
from upvoot.framing.twilio import TwilioFraming
from upvoot.framing.vonage import VonageFraming

EVENT_TYPES = (CallStarted, CallerAudio, Dtmf, PlayoutMark, EndCallRequested, CallStopped, ProtocolError)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def j(obj: object) -> str:
    return json.dumps(obj)


# ---- documented example messages ----------------------------------------------

EXOTEL_START = {
    "event": "start",
    "sequence_number": "1",
    "stream_sid": "MZ0001",
    "start": {
        "stream_sid": "MZ0001",
        "call_sid": "CA0001",
        "account_sid": "AC0001",
        "from": "+919876543210",
        "to": "+918047491899",
        "custom_parameters": {"key1": "value1"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
    },
}

TWILIO_START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC0001",
        "streamSid": "MZ0001",
        "callSid": "CA0001",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane"},
    },
    "streamSid": "MZ0001",
}

PLIVO_START = {
    "event": "start",
    "sequenceNumber": 1,
    "start": {
        "callId": "12345678-1234-1234-1234-123456789abc",
        "streamId": "87654321-4321-4321-4321-cba987654321",
        "accountId": "MAXXXXXXXXXXXXXXXXXX",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 8000},
    },
    "extra_headers": "userId=12345;sessionId=abc-xyz",
}

TELNYX_START = {
    "event": "start",
    "sequence_number": "1",
    "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
    "start": {
        "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
        "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
        "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f",
        "from": "+13122010094",
        "to": "+13122123456",
        "tags": ["TAG1", "TAG2"],
        "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
        "custom_parameters": {"customer_id": "customer_123"},
        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
    },
}

VONAGE_CONNECTED = {"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "prop1": "value1"}


def exotel_media(pcm: bytes, n: int = 2) -> str:
    return j({"event": "media", "sequence_number": str(n + 1), "stream_sid": "MZ0001",
              "media": {"chunk": str(n), "timestamp": str(n * 100), "payload": b64(pcm)}})


def twilio_media(ulaw: bytes, n: int = 1) -> str:
    return j({"event": "media", "sequenceNumber": str(n + 1), "streamSid": "MZ0001",
              "media": {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n), "payload": b64(ulaw)}})


def plivo_media(data: bytes, n: int = 1) -> str:
    return j({"event": "media", "sequenceNumber": n + 1, "streamId": PLIVO_START["start"]["streamId"],
              "media": {"track": "inbound", "timestamp": "1705312200000", "chunk": n, "payload": b64(data)}})


def telnyx_media(data: bytes, n: int = 1) -> str:
    return j({"event": "media", "sequence_number": str(n + 1), "stream_id": TELNYX_START["stream_id"],
              "media": {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n), "payload": b64(data)}})


# ---- per-provider adapters used by the generic tests ----------------------------


class Spec:
    """How to start a codec, feed it audio and read its outbound audio."""

    def __init__(self, name, make, start, inbound, media_of, check_frame):
        self.name, self.make, self.start = name, make, start
        self.inbound, self.media_of, self.check_frame = inbound, media_of, check_frame

    def started(self):
        codec = self.make()
        events = codec.receive_text(j(self.start))
        assert any(isinstance(e, CallStarted) for e in events), events
        return codec

    def __repr__(self):
        return self.name


def _json_media(frame: Frame) -> bytes | None:
    assert isinstance(frame.payload, str)
    msg = json.loads(frame.payload)
    if msg.get("event") in ("media", "playAudio"):
        return base64.b64decode(msg["media"]["payload"])
    return None


def _check_exotel(frame: Frame) -> None:
    msg = json.loads(frame.payload)
    assert msg["stream_sid"] == "MZ0001"
    assert msg["event"] in ("media", "mark", "clear")
    if msg["event"] == "media":
        n = len(base64.b64decode(msg["media"]["payload"]))
        assert 3200 <= n <= 100_000 and n % 320 == 0, n
        assert msg["media"]["chunk"].isdigit() and msg["media"]["timestamp"].isdigit()


def _check_twilio(frame: Frame) -> None:
    msg = json.loads(frame.payload)
    assert msg["streamSid"] == "MZ0001"
    assert msg["event"] in ("media", "mark", "clear")
    if msg["event"] == "media":
        assert len(base64.b64decode(msg["media"]["payload"])) == 160


def _check_plivo(frame: Frame) -> None:
    msg = json.loads(frame.payload)
    assert msg["event"] in ("playAudio", "checkpoint", "clearAudio")
    if msg["event"] == "playAudio":
        media = msg["media"]
        assert media["contentType"] == "audio/x-l16" and media["sampleRate"] == 8000
        assert len(base64.b64decode(media["payload"])) == 320
    else:
        assert msg["streamId"] == PLIVO_START["start"]["streamId"]


def _check_telnyx(frame: Frame) -> None:
    msg = json.loads(frame.payload)
    assert msg["event"] in ("media", "mark", "clear")
    if msg["event"] == "media":
        n = len(base64.b64decode(msg["media"]["payload"]))
        assert n >= 160 and n % 160 == 0  # whole 20 ms PCMU frames, at least 20 ms


def _check_vonage(frame: Frame) -> None:
    if frame.is_binary:
        assert len(frame.payload) == 640
    else:
        msg = json.loads(frame.payload)
        assert msg["action"] in ("notify", "clear")


SPECS = [
    Spec("exotel", ExotelFraming, EXOTEL_START,
         lambda data, n: exotel_media(data, n), _json_media, _check_exotel),
    Spec("twilio", TwilioFraming, TWILIO_START,
         lambda data, n: twilio_media(data, n), _json_media, _check_twilio),
    Spec("plivo", PlivoFraming, PLIVO_START,
         lambda data, n: plivo_media(data, n), _json_media, _check_plivo),
    Spec("telnyx", TelnyxFraming, TELNYX_START,
         lambda data, n: telnyx_media(data, n), _json_media, _check_telnyx),
    Spec("vonage", VonageFraming, VONAGE_CONNECTED,
         lambda data, n: data, lambda f: f.payload if f.is_binary else None, _check_vonage),
]


def feed(codec, frame):
    return codec.receive_binary(frame) if isinstance(frame, bytes) else codec.receive_text(frame)


def pcm_of(events) -> bytes:
    return b"".join(e.pcm for e in events if isinstance(e, CallerAudio))


def peak_hz(pcm: bytes, rate: int = audio.RATE) -> float:
    x = audio.to_int16(pcm).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def middle(pcm: bytes, trim_s: float = 0.15) -> bytes:
    k = int(trim_s * audio.RATE) * 2
    return pcm[k:-k]


# ---- G.711 ------------------------------------------------------------------------


def _ulaw_scalar(sample: int) -> int:
    """G.711 μ-law for one sample, written out plainly for cross-checking."""
    v = sample >> 2  # 14-bit
    mask = 0xFF
    if v < 0:
        v, mask = -v, 0x7F
    v = min(v, 8159) + 33
    seg = next((i for i in range(8) if v <= (0x3F << i) | ((1 << i) - 1)), 8)
    if seg == 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((v >> (seg + 1)) & 0xF)) ^ mask


def _ulaw_expand(code: int) -> int:
    u = ~code & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84 << ((u >> 4) & 7)) - 0x84
    return -magnitude if u & 0x80 else magnitude


def test_g711_known_values():
    assert g711.ulaw_encode(b"\x00\x00") == b"\xff"
    assert list(g711.ulaw_decode(b"\xff\x7f\x00\x80")) == [0, 0, -32124, 32124]
    assert g711.alaw_encode(b"\x00\x00") == b"\xd5"
    assert list(g711.alaw_decode(b"\xd5\x55\x2a\xaa")) == [8, -8, -32256, 32256]
    extremes = np.array([32767, -32768], dtype="<i2").tobytes()
    assert g711.ulaw_encode(extremes) == b"\x80\x00"
    assert g711.alaw_encode(extremes) == b"\xaa\x2a"


def test_g711_round_trip_all_codes():
    codes = bytes(range(256))
    ulaw_back = g711.ulaw_encode(g711.ulaw_decode(codes))
    assert [c for c in range(256) if ulaw_back[c] != c] == [0x7F]  # negative zero -> 0xFF
    assert ulaw_back[0x7F] == 0xFF
    assert g711.alaw_encode(g711.alaw_decode(codes)) == codes


def test_g711_monotonic_and_scalar_reference():
    x = np.arange(-32768, 32768, dtype=np.int16)
    for enc, dec in ((g711.ulaw_encode, g711.ulaw_decode), (g711.alaw_encode, g711.alaw_decode)):
        y = dec(enc(x)).astype(np.int64)
        assert np.all(np.diff(y) >= 0)  # quantising never reorders
        assert np.max(np.abs(y - x)) <= 1024  # largest step of the top segment
    probe = list(range(-32768, 32768, 97)) + [-1, 0, 1, 31, 32, 33, 8158 * 4, 32767]
    ours = g711.ulaw_encode(np.array(probe, dtype=np.int16))
    assert list(ours) == [_ulaw_scalar(s) for s in probe]
    assert list(g711.ulaw_decode(bytes(range(256)))) == [_ulaw_expand(c) for c in range(256)]


def test_g711_matches_audioop_when_present():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    allb = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert g711.ulaw_encode(allb) == audioop.lin2ulaw(allb, 2)
    assert g711.alaw_encode(allb) == audioop.lin2alaw(allb, 2)
    codes = bytes(range(256))
    assert g711.ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)
    assert g711.alaw_decode(codes).astype("<i2").tobytes() == audioop.alaw2lin(codes, 2)


# ---- conversion and chunking ------------------------------------------------------


def test_chunker_sizes_and_flush_padding():
    c = Chunker(3200, multiple=320, min_size=3200, max_size=100_000)
    assert c.push(b"\x01" * 3000) == []
    out = c.push(b"\x01" * 3500)
    assert [len(x) for x in out] == [3200, 3200] and c.pending == 100
    last = c.flush()
    assert [len(x) for x in last] == [3200] and last[0][:100] == b"\x01" * 100 and last[0][100:] == bytes(3100)
    assert c.flush() == []
    c2 = Chunker(3200, multiple=320, min_size=0, max_size=100_000, fill=b"\xff")
    c2.push(b"\x01" * 330)
    assert c2.flush() == [b"\x01" * 330 + b"\xff" * 310]
    with pytest.raises(ValueError):
        Chunker(3000, multiple=320)
    with pytest.raises(ValueError):
        Chunker(320, multiple=320, min_size=640)


@pytest.mark.parametrize("codec,rate", [("s16le", 8000), ("mulaw", 8000), ("alaw", 8000), ("s16be", 16000), ("s16le", 24000)])
def test_streaming_conversion_matches_one_shot(codec, rate):
    """Chunked conversion (odd split points included) gives the one-shot
    result: same length, and samples within soxr's ±2 LSB of rounding."""

    def samples(data: bytes) -> np.ndarray:
        from upvoot.framing.convert import decode

        return decode(data, codec).astype(np.int64)

    pcm = audio.tone(700, 0.5)
    whole = Encoder(codec, rate)
    one_shot = whole.feed(pcm) + whole.flush()
    parts = Encoder(codec, rate)
    chunked = b"".join(parts.feed(pcm[i : i + 641]) for i in range(0, len(pcm), 641)) + parts.flush()
    assert len(chunked) == len(one_shot)
    if codec in ("s16le", "s16be"):
        assert np.max(np.abs(samples(chunked) - samples(one_shot))) <= 2
    dec_whole = Decoder(codec, rate)
    back = dec_whole.feed(one_shot) + dec_whole.flush()
    dec_parts = Decoder(codec, rate)
    back_chunked = b"".join(dec_parts.feed(one_shot[i : i + 161]) for i in range(0, len(one_shot), 161)) + dec_parts.flush()
    assert len(back_chunked) == len(back) == len(pcm)
    assert np.max(np.abs(audio.to_int16(back_chunked).astype(int) - audio.to_int16(back).astype(int))) <= 2
    assert abs(peak_hz(middle(back)) - 700) < 5
    assert abs(audio.rms_dbfs(middle(back)) - (-12.0)) < 0.5
    # no click where the chunks meet: the chunked result is as clean as one-shot
    err = audio.to_int16(middle(back_chunked)).astype(float) - audio.to_int16(middle(pcm)).astype(float)
    assert 20 * np.log10(np.sqrt(np.mean(err**2)) / 32768 + 1e-12) < -30


def test_outbound_holds_marks_until_their_audio_is_out():
    out = Outbound("s16le", 8000, Chunker(3200, multiple=320, min_size=3200, max_size=100_000))
    items = out.push(audio.tone(440, 0.1)) + out.mark("a")
    assert "a" not in items  # its audio is still held
    items = out.push(audio.tone(440, 0.5))
    assert "a" in items
    idx = items.index("a")
    sent_before = sum(len(x) for x in items[:idx] if isinstance(x, bytes))
    assert sent_before >= 800 * 2  # every sample of the first 100 ms went out first
    items = out.mark("b") + out.end()
    assert items[-1] == "b" and all(len(x) % 320 == 0 for x in items if isinstance(x, bytes))


@pytest.mark.parametrize("rate,codec", [(8000, "s16le"), (8000, "mulaw"), (24000, "s16le")])
def test_a_primed_outbound_encodes_a_resume_as_the_uninterrupted_stream(rate, codec):
    rng = np.random.default_rng(7)
    pcm = (rng.normal(0, 3000, 16000) + 8000 * np.sin(np.arange(16000) / 5)).astype("<i2").tobytes()  # 1 s
    chunk = rate // 10 * (2 if codec == "s16le" else 1)
    whole = Outbound(codec, rate, Chunker(chunk))
    stream = b"".join(x for x in whole.push(pcm) + whole.end() if isinstance(x, bytes))
    at = 12800  # the resume point: 400 ms in, 16 kHz bytes
    out_at = at // 2 * rate // 16000 * (2 if codec == "s16le" else 1)
    for prime in (True, False):
        out = Outbound(codec, rate, Chunker(chunk))
        out.push(pcm[:at + 4000])
        assert out.drop() == []
        if prime:
            out.prime(pcm[at - 1280:at])  # the 40 ms heard before the resume point
        resumed = b"".join(x for x in out.push(pcm[at:]) + out.end() if isinstance(x, bytes))
        assert len(resumed) == len(stream) - out_at, "the prime sends nothing and takes no place"
        a, b = convert.decode(stream[out_at:], codec), convert.decode(resumed, codec)
        worst = int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
        if prime:
            assert worst <= (4 if codec == "s16le" else 300), worst  # mu-law: a step of its coarse scale
        else:
            assert worst > 500, "an unprimed resampler's start differs (what the prime is for)"


# ---- round trip of a tone through each codec --------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_codec_implements_the_framing_protocol(spec):
    codec = spec.make()
    assert isinstance(codec.name, str) and isinstance(codec.acknowledges_playout, bool)
    for method in ("receive_text", "receive_binary", "audio_start", "audio", "audio_end", "mark", "clear",
                   "transcript", "interim", "turn_start", "event"):
        assert callable(getattr(codec, method))
    assert codec.transcript("agent", "x") == codec.interim("x") == codec.turn_start() == []
    assert codec.event("error", message="m") == []


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_tone_round_trip(spec):
    sender = spec.started()
    frames = sender.audio_start()
    tone = audio.tone(1000, 1.0)
    for i in range(0, len(tone), audio.FRAME_BYTES):
        frames += sender.audio(tone[i : i + audio.FRAME_BYTES])
    frames += sender.audio_end(False)
    for f in frames:
        spec.check_frame(f)
    payloads = [p for p in map(spec.media_of, frames) if p is not None]
    assert payloads
    receiver = spec.started()
    events = []
    for n, p in enumerate(payloads, start=2):
        events += feed(receiver, spec.inbound(p, n))
    assert not [e for e in events if isinstance(e, ProtocolError)]
    got = pcm_of(events)
    assert len(got) >= 0.75 * len(tone)
    assert abs(peak_hz(middle(got)) - 1000) < 5
    assert abs(audio.rms_dbfs(middle(got)) - (-12.0)) < 1.0


# ---- Exotel -----------------------------------------------------------------------


def test_exotel_start_and_events_from_docs():
    f = ExotelFraming()
    assert f.receive_text(j({"event": "connected"})) == []
    [started] = f.receive_text(j(EXOTEL_START))
    assert started == CallStarted(provider="exotel", call_id="CA0001", stream_id="MZ0001",
                                  from_number="+919876543210", to_number="+918047491899",
                                  custom={"key1": "value1"})
    events = []
    for n in range(2, 6):  # ~100 ms per message (Exotel-WS); soxr answers in blocks
        events += f.receive_text(exotel_media(audio.silence(0.1, 8000), n))
    assert events and all(isinstance(e, CallerAudio) for e in events)
    assert f.receive_text(j({"event": "dtmf", "sequence_number": "7", "stream_sid": "MZ0001",
                             "dtmf": {"digit": "5", "duration": "100"}})) == [Dtmf("5")]
    assert f.receive_text(j({"event": "clear", "stream_sid": "MZ0001"})) == []
    events = f.receive_text(j({"event": "stop", "sequence_number": "20", "stream_sid": "MZ0001",
                               "stop": {"call_sid": "CA0001", "account_sid": "AC0001", "reason": "callended"}}))
    assert events[-1] == CallStopped("callended")


def test_exotel_camel_case_capitalised_and_numbers():
    f = ExotelFraming()
    msg = {"Event": "start", "streamSid": "MZ9",
           "start": {"streamSid": "MZ9", "callSid": "CA9", "accountSid": "AC9",
                     "customParameters": {"n": 3}, "mediaFormat": {"sampleRate": 16000}}}
    [started] = f.receive_text(j(msg))
    assert (started.call_id, started.stream_id, started.custom) == ("CA9", "MZ9", {"n": "3"})
    assert f._out.rate == 16000
    events = f.receive_text(j({"Event": "media", "Media": {"Payload": b64(audio.silence(0.1, 16000))}}))
    assert [type(e) for e in events] == [CallerAudio]


@pytest.mark.parametrize(
    "url_rate,start_rate,expected",
    [(None, None, 8000), (16000, None, 16000), (24000, "16000", 16000), (None, 24000, 24000), (16000, "44100", 16000)],
)
def test_exotel_sample_rate_priority(url_rate, start_rate, expected):
    params = {} if url_rate is None else {"sample-rate": str(url_rate)}
    f = make_framing("exotel", params)
    msg = json.loads(j(EXOTEL_START))
    if start_rate is None:
        del msg["start"]["media_format"]["sample_rate"]
    else:
        msg["start"]["media_format"]["sample_rate"] = start_rate
    events = f.receive_text(j(msg))
    assert f._out.rate == expected and f._decoder.rate == expected
    assert any(isinstance(e, ProtocolError) for e in events) == (start_rate == "44100")


def test_exotel_url_parameter_spellings():
    assert make_framing("exotel", {"sample_rate": "16000"})._url_rate == 16000
    with pytest.raises(ValueError):
        make_framing("exotel", {"sample-rate": "11025"})


def test_exotel_chunks_at_16k_and_24k():
    for rate, size in ((16000, 3200), (24000, 4800)):
        f = make_framing("exotel", {"sample-rate": str(rate)})
        msg = json.loads(j(EXOTEL_START))
        del msg["start"]["media_format"]["sample_rate"]
        f.receive_text(j(msg))
        frames = f.audio(audio.tone(300, 1.0)) + f.audio_end(False)
        sizes = [len(_json_media(fr)) for fr in frames if _json_media(fr) is not None]
        assert sizes[:-1] == [size] * (len(sizes) - 1)
        assert sizes[-1] % 320 == 0 and 3200 <= sizes[-1] <= size


def test_exotel_buffers_before_start_and_releases_on_start():
    f = ExotelFraming()
    assert f.audio(audio.tone(440, 0.6)) == []
    assert f.mark("greeting") == []
    assert f.audio_end(False) == []
    f.receive_text(j(EXOTEL_START))
    frames = f.drain()
    assert f.drain() == []
    for fr in frames:
        _check_exotel(fr)
    kinds = [json.loads(fr.payload)["event"] for fr in frames]
    assert kinds[-1] == "mark" and kinds.count("media") == 3  # 0.6 s at 8 kHz = 9,600 bytes
    stamps = [json.loads(fr.payload)["media"] for fr in frames if json.loads(fr.payload)["event"] == "media"]
    assert [(m["chunk"], m["timestamp"]) for m in stamps] == [("1", "0"), ("2", "200"), ("3", "400")]


def test_exotel_ready_frames_also_come_with_next_outbound_call():
    f = ExotelFraming()
    f.audio(audio.tone(440, 0.5))
    f.receive_text(j(EXOTEL_START))
    frames = f.turn_start()
    assert any(json.loads(x.payload)["event"] == "media" for x in frames)


def test_exotel_clear_before_start_keeps_marks():
    f = ExotelFraming()
    f.audio(audio.tone(440, 0.5))
    f.mark("m1")
    assert f.clear() == []
    f.receive_text(j(EXOTEL_START))
    frames = f.drain()
    assert [json.loads(x.payload) for x in frames] == [{"event": "mark", "stream_sid": "MZ0001", "mark": {"name": "m1"}}]


def test_exotel_marks_and_clear():
    f = ExotelFraming()
    f.receive_text(j(EXOTEL_START))
    f.audio(audio.tone(440, 0.3))
    frames = f.mark("m1") + f.audio_end(False)
    assert json.loads(frames[-1].payload) == {"event": "mark", "stream_sid": "MZ0001", "mark": {"name": "m1"}}
    assert f.receive_text(j({"event": "mark", "stream_sid": "MZ0001", "mark": {"name": "m1"}})) == [PlayoutMark("m1")]
    f.audio(audio.tone(440, 0.5))
    f.mark("m2")
    f.audio(audio.tone(440, 0.5))
    frames = f.clear()
    msgs = [json.loads(x.payload) for x in frames]
    assert {"event": "clear", "stream_sid": "MZ0001"} in msgs
    # Exotel's clear lets the playing chunk finish: a mark it still echoes has played
    assert f.receive_text(j({"event": "mark", "mark": {"name": "m2"}})) == [PlayoutMark("m2")]
    [err] = f.receive_text(j({"event": "mark", "mark": {"name": "never-sent"}}))
    assert isinstance(err, ProtocolError)


def test_exotel_malformed_and_out_of_order():
    f = ExotelFraming()
    for bad in ("not json", "[1,2]", j({"no": "event"}), j({"event": "bogus"}),
                exotel_media(b"\x00\x00"), j({"event": "media", "media": {"payload": "%%%"}}),
                j({"event": "dtmf", "dtmf": {}}), j({"event": "mark", "mark": {}})):
        events = f.receive_text(bad)
        assert events and all(isinstance(e, ProtocolError) for e in events), bad
    assert isinstance(f.receive_binary(b"\x00\x01")[0], ProtocolError)
    f.receive_text(j(EXOTEL_START))
    assert isinstance(f.receive_text(j(EXOTEL_START))[0], ProtocolError)  # duplicate start
    f.receive_text(j({"event": "stop", "stop": {"reason": "stopped"}}))
    assert isinstance(f.receive_text(exotel_media(b"\x00\x00"))[0], ProtocolError)


def test_exotel_has_no_channel_for_transcripts():
    f = ExotelFraming()
    f.receive_text(j(EXOTEL_START))
    assert f.transcript("caller", "hi") == [] and f.interim("h") == []
    assert f.turn_start() == [] and f.event("error", message="x") == [] and f.audio_start() == []


# ---- Twilio -----------------------------------------------------------------------


def test_twilio_messages_from_docs():
    f = TwilioFraming()
    assert f.receive_text(j({"event": "connected", "protocol": "Call", "version": "1.0.0"})) == []
    [started] = f.receive_text(j(TWILIO_START))
    assert started == CallStarted(provider="twilio", call_id="CA0001", stream_id="MZ0001", custom={"FirstName": "Jane"})
    events = []
    for n in range(1, 11):
        events += f.receive_text(twilio_media(b"\xff" * 160, n))
    assert events and all(isinstance(e, CallerAudio) for e in events)
    outbound = j({"event": "media", "streamSid": "MZ0001",
                  "media": {"track": "outbound", "chunk": "1", "timestamp": "5", "payload": b64(b"\x00" * 160)}})
    assert f.receive_text(outbound) == []
    assert f.receive_text(j({"event": "dtmf", "streamSid": "MZ0001", "sequenceNumber": "5",
                             "dtmf": {"track": "inbound_track", "digit": "1"}})) == [Dtmf("1")]
    stop = j({"event": "stop", "sequenceNumber": "5", "streamSid": "MZ0001",
              "stop": {"accountSid": "AC0001", "callSid": "CA0001"}})
    assert f.receive_text(stop)[-1] == CallStopped("stopped")


def test_twilio_whole_frames_and_silence_padding():
    f = TwilioFraming()
    f.receive_text(j(TWILIO_START))
    frames = f.audio(audio.tone(440, 0.105)) + f.audio_end(False)
    payloads = [_json_media(x) for x in frames]
    assert all(p is not None and len(p) == 160 for p in payloads)
    assert payloads[-1].endswith(b"\xff")  # μ-law silence, not 0x00
    total = sum(len(p) for p in payloads)
    assert total == 160 * 6  # 105 ms -> 840 samples -> six whole frames


def test_twilio_clear_returns_marks_as_cleared():
    f = TwilioFraming()
    f.receive_text(j(TWILIO_START))
    frames = f.audio(audio.tone(440, 0.2))
    frames += f.mark("a")
    frames += f.audio(audio.tone(440, 0.2))
    frames += f.mark("b")
    frames += f.audio(audio.tone(440, 0.2))
    frames += f.clear()
    msgs = [json.loads(x.payload) for x in frames]
    assert {"event": "clear", "streamSid": "MZ0001"} in msgs
    assert {"event": "mark", "streamSid": "MZ0001", "mark": {"name": "a"}} in msgs
    assert f.receive_text(j({"event": "mark", "streamSid": "MZ0001", "mark": {"name": "a"}})) == [PlayoutMark("a", cleared=True)]
    assert f.receive_text(j({"event": "mark", "streamSid": "MZ0001", "mark": {"name": "b"}})) == [PlayoutMark("b", cleared=True)]


def test_twilio_interrupted_end_drops_the_rest():
    f = TwilioFraming()
    f.receive_text(j(TWILIO_START))
    f.audio(audio.tone(440, 0.05))
    f.mark("tail")
    frames = f.audio_end(True)
    assert [json.loads(x.payload)["event"] for x in frames] == ["mark"]
    assert f.receive_text(j({"event": "mark", "mark": {"name": "tail"}})) == [PlayoutMark("tail", cleared=True)]


# ---- Plivo ------------------------------------------------------------------------


def test_plivo_messages_from_docs():
    f = PlivoFraming()
    [started] = f.receive_text(j(PLIVO_START))
    assert started.call_id == PLIVO_START["start"]["callId"]
    assert started.stream_id == PLIVO_START["start"]["streamId"]
    assert started.custom["userId"] == "12345" and started.custom["sessionId"] == "abc-xyz"
    events = []
    for n in range(1, 11):
        events += f.receive_text(plivo_media(audio.silence(0.02, 8000), n))
    assert events and all(isinstance(e, CallerAudio) for e in events)
    assert f.receive_text(j({"event": "dtmf", "dtmf": {"digit": "9"}})) == [Dtmf("9")]
    f.audio(audio.tone(440, 0.1))
    frames = f.mark("customer greeting audio") + f.audio_end(False)
    msgs = [json.loads(x.payload) for x in frames]
    assert msgs[-1] == {"event": "checkpoint", "streamId": PLIVO_START["start"]["streamId"], "name": "customer greeting audio"}
    played = {"event": "playedStream", "streamId": PLIVO_START["start"]["streamId"], "name": "customer greeting audio"}
    assert f.receive_text(j(played)) == [PlayoutMark("customer greeting audio")]


def test_plivo_played_alias_and_cleared_audio():
    f = PlivoFraming()
    f.receive_text(j(PLIVO_START))
    f.audio(audio.tone(440, 0.2))
    f.mark("x")
    f.mark("y")
    f.audio_end(False)
    assert f.receive_text(j({"event": "played", "name": "x"})) == [PlayoutMark("x")]
    frames = f.clear()
    assert json.loads(frames[-1].payload) == {"event": "clearAudio", "streamId": PLIVO_START["start"]["streamId"]}
    f.mark("after-clear")  # sent after our clear: not released by the clearedAudio answer
    assert f.receive_text(j({"event": "clearedAudio", "streamId": "s"})) == [PlayoutMark("y", cleared=True)]
    assert f.receive_text(j({"event": "playedStream", "name": "after-clear"})) == [PlayoutMark("after-clear")]


def test_plivo_mulaw_stream_and_outbound_format():
    f = PlivoFraming()
    msg = json.loads(j(PLIVO_START))
    msg["start"]["mediaFormat"] = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
    f.receive_text(j(msg))
    frames = f.audio(audio.tone(440, 0.1)) + f.audio_end(False)
    media = [json.loads(x.payload)["media"] for x in frames]
    assert {(m["contentType"], m["sampleRate"]) for m in media} == {("audio/x-mulaw", 8000)}
    assert all(len(base64.b64decode(m["payload"])) == 160 for m in media)


def test_plivo_16k_l16():
    f = PlivoFraming()
    msg = json.loads(j(PLIVO_START))
    msg["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000}
    f.receive_text(j(msg))
    frames = f.audio(audio.tone(440, 0.1)) + f.audio_end(False)
    assert all(json.loads(x.payload)["media"]["sampleRate"] == 16000 for x in frames)
    assert all(len(base64.b64decode(json.loads(x.payload)["media"]["payload"])) == 640 for x in frames)


# ---- Telnyx -----------------------------------------------------------------------


def test_telnyx_messages_from_docs():
    f = TelnyxFraming()
    assert f.receive_text(j({"event": "connected", "version": "1.0.0"})) == []
    [started] = f.receive_text(j(TELNYX_START))
    assert started.call_id == TELNYX_START["start"]["call_control_id"]
    assert started.stream_id == TELNYX_START["stream_id"]
    assert (started.from_number, started.to_number) == ("+13122010094", "+13122123456")
    assert started.custom["customer_id"] == "customer_123"
    assert started.custom["client_state"] == "aGF2ZSBhIG5pY2UgZGF5ID1d"
    assert f.receive_text(j({"event": "dtmf", "stream_id": "x", "occurred_at": "2024", "sequence_number": "5",
                             "dtmf": {"digit": "#"}})) == [Dtmf("#")]
    [err] = f.receive_text(j({"event": "error", "sequence_number": "6", "stream_id": "x",
                              "payload": {"code": 100003, "title": "malformed_frame", "detail": "Frame is malformed"}}))
    assert isinstance(err, ProtocolError) and "100003" in err.message and "malformed_frame" in err.message
    assert f.receive_text(j({"event": "stop", "sequence_number": "9", "stop": {}, "stream_id": "x"}))[-1] == CallStopped("stopped")


def test_telnyx_outbound_and_marks():
    f = TelnyxFraming()
    f.receive_text(j(TELNYX_START))
    f.audio(audio.tone(440, 0.1))
    frames = f.mark("m") + f.audio_end(False)
    msgs = [json.loads(x.payload) for x in frames]
    assert msgs[-1] == {"event": "mark", "mark": {"name": "m"}}
    assert all(set(m) == {"event", "media"} and set(m["media"]) == {"payload"} for m in msgs[:-1])
    assert f.receive_text(j({"event": "mark", "mark": {"name": "m"}})) == [PlayoutMark("m")]
    f.mark("pending")
    assert json.loads(f.clear()[-1].payload) == {"event": "clear"}
    assert f.receive_text(j({"event": "mark", "mark": {"name": "pending"}})) == [PlayoutMark("pending", cleared=True)]


def test_telnyx_out_of_order_media_is_dropped_not_replayed():
    f = TelnyxFraming()
    f.receive_text(j(TELNYX_START))
    chunk = b"\xff" * 160
    assert not any(isinstance(e, ProtocolError) for e in f.receive_text(telnyx_media(chunk, 1)))
    assert not any(isinstance(e, ProtocolError) for e in f.receive_text(telnyx_media(chunk, 3)))
    [late] = f.receive_text(telnyx_media(chunk, 2))
    assert isinstance(late, ProtocolError)
    [dup] = f.receive_text(telnyx_media(chunk, 3))
    assert isinstance(dup, ProtocolError)
    assert not any(isinstance(e, ProtocolError) for e in f.receive_text(telnyx_media(chunk, 4)))


def test_telnyx_l16_big_endian_and_unknown_codec():
    f = TelnyxFraming(codec="L16")
    msg = json.loads(j(TELNYX_START))
    msg["start"]["media_format"] = {"encoding": "L16", "sample_rate": 16000, "channels": 1}
    f.receive_text(j(msg))
    be = np.array([1000, -1000] * 160, dtype=">i2").tobytes()
    [a] = f.receive_text(telnyx_media(be, 1))
    assert list(audio.to_int16(a.pcm)[:2]) == [1000, -1000]
    out = f.audio(np.array([258] * 320, dtype="<i2").tobytes())
    assert _json_media(out[0])[:2] == b"\x01\x02"  # 258 = 0x0102, big-endian on the wire
    g = TelnyxFraming()
    msg["start"]["media_format"] = {"encoding": "OPUS", "sample_rate": 16000}
    events = g.receive_text(j(msg))
    assert isinstance(events[0], ProtocolError) and isinstance(events[-1], CallStarted)
    assert g.receive_text(telnyx_media(b"\x01\x02", 1)) == []


def test_telnyx_parameters():
    assert make_framing("telnyx", {"codec": "PCMA"}).out_codec == "alaw"
    assert make_framing("telnyx", {"codec": "L16", "sample-rate": "24000"}).out_rate == 24000
    for bad in ({"codec": "MP3"}, {"codec": "PCMU", "sample-rate": "16000"}, {"sample-rate": "x"}):
        with pytest.raises(ValueError):
            make_framing("telnyx", bad)


# ---- Vonage -----------------------------------------------------------------------


def test_vonage_connected_and_binary():
    f = VonageFraming()
    [err] = f.receive_binary(bytes(640))
    assert isinstance(err, ProtocolError)  # audio before websocket:connected
    [started] = f.receive_text(j(VONAGE_CONNECTED))
    assert started == CallStarted(provider="vonage", custom={"prop1": "value1"})
    [a] = f.receive_binary(bytes(640))
    assert a == CallerAudio(bytes(640))
    assert f.receive_binary(b"\x01") == []  # half a sample: carried
    [b] = f.receive_binary(b"\x02" + bytes(1))
    assert b.pcm[:2] == b"\x01\x02"


def test_vonage_exact_frames_commands_and_notify():
    f = VonageFraming()
    f.receive_text(j(VONAGE_CONNECTED))
    frames = f.audio(audio.tone(440, 0.07)) + f.mark("n1") + f.audio_end(False)
    binary = [x for x in frames if x.is_binary]
    assert [len(x.payload) for x in binary] == [640] * 4  # 70 ms -> 4 frames, the last zero-padded
    assert json.loads(frames[-1].payload) == {"action": "notify", "payload": {"name": "n1"}}
    assert f.receive_text(j({"event": "websocket:notify", "payload": {"name": "n1"}})) == [PlayoutMark("n1")]
    f.mark("n2")
    assert json.loads(f.clear()[0].payload) == {"action": "clear"}
    assert f.receive_text(j({"event": "websocket:cleared"})) == [PlayoutMark("n2", cleared=True)]
    assert f.receive_text(j({"event": "websocket:dtmf", "digit": "7"})) == [Dtmf("7")]
    assert f.receive_text(j({"event": "websocket:dtmf", "dtmf": {"digit": "8"}})) == [Dtmf("8")]
    assert f.acknowledges_playout is False


def test_vonage_8k():
    f = VonageFraming()
    f.receive_text(j({"event": "websocket:connected", "content-type": "audio/l16;rate=8000"}))
    frames = f.audio(audio.tone(440, 0.1)) + f.audio_end(False)
    assert {len(x.payload) for x in frames} == {320}
    [a] = [e for e in f.receive_binary(bytes(320 * 10)) if isinstance(e, CallerAudio)] or [CallerAudio(b"")]
    assert len(a.pcm) % 2 == 0


# ---- detection --------------------------------------------------------------------


def test_detect_from_first_frames():
    assert detect(b"\x00\x01") == "raw"
    assert detect(j(VONAGE_CONNECTED)) == "vonage"
    assert detect(j(TELNYX_START)) == "telnyx"
    assert detect(j(PLIVO_START)) == "plivo"
    assert detect(j(EXOTEL_START)) == "exotel"
    assert detect(j(TWILIO_START)) == "twilio"
    camel_exotel = {"Event": "start", "start": {"streamSid": "MZ", "callSid": "CA", "accountSid": "AC"}}
    assert detect(j(camel_exotel)) == "exotel"
    raw_camel = {"event": "start", "start": {"streamSid": "MZ", "callSid": "CA",
                                             "mediaFormat": {"encoding": "audio/x-raw"}}}
    assert detect(j(raw_camel)) == "exotel"
    assert detect(j({"callSid": "x", "sampleRate": 8000, "from": "a"})) == "jambonz"
    for undecidable in (j({"event": "connected"}), j({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
                        "not json", "[]", j({"event": "media"}), j({"type": "end_call"})):
        assert detect(undecidable) is None


def test_make_framing():
    assert isinstance(make_framing("raw", {}), RawFraming)
    for name, cls in (("exotel", ExotelFraming), ("twilio", TwilioFraming), ("plivo", PlivoFraming),
                      ("telnyx", TelnyxFraming), ("vonage", VonageFraming)):
        codec = make_framing(name, {})
        assert isinstance(codec, cls) and codec.name == name
    with pytest.raises(ValueError, match="no framing for provider 'jambonz'"):
        make_framing("jambonz", {})
    with pytest.raises(ValueError):
        make_framing("vonage", {"sample-rate": "12000"})


# ---- properties -------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
EVENT_NAMES = ["connected", "start", "media", "mark", "dtmf", "stop", "clear", "error", "playedStream", "played",
               "clearedAudio", "websocket:connected", "websocket:notify", "websocket:cleared", "websocket:dtmf",
               "Start", "silence", "bogus"]


def _mutate(template: dict, draw) -> dict:
    """A documented message with up to three fields replaced or removed."""
    msg = json.loads(json.dumps(template))
    paths = [(msg, k) for k in msg] + [(v, k) for v in msg.values() if isinstance(v, dict) for k in v]
    for _ in range(draw(st.integers(0, 3))):
        obj, key = draw(st.sampled_from(paths))
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key, None)
    return msg


@st.composite
def inbound_frames(draw, spec):
    kind = draw(st.sampled_from(["start", "media", "json", "text", "binary", "shaped"]))
    if kind == "start":
        return j(_mutate(spec.start, draw))
    if kind == "media":
        payload = draw(st.binary(max_size=700))
        frame = spec.inbound(payload, draw(st.integers(-2, 50)))
        return frame if isinstance(frame, bytes) else (j(_mutate(json.loads(frame), draw)) if draw(st.booleans()) else frame)
    if kind == "json":
        return j(draw(json_values))
    if kind == "text":
        return draw(st.text(max_size=40))
    if kind == "binary":
        return draw(st.binary(max_size=700))
    body = draw(st.dictionaries(st.sampled_from(["media", "mark", "dtmf", "stop", "start", "payload", "name", "digit",
                                                 "streamSid", "stream_sid", "content-type"]), json_values, max_size=4))
    body["event" if draw(st.booleans()) else "Event"] = draw(st.sampled_from(EVENT_NAMES))
    return j(body)


# pytest-twisted wraps every test function and trips over @given ones, so each
# property is a plain hypothesis function called from an ordinary test.


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_property_no_input_raises(spec):
    _no_input_raises(spec)


@FAST
@given(data=st.data())
def _no_input_raises(spec, data):
    codec = spec.make()
    frames = data.draw(st.lists(inbound_frames(spec), max_size=12))
    for frame in frames:
        events = feed(codec, frame)
        assert isinstance(events, list)
        for e in events:
            assert isinstance(e, EVENT_TYPES)
            if isinstance(e, CallerAudio):
                assert isinstance(e.pcm, bytes) and len(e.pcm) % 2 == 0
        # and the outbound side keeps working whatever came in
        for f in codec.audio(bytes(640)) + codec.drain():
            assert isinstance(f, Frame)


outbound_ops = st.lists(
    st.one_of(
        st.tuples(st.just("audio"), st.integers(0, 4000).map(lambda n: n * 2)),
        st.tuples(st.just("mark"), st.none()),
        st.tuples(st.just("clear"), st.none()),
        st.tuples(st.just("end"), st.booleans()),
        st.tuples(st.just("start"), st.none()),
        st.tuples(st.just("other"), st.none()),
    ),
    max_size=25,
)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_property_outbound_obeys_provider_rules(spec):
    _outbound_obeys_rules(spec)


@FAST
@given(ops=outbound_ops, seed=st.integers(0, 2**16))
def _outbound_obeys_rules(spec, ops, seed):
    codec = spec.make()
    rng = np.random.default_rng(seed)
    frames: list[Frame] = []
    marks_made = 0
    for op, arg in ops + [("start", None)]:
        if op == "audio":
            pcm = rng.integers(-20000, 20000, arg // 2, dtype=np.int16).astype("<i2").tobytes()
            frames += codec.audio(pcm)
        elif op == "mark":
            frames += codec.mark(f"m{marks_made}")
            marks_made += 1
        elif op == "clear":
            frames += codec.clear()
        elif op == "end":
            frames += codec.audio_end(arg)
        elif op == "start":
            codec.receive_text(j(spec.start))
            frames += codec.drain()
        else:
            frames += codec.transcript("agent", "x") + codec.interim("y") + codec.turn_start() + codec.audio_start()
    frames += codec.audio_end(False) + codec.drain()
    for f in frames:
        spec.check_frame(f)
    sent = []
    for f in frames:
        if f.is_binary:
            continue
        msg = json.loads(f.payload)
        if msg.get("event") in ("mark", "checkpoint"):
            sent.append(msg.get("name") or msg["mark"]["name"])
        elif msg.get("action") == "notify":
            sent.append(msg["payload"]["name"])
    assert sent == [f"m{i}" for i in range(marks_made)]  # every mark, once, in order


# ---- the whole Framing contract ------------------------------------------------------

ALL_CODECS = [("raw", RawFraming)] + [(s.name, s.make) for s in SPECS]


@pytest.mark.parametrize("name,make", ALL_CODECS, ids=[n for n, _ in ALL_CODECS])
def test_every_codec_provides_the_whole_framing_contract(name, make):
    codec = make()
    assert isinstance(codec, Framing)  # runtime-checkable Protocol: every member present
    for member in FRAMING_MEMBERS:
        assert hasattr(type(codec), member) or hasattr(codec, member), member
    assert codec.name == name and isinstance(codec.acknowledges_playout, bool)
    assert isinstance(codec.min_lead, float) and codec.min_lead >= 0.0
    # nothing held, nothing due on a fresh codec
    assert codec.flush() == [] and codec.drain() == []
    for frames in (codec.audio_start(), codec.audio(bytes(640)), codec.mark("m1"), codec.flush(), codec.drain(),
                   codec.clear(), codec.audio_end(False), codec.transcript("agent", "hi"), codec.interim("h"),
                   codec.turn_start(), codec.event("error", message="x")):
        assert isinstance(frames, list) and all(isinstance(f, Frame) for f in frames)


def test_exotel_min_lead_follows_its_chunk_once_started():
    spec = next(s for s in SPECS if s.name == "exotel")
    assert ExotelFraming().min_lead == 0.0
    codec = spec.started()
    assert codec.min_lead == pytest.approx(3200 / 16000 + 0.05)  # 200 ms chunk at 8 kHz + resampler block


def test_marks_fall_on_whole_outbound_chunks_of_at_least_100ms():
    # bytes of 16 kHz audio: Exotel's 3,200-byte minimum is 200 ms at 8 kHz, 100 ms at 16 and 24 kHz
    for rate, every in ((8000, 6400), (16000, 3200), (24000, 3200)):
        codec = ExotelFraming()
        codec.receive_text(json.dumps({"event": "start", "stream_sid": "s", "start": {
            "stream_sid": "s", "media_format": {"encoding": "audio/x-raw", "sample_rate": str(rate)}}}))
        assert codec.mark_every == every, rate
    assert ExotelFraming().mark_every == 3200, "before start: the contract's default"
    for name, make in ALL_CODECS:
        codec = make()
        assert isinstance(codec.mark_every, int) and codec.mark_every >= 3200 and codec.mark_every % 640 == 0, name


def test_the_provider_base_lives_in_provider_py_and_convert_is_audio_only():
    from upvoot.framing import convert, outbox, provider

    assert provider.ProviderFraming.__module__ == "upvoot.framing.provider"
    for name in ("ProviderFraming", "MarkBook", "Backlog"):
        assert not hasattr(convert, name)
    for name in ("MarkBook", "Backlog"):
        assert getattr(outbox, name).__module__ == "upvoot.framing.outbox"
    for helper in ("load_object", "pick", "text", "integer", "b64decode", "json_frame", "string_dict", "rate_param"):
        assert not hasattr(convert, helper)
    for cls in (ExotelFraming, TwilioFraming, PlivoFraming, TelnyxFraming, VonageFraming):
        assert issubclass(cls, provider.ProviderFraming)


# ---- bounded JSON (issue 9 item 8) -----------------------------------------------------

DEEP = "[" * 50000


@pytest.mark.parametrize("name,make", ALL_CODECS, ids=[n for n, _ in ALL_CODECS])
def test_deep_json_is_a_protocol_error_before_and_during_the_call(name, make):
    codec = make()
    for deep in (DEEP, "[" * 25000 + "]" * 25000, '{"a":' * 20000 + "1" + "}" * 20000):
        [error] = codec.receive_text(deep)  # first frame
        assert isinstance(error, ProtocolError)
    spec = next((s for s in SPECS if s.name == name), None)
    codec = spec.started() if spec else make()
    for deep in (DEEP, "[" * 25000 + "]" * 25000, "{" * 40000):
        [error] = codec.receive_text(deep)  # mid-call
        assert isinstance(error, ProtocolError), error
    if spec is not None:  # and the call goes on: media is still decoded, audio still sent
        events = [e for n in range(7, 17) for e in feed(codec, spec.inbound(bytes(640), n))]
        assert events and all(isinstance(e, CallerAudio) for e in events), events
        assert codec.audio(bytes(16000)) + codec.flush()


def test_json_bounds_depth_and_size():
    from upvoot.framing.jsonwire import MAX_DEPTH, MAX_TEXT, loads, nesting_error

    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(ok) is not None and not isinstance(loads(ok), ProtocolError)
    too_deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert loads(too_deep) == ProtocolError(f"text frame is nested deeper than {MAX_DEPTH} levels")
    assert loads(DEEP) == ProtocolError("text frame is not JSON")
    assert loads("not json") == ProtocolError("text frame is not JSON")
    assert isinstance(loads("x" * (MAX_TEXT + 1)), ProtocolError)
    # brackets inside strings and escaped quotes do not count as nesting
    shallow = json.dumps({"s": "[" * 5000 + '\\"{' * 100, "n": [[1, 2], {"a": "]]]"}]})
    assert nesting_error(shallow) is None and loads(shallow)["n"] == [[1, 2], {"a": "]]]"}]
    assert nesting_error(json.dumps([[[[["x"]]]]] * 100)) is None


def test_json_depth_check_is_linear_on_hostile_text():
    import time

    from upvoot.framing.jsonwire import MAX_TEXT, loads

    n = MAX_TEXT
    hostile = ['"\\"' * (n // 3), "[" * n, "[]" * (n // 2), "[" * (n // 2) + "]" * (n // 2), '"' * n,
               "[" * 40 + '"' + "\\" * (n - 100)]
    started = time.perf_counter()
    for text in hostile:
        result = loads(text)
        assert isinstance(result, (ProtocolError, list, str))
    assert time.perf_counter() - started < 1.0
