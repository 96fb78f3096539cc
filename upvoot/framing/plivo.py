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

from upvoot.framing.base import CallStarted, CallStopped, Dtmf, Event, Frame, ProtocolError
from upvoot.framing.convert import (
    Chunker,
    Decoder,
    Outbound,
    ProviderFraming,
    b64decode,
    b64encode,
    bytes_per_sample,
    integer,
    json_frame,
    load_object,
    pick,
    silence_byte,
    text,
)

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
    acknowledges_playout = True

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
    def receive_binary(self, data: bytes) -> list[Event]:
        return [ProtocolError("Plivo sends no binary frames")]

    def receive_text(self, frame: str) -> list[Event]:
        msg = load_object(frame)
        if isinstance(msg, ProtocolError):
            return [msg]
        kind = text(msg.get("event"))
        if kind == "media":
            media = msg.get("media")
            track = text(pick(media, "track"))
            if track is not None and track != "inbound":
                return []
            payload = b64decode(pick(media, "payload"))
            if isinstance(payload, ProtocolError):
                return [payload]
            return self._caller_audio(payload)
        if kind == "start":
            return self._start(msg)
        if kind in ("playedStream", "played"):
            return self._mark_echo(msg.get("name"))
        if kind == "clearedAudio":
            return self._marks.release_cleared()
        if kind == "dtmf":
            dtmf = msg.get("dtmf")
            digit = text(pick(dtmf, "digit")) if isinstance(dtmf, dict) else text(dtmf)
            return [Dtmf(digit)] if digit else [ProtocolError("dtmf without a digit")]
        if kind == "stop":
            return self._end_of_stream() + [CallStopped("stopped")]
        if kind is None:
            return [ProtocolError("message without an event")]
        return [ProtocolError(f"unknown Plivo event {kind[:40]!r}")]

    def _start(self, msg: dict) -> list[Event]:
        if self._started:
            return [ProtocolError("duplicate start (ignored)")]
        start = msg.get("start")
        if not isinstance(start, dict):
            return [ProtocolError("start without a start object")]
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
        if self.stream_id is None:
            events.append(ProtocolError("start without streamId"))
        frame = rate // 50 * bytes_per_sample(codec)  # 20 ms
        chunker = Chunker(frame, multiple=frame, min_size=frame, fill=silence_byte(codec))
        self._begin(Decoder(codec, rate), Outbound(codec, rate, chunker))
        events.append(
            CallStarted(
                provider=self.name,
                call_id=text(start.get("callId")),
                stream_id=self.stream_id,
                custom=_extra_headers(msg.get("extra_headers")),
            )
        )
        return events

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        assert self._out is not None
        media = {"contentType": self._content_type, "sampleRate": self._out.rate, "payload": b64encode(chunk)}
        return [json_frame({"event": "playAudio", "media": media})]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def _clear_frame(self) -> Frame:
        return json_frame({"event": "clearAudio", "streamId": self.stream_id})
