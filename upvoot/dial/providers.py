"""The client side of each provider's WebSocket protocol, sans-IO.

``upvoot.framing`` holds the *server* side of each provider's wire format;
this module plays the *provider*: it turns caller audio (16 kHz mono s16le)
into the frames Exotel, Twilio, Plivo, Telnyx or Vonage would send, and
reads what the server sends back as that provider would: decoding agent
media to 16 kHz PCM, echoing marks once the audio before them has "played",
honouring ``clear``, and listing what breaks the provider's rules
(``violations``). Used by ``upvoot dial --provider NAME`` and the daemon
tests; the message shapes and their sources are those in each
``upvoot.framing`` codec's docstring and the project's provider notes. The
shared base is ``upvoot.dial.simulator.ProviderSim`` (with ``RawSim``);
``make_sim`` builds a simulator by name.

The playback model (what "played" means here; ``ProviderBuffer``): agent
audio plays in real time from its arrival, or right after the audio queued
before it. A mark (Exotel, Twilio, Telnyx ``mark``; Plivo ``checkpoint``;
Vonage ``notify``) is echoed when everything received before it has played
(at once if nothing is queued). A clear drops the audio not yet played:

=========  ==========================================  ====================================
provider   what a clear drops                           marks pending at the clear
=========  ==========================================  ====================================
Exotel     unplayed chunks; the playing one finishes    echoed if due within the finishing
                                                        chunk, else never (UNCONFIRMED: the
                                                        harshest reading)
Twilio     everything unplayed, at once                 all returned at once
Telnyx     everything unplayed, at once                 all returned at once
Plivo      everything unplayed, at once                 never echoed; ``clearedAudio`` sent
Vonage     everything unplayed, at once                 never echoed; ``websocket:cleared``
=========  ==========================================  ====================================
"""

from __future__ import annotations

import uuid
from typing import Any

from upvoot import audio
from upvoot.dial.simulator import ControlMessage, ProviderSim, RawSim, SimEvent, b64, json_frame, new_id
from upvoot.framing.base import Frame
from upvoot.framing.convert import bytes_per_sample
from upvoot.framing.negotiate import PROVIDERS


# ---- Exotel ----------------------------------------------------------------------------------


