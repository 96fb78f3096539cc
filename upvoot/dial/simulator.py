"""What every provider simulator shares: the sans-IO base ``ProviderSim``.

A simulator plays the *provider's* side of a call (the server side of each
wire format is ``upvoot.framing``). This module holds what they have in
common: the events it reports (:data:`SimEvent`), caller audio cut into the
provider's media frames (16 kHz caller audio is brought to the provider's
rate by ``Encoder(low_lag=True)``, 1.5 ms of lag: a real provider's line is
natively at its rate, so the simulation adds no resampler delay of its own
to what a caller measures; soxr HQ added 20-100 ms with 20 ms frames), and the handling of agent media, marks and clears
(on the provider's playback buffer, ``upvoot.dial.media.ProviderBuffer``). The per-provider subclasses, their message
shapes and how each treats a clear are in ``upvoot.dial.providers``.

No sockets and no clock: every method that depends on time takes ``now``
(seconds, any monotonic origin), and the driver calls :meth:`ProviderSim.poll`
when :meth:`ProviderSim.next_due` says an echo is due. Outbound frames are
:class:`upvoot.framing.base.Frame` (``bytes`` go binary, ``str`` as text).

Breaches of a provider's rules (Exotel chunk sizes, Vonage's exact 20 ms
frames, Twilio's streamSid, ...) are listed in :attr:`ProviderSim.violations`,
never raised. Ending: Exotel, Twilio and Telnyx send ``stop``
(:meth:`ProviderSim.stop`); Plivo, Vonage and raw have none, so their
``stop()`` returns no frame and :attr:`ProviderSim.ends_by_closing` tells the
driver to close the socket. ``RawSim`` speaks UpVoot's own protocol the same way.
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
from upvoot.dial.media import ProviderBuffer
from upvoot.framing.base import Frame
from upvoot.framing.convert import Decoder, Encoder, bytes_per_sample


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


# ---- the common part ----------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def json_frame(obj: dict) -> Frame:
    return Frame(json.dumps(obj, separators=(",", ":")))


def new_id(prefix: str) -> str:
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
        self.call_id = call_id or new_id("CA")
        self.stream_id = stream_id or new_id("MZ")
        self.from_number = from_number
        self.to_number = to_number
        self.custom = dict(custom or {})
        self.buffer = ProviderBuffer(self.finish_playing_chunk)
        self.violations: list[str] = []
        self.started = False
        self.stopped = False
        self._encoder = Encoder(codec, rate, low_lag=True)  # a line natively at `rate`: no lag of our own
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
        for name in self.buffer.due(now):
            frames.append(self._echo(name))
        return frames

    def next_due(self) -> float | None:
        """When :meth:`poll` next has something (None: nothing waiting)."""
        if self._ready:
            return 0.0
        return self.buffer.next_due()

    # -- shared handling of agent media, marks and clears ----------------------------------------
    def _agent_media(self, payload: bytes, now: float) -> list[SimEvent]:
        seconds = len(payload) / bytes_per_sample(self.codec) / self.rate
        plays_at = self.buffer.add(now, seconds)
        pcm = self._decoder.feed(payload)
        return [AgentAudio(pcm, len(payload), plays_at)]

    def _agent_mark(self, name: Any, now: float) -> list[SimEvent]:
        if not isinstance(name, str) or not name:
            return [self._violation("mark without a name")]
        self.buffer.mark(now, name)
        return [MarkSent(name)]

    def _agent_clear(self, now: float) -> list[SimEvent]:
        dropped, orphans = self.buffer.clear(now)
        self._decoder = Decoder(self.codec, self.rate)
        if self.returns_marks_on_clear:
            self._ready += [self._echo(n) for n in orphans]
            return [Cleared(dropped, returned=tuple(orphans))]
        answer = self._cleared_answer()
        if answer is not None:
            self._ready.append(answer)
        return [Cleared(dropped, lost=tuple(orphans))]

    def _numbers(self) -> dict[str, str]:
        """The caller's and the called number, where this call has them."""
        return {k: v for k, v in (("from", self.from_number), ("to", self.to_number)) if v}

    def _violation(self, message: str) -> Violation:
        self.violations.append(message)
        return Violation(message)

    # -- the JSON providers' agent messages (Vonage and raw have their own) ---------------------
    #: the server's event names for agent media, a mark and a clear
    media_event, mark_event, clear_event = "media", "mark", "clear"
    #: the key whose value, where a message carries it, must be this stream's id
    stream_key: str | None = None

    def _text(self, msg: dict, now: float) -> list[SimEvent]:
        """``{"event": media|mark|clear, ...}`` -> events; anything else is a ``ControlMessage``."""
        event = msg.get("event")
        checks = self._stream_checks(msg)
        if event == self.media_event:
            payload = _unb64((msg.get("media") or {}).get("payload"))
            if payload is None:
                return checks + [self._violation(f"{event} without a base64 payload")]
            return checks + self._media_checks(payload, msg) + self._agent_media(payload, now)
        if event == self.mark_event:
            return checks + self._agent_mark(self._mark_name(msg), now)
        if event == self.clear_event:
            return checks + self._agent_clear(now)
        return checks + [ControlMessage(msg)]

    def _stream_checks(self, msg: dict) -> list[SimEvent]:
        key = self.stream_key
        if key is None or key not in msg or msg[key] == self.stream_id:
            return []
        return [self._violation(f"{key} {str(msg[key])[:40]!r} is not this stream's {self.stream_id!r}")]

    def _media_checks(self, payload: bytes, msg: dict) -> list[SimEvent]:
        """The provider's rules for agent media (chunk sizes, formats): violations."""
        return []

    def _mark_name(self, msg: dict) -> Any:
        return (msg.get("mark") or {}).get("name")

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
    def _echo(self, name: str) -> Frame:
        """Each provider's simulator says this in its own words."""

    def _cleared_answer(self) -> Frame | None:
        return None


# ---- raw: UpVoot's own protocol, for symmetry --------------------------------------------------------------------


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
