"""The client side of each provider's WebSocket protocol, sans-IO.

``upvoot.framing`` holds the *server* side of each provider's wire format;
this module plays the *provider*: it turns caller audio (16 kHz mono s16le)
into the frames Exotel, Twilio, Plivo, Telnyx or Vonage would send, and
reads what the server sends back as that provider would — decoding agent
media to 16 kHz PCM, echoing marks once the audio before them has "played",
and honouring ``clear``. It is used by the test dialer (``upvoot dial
--provider NAME``) and by the daemon tests; the message shapes, and the
sources they come from, are those written in each ``upvoot.framing`` codec's
docstring and in the project's provider notes.

No sockets and no clock: every method that depends on time takes ``now``
(seconds, any monotonic origin), and the driver calls :meth:`ProviderSim.poll`
when :meth:`ProviderSim.next_due` says an echo is due. Outbound frames are
:class:`upvoot.framing.base.Frame` (``bytes`` go binary, ``str`` as text).

The player model (what "played" means here): agent audio plays in real time
from its arrival, or right after the audio queued before it. A mark (Exotel,
Twilio, Telnyx ``mark``; Plivo ``checkpoint``; Vonage ``notify``) is echoed
when everything received before it has played — at once if nothing is
queued. A clear drops the audio not yet played:

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

The simulator also checks what the server sends against each provider's
rules (Exotel chunk sizes, Vonage's exact 20 ms frames, Twilio's streamSid,
...) and lists breaches in :attr:`ProviderSim.violations` instead of failing.

Ending: Exotel, Twilio and Telnyx send ``stop`` (:meth:`ProviderSim.stop`);
Plivo and Vonage document none, so their ``stop()`` returns no frame and
:attr:`ProviderSim.ends_by_closing` tells the driver to close the socket.
"""

from __future__ import annotations

import abc
import base64
import binascii
import itertools
import json
import uuid
from collections.abc import Mapping
from typing import Any, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

from upvoot import audio
from upvoot.framing.base import Frame
from upvoot.framing.convert import Decoder, Encoder, bytes_per_sample

PROVIDERS = ("raw", "exotel", "twilio", "plivo", "telnyx", "vonage")


# ---- what the simulator reports ----------------------------------------------------------


@attrs.frozen
class AgentAudio:
    """Agent media received and decoded (16 kHz s16le). ``size`` is the
    provider payload's own length in bytes; ``plays_at`` when it starts playing."""

    pcm: bytes
    size: int
    plays_at: float


@attrs.frozen
class MarkSent:
    """The server asked for a playback acknowledgement called ``name``."""

    name: str


@attrs.frozen
class Cleared:
    """The server sent clear: ``dropped`` seconds of queued audio were thrown
    away; ``returned`` marks are echoed at once, ``lost`` ones never."""

    dropped: float
    returned: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()


@attrs.frozen
class ControlMessage:
    """A text message that is neither media, mark nor clear (e.g. raw
    transcripts, or something this provider does not know)."""

    message: Any


@attrs.frozen
class Violation:
    """What the server sent breaks a rule of the provider (kept, not raised)."""

    message: str


SimEvent = Union[AgentAudio, MarkSent, Cleared, ControlMessage, Violation]


# ---- the provider's player --------------------------------------------------------------