class ExotelSim(ProviderSim):
    """Exotel Voicebot applet: JSON, base64 s16le at 8/16/24 kHz, snake_case.

    Caller media comes in ``frame_ms`` messages (default 100 ms, as Exotel
    sends). Agent chunks are checked against Exotel's rules: 3,200 to
    100,000 bytes and a multiple of 320 bytes.
    """

    name = "exotel"
    finish_playing_chunk = True
    default_frame_ms = 100
    stream_key = "stream_sid"
    MIN_CHUNK, MAX_CHUNK, MULTIPLE = 3200, 100_000, 320

    def __init__(self, sample_rate: int = 8000, account_sid: str = "exotel-account", **kw: Any) -> None:
        if sample_rate not in (8000, 16000, 24000):
            raise ValueError(f"Exotel sample rate must be 8000, 16000 or 24000, not {sample_rate!r}")
        kw.setdefault("call_id", new_id("ex"))
        super().__init__(codec="s16le", rate=sample_rate, **kw)
        self.account_sid = account_sid
        self.chunk_sizes: list[int] = []

    def url_params(self) -> dict[str, str]:
        params = {} if self.rate == 8000 else {"sample-rate": str(self.rate)}
        params.update(self.custom)  # Exotel passes up to 3 custom pairs from the applet URL's query
        return params

    def _msg(self, event: str, **body: Any) -> Frame:
        return json_frame({"event": event, "sequence_number": str(next(self._seq)), "stream_sid": self.stream_id, **body})

    def _open(self) -> list[Frame]:
        start = {
            "stream_sid": self.stream_id,
            "call_sid": self.call_id,
            "account_sid": self.account_sid,
            "from": self.from_number,
            "to": self.to_number,
            "custom_parameters": self.custom,
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(self.rate), "bit_rate": "16"},
        }
        return [json_frame({"event": "connected"}), self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        return self._msg("media", media={"chunk": str(chunk), "timestamp": str(timestamp), "payload": b64(payload)})

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", dtmf={"digit": digit, "duration": "100"})

    def _stop(self) -> list[Frame]:
        stop = {"call_sid": self.call_id, "account_sid": self.account_sid, "reason": "callended"}
        return [self._msg("stop", stop=stop)]

    def _echo(self, name: str) -> Frame:
        return self._msg("mark", mark={"name": name})

    def _media_checks(self, payload: bytes, msg: dict) -> list[SimEvent]:
        n = len(payload)
        self.chunk_sizes.append(n)
        if not (self.MIN_CHUNK <= n <= self.MAX_CHUNK) or n % self.MULTIPLE:
            return [self._violation(f"media chunk of {n} bytes (Exotel wants 3200..100000, x320)")]
        return []


# ---- Twilio ----------------------------------------------------------------------------------


class TwilioSim(ProviderSim):
    """Twilio Media Streams (``<Connect><Stream>``): JSON, base64 μ-law 8 kHz,
    camelCase, 20 ms media; no from/to in ``start`` (pass them as custom
    ``<Parameter>`` s if wanted). Clear returns pending marks."""

    name = "twilio"
    returns_marks_on_clear = True

    def __init__(self, account_sid: str = "AC" + "0" * 32, **kw: Any) -> None:
        kw.setdefault("call_id", new_id("CA"))
        super().__init__(codec="mulaw", rate=8000, **kw)
        self.account_sid = account_sid

    def _msg(self, event: str, **body: Any) -> Frame:
        return json_frame({"event": event, "sequenceNumber": str(next(self._seq)), **body, "streamSid": self.stream_id})

    def _open(self) -> list[Frame]:
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_id,
            "callSid": self.call_id,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": self.custom,
        }
        connected = json_frame({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        return [connected, self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp), "payload": b64(payload)}
        return self._msg("media", media=media)

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    def _stop(self) -> list[Frame]:
        return [self._msg("stop", stop={"accountSid": self.account_sid, "callSid": self.call_id})]

    def _echo(self, name: str) -> Frame:
        return self._msg("mark", mark={"name": name})

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        event = msg.get("event")
        if event in ("media", "mark", "clear") and msg.get("streamSid") != self.stream_id:
            # Twilio closes the stream on a wrong streamSid (error 31951)
            return [self._violation(f"{event} with streamSid {str(msg.get('streamSid'))[:40]!r}")]
        return super()._text(msg, now)


# ---- Plivo -----------------------------------------------------------------------------------


class PlivoSim(ProviderSim):
    """Plivo ``<Stream bidirectional="true">``: JSON; L16 (little-endian, as
    the integrations we know send it) at 8/16 kHz or μ-law 8 kHz; custom
    values travel as ``extra_headers`` (``k=v,k=v``). ``checkpoint`` ->
    ``playedStream``; ``clearAudio`` -> ``clearedAudio``. No stop message."""

    name = "plivo"
    ends_by_closing = True
    media_event, mark_event, clear_event = "playAudio", "checkpoint", "clearAudio"
    stream_key = "streamId"

    def __init__(self, sample_rate: int = 8000, content_type: str = "audio/x-l16", **kw: Any) -> None:
        if content_type not in ("audio/x-l16", "audio/x-mulaw"):
            raise ValueError("Plivo content type must be audio/x-l16 or audio/x-mulaw")
        if content_type == "audio/x-mulaw" and sample_rate != 8000:
            raise ValueError("Plivo offers μ-law at 8000 Hz only")
        if sample_rate not in (8000, 16000):
            raise ValueError("Plivo sample rate must be 8000 or 16000")
        kw.setdefault("call_id", str(uuid.uuid4()))
        kw.setdefault("stream_id", str(uuid.uuid4()))
        codec = "mulaw" if content_type == "audio/x-mulaw" else "s16le"
        super().__init__(codec=codec, rate=sample_rate, **kw)
        self.content_type = content_type

    def _msg(self, event: str, **body: Any) -> Frame:
        return json_frame({"event": event, "sequenceNumber": next(self._seq), "streamId": self.stream_id, **body})

    def _open(self) -> list[Frame]:
        start = {
            "callId": self.call_id,
            "streamId": self.stream_id,
            "accountId": "plivo-account",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": self.content_type, "sampleRate": self.rate},
        }
        body: dict[str, Any] = {"start": start}
        headers = dict(self.custom)
        for key, number in self._numbers().items():
            headers.setdefault(key, number)
        if headers:
            body["extra_headers"] = ",".join(f"{k}={v}" for k, v in headers.items())
        return [self._msg("start", **body)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "timestamp": str(timestamp), "chunk": chunk, "payload": b64(payload)}
        return self._msg("media", media=media)

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", dtmf={"track": "inbound", "digit": digit})

    def _echo(self, name: str) -> Frame:
        return self._msg("playedStream", name=name)

    def _cleared_answer(self) -> Frame:
        return self._msg("clearedAudio")

    def _media_checks(self, payload: bytes, msg: dict) -> list[SimEvent]:
        media = msg["media"]
        if media.get("contentType") != self.content_type or media.get("sampleRate") != self.rate:
            return [self._violation(
                f"playAudio in {media.get('contentType')}/{media.get('sampleRate')}, stream is {self.content_type}/{self.rate}")]
        return []

    def _mark_name(self, msg: dict) -> Any:
        return msg.get("name")


# ---- Telnyx ----------------------------------------------------------------------------------


_TELNYX = {"PCMU": ("mulaw", 8000), "PCMA": ("alaw", 8000), "L16": ("s16be", 16000)}


class TelnyxSim(ProviderSim):
    """Telnyx media streaming in ``rtp`` bidirectional mode: JSON, top-level
    ``stream_id``; the codec (PCMU default, PCMA, L16 — big-endian, 16 kHz
    by default) is the same both ways and is named to the server by the
    URL's ``codec`` (and ``sample-rate``), as ``upvoot.framing.telnyx`` asks.
    Clear returns pending marks."""

    name = "telnyx"
    returns_marks_on_clear = True

    def __init__(self, codec: str = "PCMU", sample_rate: int | None = None, **kw: Any) -> None:
        key = codec.upper()
        if key not in _TELNYX:
            raise ValueError(f"Telnyx codec must be one of {', '.join(_TELNYX)}, not {codec!r}")
        wire, rate = _TELNYX[key]
        if sample_rate is not None:
            if key != "L16" and sample_rate != 8000:
                raise ValueError(f"Telnyx {key} runs at 8000 Hz")
            if key == "L16" and sample_rate not in (8000, 16000, 24000):
                raise ValueError("Telnyx L16 runs at 8000, 16000 or 24000 Hz")
            rate = sample_rate
        kw.setdefault("call_id", "v3:" + uuid.uuid4().hex)
        kw.setdefault("stream_id", str(uuid.uuid4()))
        super().__init__(codec=wire, rate=rate, **kw)
        self.codec_name = key
        self.call_session_id = str(uuid.uuid4())

    def url_params(self) -> dict[str, str]:
        params = {"codec": self.codec_name}
        if self.codec_name == "L16" and self.rate != 16000:
            params["sample-rate"] = str(self.rate)
        return params

    def _msg(self, event: str, **body: Any) -> Frame:
        return json_frame({"event": event, "sequence_number": str(next(self._seq)), **body, "stream_id": self.stream_id})

    def _open(self) -> list[Frame]:
        start = {
            "user_id": str(uuid.uuid4()),
            "call_control_id": self.call_id,
            "call_session_id": self.call_session_id,
            "from": self.from_number,
            "to": self.to_number,
            "client_state": None,
            "custom_parameters": self.custom,
            "media_format": {"encoding": self.codec_name, "sample_rate": self.rate, "channels": 1},
        }
        return [json_frame({"event": "connected", "version": "1.0.0"}), self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp), "payload": b64(payload)}
        return self._msg("media", media=media)

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", occurred_at="2024-01-01T00:00:00.000000Z", dtmf={"digit": digit})

    def _stop(self) -> list[Frame]:
        return [self._msg("stop", stop={"call_control_id": self.call_id})]

    def _echo(self, name: str) -> Frame:
        return self._msg("mark", mark={"name": name})

    def _media_checks(self, payload: bytes, msg: dict) -> list[SimEvent]:
        ms = len(payload) / bytes_per_sample(self.codec) / self.rate * 1000
        return [] if 19.5 <= ms <= 30000 else [self._violation(f"media of {ms:.1f} ms (Telnyx takes 20 ms..30 s)")]


