"""Plivo audio streams (``<Stream bidirectional="true">``): the wire format.

Sources: *Plivo-docs* = plivo.com "Audio Streaming" reference (messages from
and to Plivo), docs.plivo.com ``<Stream>`` XML (``contentType``,
``extraHeaders``), "checkpoint event", "clear audio stream" and "playAudio
event" pages, and support article "How do I know if the buffered audio is
played" (which calls the checkpoint answer ``played``).

Plivo -> UpVoot (JSON text; ``sequenceNumber`` a number)
  {"event": "start", "sequenceNumber": 1, "start": {"callId", "streamId",
   "accountId", "tracks": ["inbound"], "mediaFormat": {"encoding":
   "audio/x-mulaw" | "audio/x-l16", "sampleRate": 8000 | 16000}},
   "extra_headers": "k=v;..."}                             -> CallStarted
      ``extra_headers`` (the XML's ``extraHeaders``) is split on ``,`` / ``;``
      into ``custom``; the raw string is kept as ``custom["extra_headers"]``.
  {"event": "media", "streamId", "media": {"track", "timestamp", "chunk",
   "payload"}}                                             -> CallerAudio
      (tracks other than ``inbound`` are ignored)
  {"event": "dtmf", "dtmf": {"digit"}}                     -> Dtmf
  {"event": "playedStream" | "played", "streamId", "name"} -> PlayoutMark
      (sent only if the audio before the checkpoint played successfully)
  {"event": "clearedAudio", "streamId"}                    -> PlayoutMark(cleared=True)
      for every checkpoint outstanding when we sent clearAudio.
  A ``stop`` event is not documented (the end is the socket closing); one is
  accepted as CallStopped("stopped").

UpVoot -> Plivo
  {"event": "playAudio", "media": {"contentType": "audio/x-l16" |
   "audio/x-mulaw", "sampleRate": 8000 | 16000, "payload": BASE64}}
      in the stream's own format (``start.mediaFormat``), 20 ms per message
      (no size rule is documented), the last one padded with silence.
  {"event": "checkpoint", "streamId": ID, "name": NAME}
  {"event": "clearAudio", "streamId": ID}

Stream content types (``<Stream contentType>``): ``audio/x-l16;rate=8000``
(default), ``audio/x-l16;rate=16000``, ``audio/x-mulaw;rate=8000``.
Outbound calls before ``start`` are queued and replayed on ``start`` (see
``ProviderFraming``: :meth:`drain`); media before ``start`` is dropped with a
ProtocolError. transcript / interim / turn_start / event: no channel.

UNCONFIRMED
  * L16 byte order: the docs say "raw audio"; RTP's L16 is big-endian but
    the integrations we know of (bolna, pipecat) send little-endian PCM and
    Plivo's default is L16. We use little-endian both ways;
    ``PlivoFraming(l16_byte_order="big")`` switches.
  * whether ``clearedAudio`` is always sent; if not, cleared checkpoints are
    never reported (Plivo does not echo them).
"""

from __future__ import annotations

from collections.abc import Mapping

from upvoot.framing.base import Event, Frame, ProtocolError
from upvoot.framing.convert import Decoder, Outbound
from upvoot.framing.jsonwire import b64encode, integer, json_frame, pick, text
from upvoot.framing.provider import Handler, ProviderFraming, frames_of_20ms

RATES = (8000, 16000)


def _extra_headers(raw: object) -> dict:
    out: dict = {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    s = text(raw)
    if not s:
        return out
    out["extra_headers"] = s
    for part in s.replace(";", ",").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


class PlivoFraming(ProviderFraming):
    name = "plivo"
    title = "Plivo"
    acknowledges_playout = True
    INBOUND_TRACKS = ("inbound",)

    def __init__(self, l16_byte_order: str = "little") -> None:
        super().__init__()
        if l16_byte_order not in ("little", "big"):
            raise ValueError("l16_byte_order must be 'little' or 'big'")
        self._l16 = "s16le" if l16_byte_order == "little" else "s16be"
        self.stream_id: str | None = None
        self._content_type = "audio/x-l16"

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> PlivoFraming:
        return cls(l16_byte_order=params.get("l16-byte-order", params.get("l16_byte_order", "little")))

    # frames in -----------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        mark = lambda msg: self._mark_echo(msg.get("name"))  # noqa: E731
        return {
            "media": self._media,
            "start": self._start_message,
            "playedStream": mark,
            "played": mark,
            "clearedAudio": self._cleared,
            "dtmf": self._dtmf,
            "stop": self._stop,
        }

    def _media(self, msg: dict) -> list[Event]:
        media = msg.get("media")
        return self._media_audio(media) if self._inbound(media) else []

    def _dtmf(self, msg: dict) -> list[Event]:
        dtmf = msg.get("dtmf")
        return self._digit(pick(dtmf, "digit") if isinstance(dtmf, dict) else dtmf)

    def _start(self, msg: dict, start: dict) -> list[Event]:
        events: list[Event] = []
        fmt = start.get("mediaFormat")
        encoding = (text(pick(fmt, "encoding")) or "audio/x-l16").lower()
        rate = integer(pick(fmt, "sampleRate")) or 8000
        if "mulaw" in encoding or "ulaw" in encoding:
            codec, self._content_type = "mulaw", "audio/x-mulaw"
            if rate != 8000:
                events.append(ProtocolError(f"μ-law at {rate} Hz is not offered; using 8000"))
                rate = 8000
        else:
            if "l16" not in encoding:
                events.append(ProtocolError(f"unknown encoding {encoding[:40]!r}; using audio/x-l16"))
            codec, self._content_type = self._l16, "audio/x-l16"
            if rate not in RATES:
                events.append(ProtocolError(f"unsupported sampleRate {rate}; using 8000"))
                rate = 8000
        self.stream_id = text(start.get("streamId")) or text(msg.get("streamId"))
        return self._open_stream(
            events, Decoder(codec, rate), Outbound(codec, rate, frames_of_20ms(codec, rate)), missing="streamId",
            call_id=text(start.get("callId")), stream_id=self.stream_id,
            custom=_extra_headers(msg.get("extra_headers")),
        )

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        assert self._out is not None
        media = {"contentType": self._content_type, "sampleRate": self._out.rate, "payload": b64encode(chunk)}
        return [json_frame({"event": "playAudio", "media": media})]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def _clear_frame(self) -> Frame:
        return json_frame({"event": "clearAudio", "streamId": self.stream_id})
