"""Telnyx media streaming (Call Control ``stream_url``): the wire format.

Sources: *Telnyx-docs* = developers.telnyx.com "Stream call media over
WebSocket" (AsyncAPI reference) and "Media streaming" guide, the
``streaming_start`` command reference (``stream_bidirectional_mode``,
``stream_bidirectional_codec``, ``stream_bidirectional_sampling_rate``) and
the TeXML ``<Stream>`` verb. pipecat-ai/pipecat#3383 for the L16 byte order.

Telnyx -> UpVoot (JSON text)
  {"event": "connected", "version": "1.0.0"}               -> nothing
  {"event": "start", "sequence_number": "1", "stream_id", "start":
   {"call_control_id", "call_session_id", "from", "to", "client_state",
   "custom_parameters": {...}, "media_format": {"encoding": "PCMU",
   "sample_rate": 8000, "channels": 1}}}                   -> CallStarted
      ``stream_id`` is top-level; ``client_state`` and ``call_session_id``
      are added to ``custom``. Encodings: PCMU (or "audio/x-mulaw" in older
      docs), PCMA, L16; G722/OPUS/AMR-WB are not decoded (one
      ProtocolError, then their media is dropped).
  {"event": "media", "sequence_number", "stream_id", "media": {"track",
   "chunk", "timestamp", "payload"}}                       -> CallerAudio
      base64 RTP payload without header; tracks other than ``inbound`` are
      ignored.
  {"event": "dtmf", "occurred_at", "dtmf": {"digit"}}       -> Dtmf
  {"event": "mark", "mark": {"name"}}                       -> PlayoutMark
  {"event": "stop", "stop": {...}}                          -> CallStopped("stopped")
  {"event": "error", "payload": {"code", "title", "detail"}} -> ProtocolError
      e.g. 100003 malformed_frame, 100005 rate_limit_reached.

UpVoot -> Telnyx (``stream_bidirectional_mode`` must be ``rtp``; the
default ``mp3`` mode takes whole MP3 files and is not supported here)
  {"event": "media", "media": {"payload": BASE64}}
      in the bidirectional codec, which Telnyx does not announce on the
      socket: it is the constructor's ``codec`` (URL ``codec=PCMU|PCMA|L16``,
      default PCMU, Telnyx's default) at ``sample-rate`` (8000 for G.711;
      L16 8000/16000/24000, default 16000). Chunks of 20 ms (Telnyx accepts
      20 ms to 30 s), the last one padded with silence.
  {"event": "mark", "mark": {"name": NAME}}
      echoed when the media before it has played, at once if none is queued.
  {"event": "clear"}
      stops playback and returns queued marks: marks outstanding at our
      clear come back as ``cleared=True``.

Outbound calls before ``start`` are queued and replayed on ``start`` (see
``ProviderFraming``: :meth:`drain`); media before ``start`` is dropped with a
ProtocolError. transcript / interim / turn_start / event: no channel.

Ordering: Telnyx-docs say "media frame order is not guaranteed; use
media.chunk, media.timestamp and sequence_number to order frames". Whether
frames really arrive out of order over the one WebSocket is UNCONFIRMED. We
never wait for a missing frame (that would add latency without a clock):
frames are delivered in arrival order, and a frame whose ``media.chunk``
(else ``sequence_number``) is not newer than the last one delivered is
dropped with a ProtocolError. Audio is thus never played out of order or
twice; if Telnyx does swap two frames, 20 ms is lost.

UNCONFIRMED
  * L16 byte order: RTP's L16 is big-endian (RFC 3551) and pipecat's Telnyx
    work treats it so; we use big-endian both ways
    (``TelnyxFraming(l16_byte_order="little")`` switches).
  * whether inbound ``sample_rate`` for L16 is always 16000.
"""

from __future__ import annotations

from collections.abc import Mapping

from upvoot.framing.base import Event, Frame, ProtocolError
from upvoot.framing.convert import Decoder, Outbound
from upvoot.framing.jsonwire import b64encode, integer, json_frame, parse_rate, pick, string_dict, text
from upvoot.framing.provider import Handler, ProviderFraming, frames_of_20ms

L16_RATES = (8000, 16000, 24000)
_CODECS = {"PCMU": "mulaw", "PCMA": "alaw", "L16": "l16"}


def _inbound_codec(encoding: str | None) -> str | None:
    e = (encoding or "PCMU").upper()
    if e in ("PCMU", "AUDIO/X-MULAW", "MULAW", "ULAW"):
        return "mulaw"
    if e in ("PCMA", "AUDIO/X-ALAW", "ALAW"):
        return "alaw"
    if e.startswith("L16") or e.startswith("AUDIO/L16") or e.startswith("AUDIO/X-L16"):
        return "l16"
    return None