class Player:
    """Queued agent audio on a timeline, and the marks waiting for it."""

    def __init__(self, finish_playing_chunk: bool) -> None:
        self.finish_playing_chunk = finish_playing_chunk
        self.segments: list[tuple[float, float]] = []  # (start, end) of each chunk
        self.play_end = 0.0
        self.marks: list[tuple[float, str]] = []  # (due, name), due times non-decreasing

    def add(self, now: float, seconds: float) -> float:
        """Queue ``seconds`` of audio arriving at ``now``; returns when it starts."""
        start = max(self.play_end, now)
        self.play_end = start + seconds
        self.segments.append((start, self.play_end))
        self.segments = [s for s in self.segments if s[1] > now]
        return start

    def mark(self, now: float, name: str) -> None:
        self.marks.append((max(self.play_end, now), name))

    def due(self, now: float) -> list[str]:
        names = [name for t, name in self.marks if t <= now]
        self.marks = [(t, name) for t, name in self.marks if t > now]
        return names

    def next_due(self) -> float | None:
        return self.marks[0][0] if self.marks else None

    def queued(self, now: float) -> float:
        return max(0.0, self.play_end - now)

    def clear(self, now: float) -> tuple[float, list[str]]:
        """Drop what has not played; returns (seconds dropped, marks still
        waiting for audio that no longer exists)."""
        cut = now
        if self.finish_playing_chunk:
            cut = next((end for start, end in self.segments if start <= now < end), now)
        dropped = max(0.0, self.play_end - cut)
        self.play_end = min(self.play_end, cut)
        self.segments = [(s, min(e, cut)) for s, e in self.segments if s < cut]
        orphans = [name for t, name in self.marks if t > cut]
        self.marks = [(t, name) for t, name in self.marks if t <= cut]
        return dropped, orphans


