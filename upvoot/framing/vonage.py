"""Vonage Voice API WebSocket (NCCO ``connect`` to a ``websocket`` endpoint).

Sources: *Vonage-docs* = developer.vonage.com "WebSockets in the Vonage
Voice API" (concept guide) and the "Play audio into a WebSocket" tutorial
(sends 320-sample = 640-byte frames at 16 kHz); Vonage/vonage-node-sdk#137
(wrong frame sizes garble or end calls).

Vonage -> UpVoot
  text    {"event": "websocket:connected", "content-type":
          "audio/l16;rate=16000", ...NCCO headers...}      -> CallStarted
              the first message. ``content-type`` gives the rate (8000 or
              16000; otherwise the constructor's ``sample-rate``, default
              16000). The other fields (the NCCO ``headers``, flattened)
              become ``custom``; ``uuid`` / ``call_uuid`` /
              ``conversation_uuid``, if present, is the call id.
  binary  caller audio: L16 little-endian mono at that rate, 20 ms frames
          (any size accepted; a byte split across frames is carried).
  text    {"event": "websocket:notify", "payload": {...}}  -> PlayoutMark
              our ``notify`` echoed after the audio before it has played.
  text    {"event": "websocket:cleared"}                   -> PlayoutMark(cleared=True)
              for each notify outstanding when we sent ``clear``.
  text    {"event": "websocket:dtmf", "digit": "5"} or
          {"event": "websocket:dtmf", "dtmf": {"digit": "5"}} -> Dtmf
              (shape UNCONFIRMED: both accepted)

UpVoot -> Vonage
  binary  agent audio: L16 little-endian at the stream's rate in frames of
          exactly 20 ms — 640 bytes at 16 kHz, 320 at 8 kHz — the last one
          of an utterance zero-padded. Vonage buffers up to ~60 s; the
          caller of this codec paces the frames.
  text    {"action": "clear"}                  drop buffered audio
  text    {"action": "notify", "payload": {"name": NAME}}   a mark

There is no stop message: closing the socket ends the leg. Binary audio
before ``websocket:connected`` is dropped with a ProtocolError; outbound
calls before it are queued and replayed (see ``ProviderFraming``:
:meth:`drain`). transcript / interim / turn_start / event: no channel.

``acknowledges_playout`` is False: one report says ``notify`` was never
answered, so the call must use its own pacing clock and treat notify echoes
as a bonus. UNCONFIRMED: whether notifies pending at a ``clear`` are echoed
(if they are after ``websocket:cleared`` they are reported as ProtocolError).
"""

from __future__ import annotations

from collections.abc import Mapping

from upvoot.framing.base import Event, Frame, ProtocolError
from upvoot.framing.convert import Decoder, Outbound
from upvoot.framing.jsonwire import json_frame, parse_rate, pick, rate_param, string_dict, text
from upvoot.framing.provider import Handler, ProviderFraming, frames_of_20ms

RATES = (8000, 16000)
DEFAULT_RATE = 16000


def frame_bytes(rate: int) -> int:
    return rate // 50 * 2  # 20 ms of s16le


def _content_rate(content_type: str | None) -> int | None:
    if not content_type:
        return None
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "rate":
            return parse_rate(value.strip(), RATES)
    return None


class VonageFraming(ProviderFraming):
    name = "vonage"
    title = "Vonage"
    acknowledges_playout = False
    START_EVENT = "websocket:connected"

    def __init__(self, sample_rate: int = DEFAULT_RATE) -> None:
        super().__init__()
        if sample_rate not in RATES:
            raise ValueError(f"Vonage sample rate must be one of {RATES}, not {sample_rate!r}")
        self._default_rate = sample_rate

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> VonageFraming:
        return cls(sample_rate=rate_param(params, RATES, DEFAULT_RATE))

    # frames in -----------------------------------------------------------
    def receive_binary(self, data: bytes) -> list[Event]:
        return self._caller_audio(data)

    def _handlers(self) -> dict[str, Handler]:
        return {
            "websocket:connected": self._start_message,
            "websocket:notify": lambda msg: self._mark_echo(pick(msg.get("payload"), "name", "mark")),
            "websocket:cleared": self._cleared,
            "websocket:dtmf": self._dtmf,
        }

    def _dtmf(self, msg: dict) -> list[Event]:
        dtmf = msg.get("dtmf")
        first = pick(dtmf, "digit") if isinstance(dtmf, dict) else dtmf
        return self._digit(first, msg.get("digit"), pick(msg.get("payload"), "digit"))

    def _start_body(self, msg: dict) -> object:
        return msg  # the connected message is the start

    def _start(self, msg: dict, start: dict) -> list[Event]:
        events: list[Event] = []
        content_type = text(msg.get("content-type"))
        rate = _content_rate(content_type)
        if content_type is not None and rate is None:
            events.append(ProtocolError(f"unsupported content-type {content_type[:60]!r}"))
        rate = rate or self._default_rate
        custom = string_dict({k: v for k, v in msg.items() if k not in ("event", "content-type")})
        call_id = next((custom[k] for k in ("uuid", "call_uuid", "conversation_uuid") if k in custom), None)
        out = Outbound("s16le", rate, frames_of_20ms("s16le", rate))
        return self._open_stream(events, Decoder("s16le", rate), out, call_id=call_id, custom=custom)

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        return [Frame(chunk)]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"action": "notify", "payload": {"name": name}})

    def _clear_frame(self) -> Frame:
        return json_frame({"action": "clear"})