class TelnyxFraming(ProviderFraming):
    name = "telnyx"
    title = "Telnyx"
    acknowledges_playout = True
    IGNORED = ("connected",)

    def __init__(self, codec: str = "PCMU", sample_rate: int | None = None, l16_byte_order: str = "big") -> None:
        super().__init__()
        key = codec.upper()
        if key not in _CODECS:
            raise ValueError(f"Telnyx bidirectional codec must be one of {', '.join(_CODECS)}, not {codec!r}")
        if l16_byte_order not in ("little", "big"):
            raise ValueError("l16_byte_order must be 'little' or 'big'")
        self._l16 = "s16be" if l16_byte_order == "big" else "s16le"
        out_codec = _CODECS[key]
        if out_codec == "l16":
            rate = 16000 if sample_rate is None else sample_rate
            if rate not in L16_RATES:
                raise ValueError(f"Telnyx L16 sample rate must be one of {L16_RATES}, not {rate!r}")
            out_codec = self._l16
        else:
            rate = 8000 if sample_rate is None else sample_rate
            if rate != 8000:
                raise ValueError(f"Telnyx {key} runs at 8000 Hz, not {rate!r}")
        self.out_codec, self.out_rate = out_codec, rate
        self.stream_id: str | None = None
        self._last_seq: int | None = None
        self._undecodable = False

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TelnyxFraming:
        raw = params.get("sample-rate", params.get("sample_rate"))
        rate = None
        if raw not in (None, ""):
            rate = integer(raw)
            if rate is None:
                raise ValueError(f"sample-rate must be a number, not {raw!r}")
        return cls(
            codec=params.get("codec", "PCMU"),
            sample_rate=rate,
            l16_byte_order=params.get("l16-byte-order", params.get("l16_byte_order", "big")),
        )

    # frames in -----------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        return {
            "media": self._media,
            "start": self._start_message,
            "mark": lambda msg: self._mark_echo(pick(msg.get("mark"), "name")),
            "dtmf": lambda msg: self._digit(pick(msg.get("dtmf"), "digit"), pick(msg.get("payload"), "digit")),
            "stop": self._stop,
            "error": self._error,
        }

    def _error(self, msg: dict) -> list[Event]:
        p = msg.get("payload")
        code, title, detail = (text(pick(p, k)) or "" for k in ("code", "title", "detail"))
        return [ProtocolError(f"Telnyx error {code} {title}: {detail}".strip()[:300])]

    def _media(self, msg: dict) -> list[Event]:
        media = msg.get("media")
        if not self._inbound(media) or self._undecodable:
            return []
        seq = integer(pick(media, "chunk"))
        if seq is None:
            seq = integer(msg.get("sequence_number"))
        if seq is not None and self._started:
            if self._last_seq is not None and seq <= self._last_seq:
                return [ProtocolError(f"media chunk {seq} arrived after {self._last_seq} (dropped)")]
            self._last_seq = seq
        return self._media_audio(media)

    def _start(self, msg: dict, start: dict) -> list[Event]:
        events: list[Event] = []
        fmt = start.get("media_format")
        encoding = text(pick(fmt, "encoding"))
        codec = _inbound_codec(encoding)
        if codec is None:
            events.append(ProtocolError(f"cannot decode {str(encoding)[:40]!r} media; caller audio is dropped"))
            self._undecodable = True
            codec, rate = "mulaw", 8000
        elif codec == "l16":
            codec = self._l16
            rate = parse_rate(pick(fmt, "sample_rate"), L16_RATES) or 16000
        else:
            rate = 8000
        self.stream_id = text(msg.get("stream_id")) or text(start.get("stream_id"))
        custom = string_dict(start.get("custom_parameters"))
        for key in ("client_state", "call_session_id"):
            value = text(start.get(key))
            if value is not None:
                custom.setdefault(key, value)
        out = Outbound(self.out_codec, self.out_rate, frames_of_20ms(self.out_codec, self.out_rate))
        return self._open_stream(
            events, Decoder(codec, rate), out, call_id=text(start.get("call_control_id")), stream_id=self.stream_id,
            from_number=text(start.get("from")), to_number=text(start.get("to")), custom=custom,
        )

    # frames out ----------------------------------------------------------
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        return [json_frame({"event": "media", "media": {"payload": b64encode(chunk)}})]

    def _mark_frame(self, name: str) -> Frame:
        return json_frame({"event": "mark", "mark": {"name": name}})

    def _clear_frame(self) -> Frame:
        return json_frame({"event": "clear"})