# ---- the common part ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _json(obj: dict) -> Frame:
    return Frame(json.dumps(obj, separators=(",", ":")))


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ProviderSim(abc.ABC):
    """One call as a provider makes it (subclassed per provider).

    Caller audio: :meth:`caller_audio` takes 16 kHz s16le of any length and
    returns the media frames due, each ``frame_ms`` long in the provider's
    codec. Agent side: :meth:`receive_text` / :meth:`receive_binary` return
    :data:`SimEvent` s and may queue frames (mark echoes, clear answers)
    that :meth:`poll` returns when they are due.
    """

    name = "provider"
    #: the provider has no stop message: the driver closes the socket instead
    ends_by_closing = False
    #: a clear lets the chunk being played finish (Exotel)
    finish_playing_chunk = False
    #: marks pending at a clear are echoed at once (Twilio, Telnyx)
    returns_marks_on_clear = False
    default_frame_ms = 20

    def __init__(
        self,
        *,
        codec: str,
        rate: int,
        frame_ms: int | None = None,
        call_id: str | None = None,
        stream_id: str | None = None,
        from_number: str | None = "+15550100001",
        to_number: str | None = "+15550100002",
        custom: Mapping[str, str] | None = None,
    ) -> None:
        self.codec = codec
        self.rate = rate
        self.frame_ms = frame_ms or self.default_frame_ms
        self.call_id = call_id or _sid("CA")
        self.stream_id = stream_id or _sid("MZ")
        self.from_number = from_number
        self.to_number = to_number
        self.custom = dict(custom or {})
        self.player = Player(self.finish_playing_chunk)
        self.violations: list[str] = []
        self.started = False
        self.stopped = False
        self._encoder = Encoder(codec, rate)
        self._decoder = Decoder(codec, rate)
        self._pending = bytearray()  # encoded caller audio not yet framed
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)
        self._sent_bytes = 0
        self._ready: list[Frame] = []

    # -- the URL the provider connects to ----------------------------------------------------
    def url_params(self) -> dict[str, str]:
        """Query parameters this call's stream URL carries (besides ``provider``)."""
        return {}

    def url(self, base: str, name_provider: bool = True) -> str:
        """``base`` (``ws://HOST/voice/KEY``) with ``?provider=NAME`` (unless
        ``name_provider`` is false: auto-detection) and :meth:`url_params`."""
        parts = urlsplit(base)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if name_provider:
            query["provider"] = self.name
        query.update(self.url_params())
        return urlunsplit(parts._replace(query=urlencode(query)))

    # -- provider -> server --------------------------------------------------------------------
    @property
    def frame_bytes(self) -> int:
        return self.rate * self.frame_ms // 1000 * bytes_per_sample(self.codec)

    @property
    def frame_seconds(self) -> float:
        return self.frame_ms / 1000.0

    def open(self) -> list[Frame]:
        """The first messages: ``connected`` and ``start`` (or their equivalent)."""
        self.started = True
        return self._open()

    def caller_audio(self, pcm: bytes) -> list[Frame]:
        """16 kHz s16le caller audio -> the media frames now complete."""
        if self.stopped:
            return []
        self._pending += self._encoder.feed(pcm)
        size = self.frame_bytes
        frames = []
        while len(self._pending) >= size:
            payload = bytes(self._pending[:size])
            del self._pending[:size]
            timestamp = self._sent_bytes * 1000 // (self.rate * bytes_per_sample(self.codec))
            self._sent_bytes += size
            frames.append(self._media(payload, next(self._chunk), timestamp))
        return frames

    def dtmf(self, digit: str) -> list[Frame]:
        return [self._dtmf(digit)]

    def stop(self) -> list[Frame]:
        """The provider's end of the stream ([] when it only closes the socket)."""
        if self.stopped:
            return []
        self.stopped = True
        return self._stop()

    # -- server -> provider --------------------------------------------------------------------
    def receive_text(self, text: str, now: float) -> list[SimEvent]:
        try:
            msg = json.loads(text)
        except ValueError:
            return [self._violation(f"text frame is not JSON: {text[:60]!r}")]
        if not isinstance(msg, dict):
            return [self._violation("text frame is not a JSON object")]
        return self._text(msg, now)

    def receive_binary(self, data: bytes, now: float) -> list[SimEvent]:
        return [self._violation(f"{self.name} takes no binary frames ({len(data)} bytes)")]

    def poll(self, now: float) -> list[Frame]:
        """Frames due by ``now``: mark echoes whose audio has played, answers."""
        frames, self._ready = self._ready, []
        for name in self.player.due(now):
            frames.append(self._echo(name))
        return frames

    def next_due(self) -> float | None:
        """When :meth:`poll` next has something (None: nothing waiting)."""
        if self._ready:
            return 0.0
        return self.player.next_due()

    # -- shared handling of agent media, marks and clears ----------------------------------------
    def _agent_media(self, payload: bytes, now: float) -> list[SimEvent]:
        seconds = len(payload) / bytes_per_sample(self.codec) / self.rate
        plays_at = self.player.add(now, seconds)
        pcm = self._decoder.feed(payload)
        return [AgentAudio(pcm, len(payload), plays_at)]

    def _agent_mark(self, name: Any, now: float) -> list[SimEvent]:
        if not isinstance(name, str) or not name:
            return [self._violation("mark without a name")]
        self.player.mark(now, name)
        return [MarkSent(name)]

    def _agent_clear(self, now: float) -> list[SimEvent]:
        dropped, orphans = self.player.clear(now)
        self._decoder = Decoder(self.codec, self.rate)
        if self.returns_marks_on_clear:
            self._ready += [self._echo(n) for n in orphans]
            return [Cleared(dropped, returned=tuple(orphans))]
        answer = self._cleared_answer()
        if answer is not None:
            self._ready.append(answer)
        return [Cleared(dropped, lost=tuple(orphans))]

    def _violation(self, message: str) -> Violation:
        self.violations.append(message)
        return Violation(message)

    def _check_id(self, msg: dict, key: str, expected: str) -> list[SimEvent]:
        if key not in msg:
            return []
        if msg[key] != expected:
            return [self._violation(f"{key} {str(msg[key])[:40]!r} is not this stream's {expected!r}")]
        return []

    # -- per provider --------------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> list[Frame]:
        """Each provider's simulator says this in its own words."""

    @abc.abstractmethod
    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        """Each provider's simulator says this in its own words."""

    @abc.abstractmethod
    def _dtmf(self, digit: str) -> Frame:
        """Each provider's simulator says this in its own words."""

    def _stop(self) -> list[Frame]:
        return []

    @abc.abstractmethod
    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        """Each provider's simulator says this in its own words."""

    @abc.abstractmethod
    def _echo(self, name: str) -> Frame:
        """Each provider's simulator says this in its own words."""

    def _cleared_answer(self) -> Frame | None:
        return None


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
    MIN_CHUNK, MAX_CHUNK, MULTIPLE = 3200, 100_000, 320

    def __init__(self, sample_rate: int = 8000, account_sid: str = "exotel-account", **kw: Any) -> None:
        if sample_rate not in (8000, 16000, 24000):
            raise ValueError(f"Exotel sample rate must be 8000, 16000 or 24000, not {sample_rate!r}")
        kw.setdefault("call_id", _sid("ex"))
        super().__init__(codec="s16le", rate=sample_rate, **kw)
        self.account_sid = account_sid
        self.chunk_sizes: list[int] = []

    def url_params(self) -> dict[str, str]:
        params = {} if self.rate == 8000 else {"sample-rate": str(self.rate)}
        params.update(self.custom)  # Exotel passes up to 3 custom pairs from the applet URL's query
        return params

    def _msg(self, event: str, **body: Any) -> Frame:
        return _json({"event": event, "sequence_number": str(next(self._seq)), "stream_sid": self.stream_id, **body})

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
        return [_json({"event": "connected"}), self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        return self._msg("media", media={"chunk": str(chunk), "timestamp": str(timestamp), "payload": _b64(payload)})

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", dtmf={"digit": digit, "duration": "100"})

    def _stop(self) -> list[Frame]:
        stop = {"call_sid": self.call_id, "account_sid": self.account_sid, "reason": "callended"}
        return [self._msg("stop", stop=stop)]

    def _echo(self, name: str) -> Frame:
        return self._msg("mark", mark={"name": name})

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        event = msg.get("event")
        checks = self._check_id(msg, "stream_sid", self.stream_id)
        if event == "media":
            payload = _unb64((msg.get("media") or {}).get("payload"))
            if payload is None:
                return checks + [self._violation("media without a base64 payload")]
            n = len(payload)
            self.chunk_sizes.append(n)
            if not (self.MIN_CHUNK <= n <= self.MAX_CHUNK) or n % self.MULTIPLE:
                checks.append(self._violation(f"media chunk of {n} bytes (Exotel wants 3200..100000, x320)"))
            return checks + self._agent_media(payload, now)
        if event == "mark":
            return checks + self._agent_mark((msg.get("mark") or {}).get("name"), now)
        if event == "clear":
            return checks + self._agent_clear(now)
        return checks + [ControlMessage(msg)]


# ---- Twilio ----------------------------------------------------------------------------------


class TwilioSim(ProviderSim):
    """Twilio Media Streams (``<Connect><Stream>``): JSON, base64 μ-law 8 kHz,
    camelCase, 20 ms media; no from/to in ``start`` (pass them as custom
    ``<Parameter>`` s if wanted). Clear returns pending marks."""

    name = "twilio"
    returns_marks_on_clear = True

    def __init__(self, account_sid: str = "AC" + "0" * 32, **kw: Any) -> None:
        kw.setdefault("call_id", _sid("CA"))
        super().__init__(codec="mulaw", rate=8000, **kw)
        self.account_sid = account_sid

    def _msg(self, event: str, **body: Any) -> Frame:
        return _json({"event": event, "sequenceNumber": str(next(self._seq)), **body, "streamSid": self.stream_id})

    def _open(self) -> list[Frame]:
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_id,
            "callSid": self.call_id,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": self.custom,
        }
        connected = _json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        return [connected, self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp), "payload": _b64(payload)}
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
        if event == "media":
            payload = _unb64((msg.get("media") or {}).get("payload"))
            if payload is None:
                return [self._violation("media without a base64 payload")]
            return self._agent_media(payload, now)
        if event == "mark":
            return self._agent_mark((msg.get("mark") or {}).get("name"), now)
        if event == "clear":
            return self._agent_clear(now)
        return [ControlMessage(msg)]


