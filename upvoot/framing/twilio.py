"""Twilio Media Streams (bidirectional, ``<Connect><Stream>``): the wire format.

Sources: *Twilio-WS* = twilio.com/docs/voice/media-streams/websocket-messages;
*Twilio-TwiML* = twilio.com/docs/voice/twiml/stream. Twilio is the
WebSocket client; one socket per call.

Twilio -> UpVoot (JSON text; camelCase; ``sequenceNumber`` a string; all but
``connected`` carry a top-level ``streamSid``)
  {"event": "connected", "protocol": "Call", "version": "1.0.0"} -> nothing
  {"event": "start", "streamSid", "start": {"accountSid", "streamSid",
   "callSid", "tracks", "customParameters": {...}, "mediaFormat":
   {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
                                                           -> CallStarted
      ``customParameters`` carry the ``<Parameter>`` values (the stream URL
      takes no query string; Twilio-TwiML).
  {"event": "media", "media": {"track", "chunk", "timestamp", "payload"}}
                                                           -> CallerAudio
      payload: base64 μ-law, 8 kHz mono, no headers. Frames of another
      ``track`` than ``inbound`` are ignored.
  {"event": "dtmf", "dtmf": {"track", "digit"}}            -> Dtmf
  {"event": "mark", "mark": {"name"}}                      -> PlayoutMark
  {"event": "stop", "stop": {"accountSid", "callSid"}}     -> CallStopped("stopped")

UpVoot -> Twilio
  {"event": "media", "streamSid": SID, "media": {"payload": BASE64}}
      μ-law 8 kHz. Twilio accepts any size; we send whole 20 ms frames of
      160 bytes, one per message (partial μ-law frames cause jitter:
      openai/openai-agents-js#1184); the last frame of an utterance is
      padded with μ-law silence (0xFF).
  {"event": "mark", "streamSid": SID, "mark": {"name": NAME}}
      echoed when the audio before it has played (at once if nothing is
      buffered).
  {"event": "clear", "streamSid": SID}
      empties Twilio's buffer and returns all pending marks: marks that
      were outstanding when we cleared come back as ``cleared=True``.

Before ``start`` the streamSid is unknown (Twilio rejects a wrong one:
error 31951), so outbound calls are queued and replayed on ``start`` (see
``ProviderFraming``: :meth:`drain`). Media before ``start`` is dropped with
a ProtocolError. transcript / interim / turn_start / event: no channel.

UNCONFIRMED: a ``start`` announcing another encoding than μ-law 8 kHz is
not documented; we report a ProtocolError and use μ-law 8 kHz anyway.
"""

from __future__ import annotations

from collections.abc import Mapping

from upvoot.framing.base import CallStarted, CallStopped, Dtmf, Event, Frame, ProtocolError
from upvoot.framing.convert import (
    Chunker,
    Decoder,
    Outbound,
    ProviderFraming,
    b64decode,
    b64encode,
    integer,
    json_frame,
    load_object,
    pick,
    silence_byte,
    string_dict,
    text,
)

RATE = 8000
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz


class TwilioFraming(ProviderFraming):
    name = "twilio"
    acknowledges_playout = True

    def __init__(self) -> None:
        super().__init__()
        self.stream_sid: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TwilioFraming:
        return cls()

    # frames in -----------------------------------------------------------
    def receive_binary(self, data: bytes) -> list[Event]:
        return [ProtocolError("Twilio sends no binary frames")]

    def receive_text(self, frame: str) -> list[Event]:
        msg = load_object(frame)
        if isinstance(msg, ProtocolError):
            return [msg]
        kind = text(msg.get("event"))
        if kind == "media":
            media = msg.get("media")
            track = text(pick(media, "track"))
            if track is not None and track not in ("inbound", "inbound_track"):
                return []
            payload = b64decode(pick(media, "payload"))
            if isinstance(payload, ProtocolError):
                return [payload]
            return self._caller_audio(payload)
        if kind == "start":
            return self._start(msg)
        if kind == "mark":
            return self._mark_echo(pick(msg.get("mark"), "name"))
        if kind == "dtmf":
            digit = text(pick(msg.get("dtmf"), "digit"))
            return [Dtmf(digit)] if digit else [ProtocolError("dtmf without a digit")]
        if kind == "stop":
            return self._end_of_stream() + [CallStopped("stopped")]
        if kind == "connected":
            return []
        if kind is None:
            return [ProtocolError("message without an event")]
        return [ProtocolError(f"unknown Twilio event {kind[:40]!r}")]

    def _start(self, msg: dict) -> list[Event]:
        if self._started:
            return [ProtocolError("duplicate start (ignored)")]
        start = msg.get("start")
        if not isinstance(start, dict):
            return [ProtocolError("start without a start object")]
        events: list[Event] = []
        fmt = start.get("mediaFormat")
        encoding = text(pick(fmt, "encoding"))
        rate = integer(pick(fmt, "sampleRate"))
        if (encoding is not None and encoding != "audio/x-mulaw") or (rate is not None and rate != RATE):
            events.append(ProtocolError(f"unexpected media format {encoding}/{rate}; using audio/x-mulaw 8000"))
        self.stream_sid = text(start.get("streamSid")) or text(msg.get("streamSid"))
        if self.stream_sid is None:
            events.append(ProtocolError("start without streamSid"))
        chunker = Chunker(FRAME_BYTES, multiple=FRAME_BYTES, min_size=FRAME_BYTES, fill=silence_byte("mulaw"))
        self._begin(Decoder("mulaw", RATE), Outbound("mulaw", RATE, chunker))
        events.append(
            CallStarted(
                provider=self.name,
                call_id=text(start.get("callSid")),
                stream_id=self.stream_sid,
                from_number=None,
                to_number=None,
                custom=string_dict(start.get("customParameters")),
            )
        )
        return events

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        return [json_frame({"event": "media", "streamSid": self.stream_sid, "media": {"payload": b64encode(chunk)}})]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def _clear_frame(self) -> Frame:
        return json_frame({"event": "clear", "streamSid": self.stream_sid})