# ---- Vonage ----------------------------------------------------------------------------------


class VonageSim(ProviderSim):
    """Vonage Voice API WebSocket: a ``websocket:connected`` text frame (NCCO
    headers flattened into it), then binary L16 little-endian 20 ms frames
    both ways. ``notify`` -> ``websocket:notify``; ``clear`` ->
    ``websocket:cleared``. No stop message: Vonage closes the socket. Agent
    frames that are not exactly 20 ms are violations."""

    name = "vonage"
    ends_by_closing = True

    def __init__(self, sample_rate: int = 16000, **kw: Any) -> None:
        if sample_rate not in (8000, 16000):
            raise ValueError("Vonage sample rate must be 8000 or 16000")
        kw.setdefault("call_id", str(uuid.uuid4()))
        super().__init__(codec="s16le", rate=sample_rate, **kw)
        self.stream_id = None  # type: ignore[assignment]  # Vonage names no stream
        self._notifies: dict[str, Any] = {}

    def url_params(self) -> dict[str, str]:
        return {} if self.rate == 16000 else {"sample-rate": str(self.rate)}

    def _open(self) -> list[Frame]:
        msg: dict[str, Any] = {"event": "websocket:connected", "content-type": f"audio/l16;rate={self.rate}"}
        msg["uuid"] = self.call_id
        msg.update(self._numbers())
        msg.update(self.custom)
        return [json_frame(msg)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        return Frame(payload)

    def _dtmf(self, digit: str) -> Frame:
        return json_frame({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    def _echo(self, name: str) -> Frame:
        return json_frame({"event": "websocket:notify", "payload": self._notifies.pop(name, {"name": name})})

    def _cleared_answer(self) -> Frame:
        return json_frame({"event": "websocket:cleared"})

    def receive_binary(self, data: bytes, now: float) -> list[SimEvent]:
        checks: list[SimEvent] = []
        if len(data) != self.frame_bytes:
            checks.append(self._violation(f"binary frame of {len(data)} bytes (Vonage wants exactly {self.frame_bytes})"))
        return checks + self._agent_media(data, now)

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        action = msg.get("action")
        if action == "notify":
            payload = msg.get("payload")
            name = payload.get("name") if isinstance(payload, dict) else None
            if isinstance(name, str):
                self._notifies[name] = payload
            return self._agent_mark(name, now)
        if action == "clear":
            self._notifies.clear()
            return self._agent_clear(now)
        return [ControlMessage(msg)]


def make_sim(name: str, sample_rate: int | None = None, codec: str | None = None, **kw: Any) -> ProviderSim:
    """The simulator for provider ``name``; ``sample_rate`` / ``codec`` where
    the provider offers a choice (ValueError otherwise or for bad values)."""
    if name == "raw":
        if sample_rate not in (None, audio.RATE) or codec:
            raise ValueError("the raw protocol is 16 kHz s16le only")
        return RawSim(**kw)
    if name == "exotel":
        if codec:
            raise ValueError("Exotel has no codec choice (s16le)")
        return ExotelSim(sample_rate=sample_rate or 8000, **kw)
    if name == "twilio":
        if sample_rate not in (None, 8000) or codec not in (None, "mulaw", "PCMU"):
            raise ValueError("Twilio is μ-law 8000 Hz only")
        return TwilioSim(**kw)
    if name == "plivo":
        content = {None: "audio/x-l16", "l16": "audio/x-l16", "mulaw": "audio/x-mulaw"}.get(codec.lower() if codec else None)
        if content is None:
            raise ValueError("Plivo codec must be l16 or mulaw")
        return PlivoSim(sample_rate=sample_rate or 8000, content_type=content, **kw)
    if name == "telnyx":
        return TelnyxSim(codec=codec or "PCMU", sample_rate=sample_rate, **kw)
    if name == "vonage":
        if codec:
            raise ValueError("Vonage has no codec choice (L16)")
        return VonageSim(sample_rate=sample_rate or 16000, **kw)
    raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