# ---- Plivo -----------------------------------------------------------------------------------


class PlivoSim(ProviderSim):
    """Plivo ``<Stream bidirectional="true">``: JSON; L16 (little-endian, as
    the integrations we know send it) at 8/16 kHz or μ-law 8 kHz; custom
    values travel as ``extra_headers`` (``k=v,k=v``). ``checkpoint`` ->
    ``playedStream``; ``clearAudio`` -> ``clearedAudio``. No stop message."""

    name = "plivo"
    ends_by_closing = True

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
        return _json({"event": event, "sequenceNumber": next(self._seq), "streamId": self.stream_id, **body})

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
        if self.from_number:
            headers.setdefault("from", self.from_number)
        if self.to_number:
            headers.setdefault("to", self.to_number)
        if headers:
            body["extra_headers"] = ",".join(f"{k}={v}" for k, v in headers.items())
        return [self._msg("start", **body)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "timestamp": str(timestamp), "chunk": chunk, "payload": _b64(payload)}
        return self._msg("media", media=media)

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", dtmf={"track": "inbound", "digit": digit})

    def _echo(self, name: str) -> Frame:
        return self._msg("playedStream", name=name)

    def _cleared_answer(self) -> Frame:
        return self._msg("clearedAudio")

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        event = msg.get("event")
        checks = self._check_id(msg, "streamId", self.stream_id)
        if event == "playAudio":
            media = msg.get("media") or {}
            payload = _unb64(media.get("payload"))
            if payload is None:
                return checks + [self._violation("playAudio without a base64 payload")]
            if media.get("contentType") != self.content_type or media.get("sampleRate") != self.rate:
                checks.append(self._violation(
                    f"playAudio in {media.get('contentType')}/{media.get('sampleRate')}, stream is {self.content_type}/{self.rate}"))
            return checks + self._agent_media(payload, now)
        if event == "checkpoint":
            return checks + self._agent_mark(msg.get("name"), now)
        if event == "clearAudio":
            return checks + self._agent_clear(now)
        return checks + [ControlMessage(msg)]


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
        return _json({"event": event, "sequence_number": str(next(self._seq)), **body, "stream_id": self.stream_id})

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
        return [_json({"event": "connected", "version": "1.0.0"}), self._msg("start", start=start)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        media = {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp), "payload": _b64(payload)}
        return self._msg("media", media=media)

    def _dtmf(self, digit: str) -> Frame:
        return self._msg("dtmf", occurred_at="2024-01-01T00:00:00.000000Z", dtmf={"digit": digit})

    def _stop(self) -> list[Frame]:
        return [self._msg("stop", stop={"call_control_id": self.call_id})]

    def _echo(self, name: str) -> Frame:
        return self._msg("mark", mark={"name": name})

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        event = msg.get("event")
        if event == "media":
            payload = _unb64((msg.get("media") or {}).get("payload"))
            if payload is None:
                return [self._violation("media without a base64 payload")]
            ms = len(payload) / bytes_per_sample(self.codec) / self.rate * 1000
            checks = [] if 19.5 <= ms <= 30000 else [self._violation(f"media of {ms:.1f} ms (Telnyx takes 20 ms..30 s)")]
            return checks + self._agent_media(payload, now)
        if event == "mark":
            return self._agent_mark((msg.get("mark") or {}).get("name"), now)
        if event == "clear":
            return self._agent_clear(now)
        return [ControlMessage(msg)]


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
        if self.from_number:
            msg["from"] = self.from_number
        if self.to_number:
            msg["to"] = self.to_number
        msg.update(self.custom)
        return [_json(msg)]

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        return Frame(payload)

    def _dtmf(self, digit: str) -> Frame:
        return _json({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    def _echo(self, name: str) -> Frame:
        return _json({"event": "websocket:notify", "payload": self._notifies.pop(name, {"name": name})})

    def _cleared_answer(self) -> Frame:
        return _json({"event": "websocket:cleared"})

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


# ---- raw, for symmetry --------------------------------------------------------------------


class RawSim(ProviderSim):
    """UpVoot's own protocol: binary 16 kHz s16le both ways, JSON control
    messages from the server (reported as :class:`ControlMessage`). No
    marks, no clear; ``stop`` is closing the socket."""

    name = "raw"
    ends_by_closing = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(codec="s16le", rate=audio.RATE, **kw)

    def url(self, base: str, name_provider: bool = False) -> str:
        return super().url(base, name_provider)

    def _open(self) -> list[Frame]:
        return []

    def _media(self, payload: bytes, chunk: int, timestamp: int) -> Frame:
        return Frame(payload)

    def _dtmf(self, digit: str) -> Frame:
        raise ValueError("the raw protocol has no DTMF message")

    def receive_binary(self, data: bytes, now: float) -> list[SimEvent]:
        return self._agent_media(data, now)

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        return [ControlMessage(msg)]

    def _echo(self, name: str) -> Frame:  # pragma: no cover - the raw protocol has no marks
        raise AssertionError("no marks in the raw protocol")


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
