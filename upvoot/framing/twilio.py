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

from upvoot.framing.base import Event, Frame, ProtocolError
from upvoot.framing.convert import Decoder, Outbound
from upvoot.framing.jsonwire import b64encode, integer, json_frame, pick, string_dict, text
from upvoot.framing.provider import Handler, ProviderFraming, frames_of_20ms

RATE = 8000
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz


class TwilioFraming(ProviderFraming):
    name = "twilio"
    title = "Twilio"
    acknowledges_playout = True
    IGNORED = ("connected",)

    def __init__(self) -> None:
        super().__init__()
        self.stream_sid: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TwilioFraming:
        return cls()

    # frames in -----------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        return {
            "media": self._media,
            "start": self._start_message,
            "mark": lambda msg: self._mark_echo(pick(msg.get("mark"), "name")),
            "dtmf": lambda msg: self._digit(pick(msg.get("dtmf"), "digit")),
            "stop": self._stop,
        }

    def _media(self, msg: dict) -> list[Event]:
        media = msg.get("media")
        return self._media_audio(media) if self._inbound(media) else []

    def _start(self, msg: dict, start: dict) -> list[Event]:
        events: list[Event] = []
        fmt = start.get("mediaFormat")
        encoding = text(pick(fmt, "encoding"))
        rate = integer(pick(fmt, "sampleRate"))
        if (encoding is not None and encoding != "audio/x-mulaw") or (rate is not None and rate != RATE):
            events.append(ProtocolError(f"unexpected media format {encoding}/{rate}; using audio/x-mulaw 8000"))
        self.stream_sid = text(start.get("streamSid")) or text(msg.get("streamSid"))
        return self._open_stream(
            events, Decoder("mulaw", RATE), Outbound("mulaw", RATE, frames_of_20ms("mulaw", RATE)), missing="streamSid",
            call_id=text(start.get("callSid")), stream_id=self.stream_sid,
            custom=string_dict(start.get("customParameters")),
        )

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        return [json_frame({"event": "media", "streamSid": self.stream_sid, "media": {"payload": b64encode(chunk)}})]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def _clear_frame(self) -> Frame:
        return json_frame({"event": "clear", "streamSid": self.stream_sid})
