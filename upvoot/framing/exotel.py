"""Exotel Voicebot applet (bidirectional stream): the wire format.

Sources: *Exotel-WS* = developer.exotel.com "AgentStream WebSocket
protocol"; *Exotel-applet* = developer.exotel.com "Working with the Stream
and Voicebot Applet"; *Exotel-support* = support.exotel.com article
3000108630 "Working with the Stream applet"; *Exotel-code* = Exotel's own
sample servers (exotel/Agent-Stream), as summarised in the project's
provider notes. Exotel is the WebSocket client; one socket per call.

Exotel -> UpVoot (JSON text frames; numbers may be strings or numbers,
snake_case per Exotel-WS, camelCase accepted as a fallback, and keys are
matched case-insensitively, e.g. ``Event``, as Exotel-code does)
  {"event": "connected"}                                    -> nothing
  {"event": "start", "stream_sid", "start": {"stream_sid", "call_sid",
   "account_sid", "from", "to", "custom_parameters": {...},
   "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000",
   "bit_rate": "16"}}}                                      -> CallStarted
      (Exotel-WS example, verified)
  {"event": "media", "stream_sid", "media": {"chunk", "timestamp",
   "payload": BASE64}}                                      -> CallerAudio
      payload: 16-bit signed little-endian PCM, mono (Exotel-applet:
      "raw/slin"), about 100 ms per message (Exotel-WS); any size accepted.
  {"event": "dtmf", "dtmf": {"digit": "5", "duration"}}     -> Dtmf
  {"event": "mark", "mark": {"name"}}                       -> PlayoutMark
      (echoed when the audio sent before the mark has played; Exotel-WS)
  {"event": "stop", "stop": {"call_sid", "account_sid",
   "reason": "stopped" | "callended"}}                      -> CallStopped(reason)
      (the stop shape and the outbound shapes below are taken from the
      provider notes' reading of Exotel-WS; the stored copy we could read
      here ends at the inbound ``mark``: not re-checked)
  {"event": "clear"}  inbound, undocumented but handled by Exotel-code:
                      accepted and ignored.

Sample rate (8000 default, 16000, 24000; Exotel-applet ``?sample-rate=``):
``start.media_format.sample_rate`` first, then the URL's ``sample-rate`` /
``sample_rate`` parameter given to the constructor, then 8000. The same rate
is used both ways.

UpVoot -> Exotel
  {"event": "media", "stream_sid": SID, "media": {"payload": BASE64,
   "chunk": "n", "timestamp": "ms"}}
      ``chunk`` counts outbound media messages from "1"; ``timestamp`` is
      the milliseconds of audio sent before this chunk. Both are strings and
      never reset. Exotel-WS documents only ``payload``; Exotel-code adds the
      other two (it reports streams ending early without them).
  {"event": "mark", "stream_sid": SID, "mark": {"name": NAME}}
  {"event": "clear", "stream_sid": SID}
      clear drops only audio that has not started playing (Exotel-applet).

Outbound chunk rules (Exotel-support, Exotel-applet "Chunk Size
Requirements"): at least 3,200 bytes, at most 100,000 bytes, always a
multiple of 320 bytes. Both pages gloss 3,200 bytes as "100 ms", but 100 ms
of 16-bit PCM at 8 kHz is 1,600 bytes: 3,200 bytes is 200 ms at 8 kHz (100
ms at 16 kHz). Exotel's own latency notes (exotel/Agent-Stream
``docs/exotel-developer/LATENCY_NOTES.md``) confirm "200 ms / 3200-byte
frames (Exotel minimum chunk size)". We keep the byte rule: chunks are the
larger of 3,200 bytes and 100 ms at the stream's rate — 3,200 bytes (200
ms) at 8 kHz, 3,200 (100 ms) at 16 kHz, 4,800 (100 ms) at 24 kHz. The last
chunk of an utterance (``audio_end``) is zero-padded up to a multiple of
320 *and* up to the 3,200-byte minimum, so every media message obeys the
documented window, at the price of at most one chunk of trailing silence
(Exotel-code pads only to a multiple of 320; we chose the documented
minimum). Since ``clear`` lets the chunk being played finish, barge-in at
8 kHz can lag by up to 200 ms; the guide's other advice of ≤ 640-byte
chunks contradicts its own minimum, so we follow the minimum.

Before ``start`` the stream id and the rate are unknown: agent audio, marks
and ends are queued and replayed on ``start`` (see ``ProviderFraming``; the
replayed frames are returned by :meth:`drain` and by the next outbound
call). Media before ``start`` is dropped with a ProtocolError.

transcript / interim / turn_start / event: Exotel documents no message for
them and does not say it tolerates unknown ones, so they produce nothing.

UNCONFIRMED
  * whether pending marks are echoed after a ``clear``: they may never come
    back, so the call must not wait for them. One that does come back is
    reported played (``cleared=False``): clear drops only audio that has not
    started playing, so a mark echoed after it follows audio that played
    (the chunk in progress finishing). A barge-in that resumes sends again
    from the last echoed mark: this keeps the finishing chunk from being
    said twice.
  * whether a mark is echoed at once when nothing is playing.
  * the μ-law variant of a beta "extension guide" (and the ExoML
    StartStream default ``audio/x-mulaw;rate=8000``): if
    ``media_format.encoding`` names μ-law/A-law it is used both ways, with
    100 ms chunks padded to a multiple of 20 ms (the 320-byte rule is
    documented for linear PCM only).
  * the ``silence`` event of that beta guide: accepted and ignored, as are
    other unknown events (reported as ProtocolError).
"""

from __future__ import annotations

from collections.abc import Mapping

from upvoot.framing.base import Event, Frame, ProtocolError
from upvoot.framing.convert import Chunker, Decoder, Outbound, bytes_per_sample, silence_byte
from upvoot.framing.jsonwire import b64encode, json_frame, parse_rate, pick, rate_param, string_dict, text
from upvoot.framing.provider import Handler, ProviderFraming

RATES = (8000, 16000, 24000)
DEFAULT_RATE = 8000
MIN_CHUNK = 3200
MAX_CHUNK = 100_000
MULTIPLE = 320


def _codec(encoding: str | None) -> str:
    e = (encoding or "").lower()
    if "mulaw" in e or "ulaw" in e or "pcmu" in e:
        return "mulaw"
    if "alaw" in e or "pcma" in e:
        return "alaw"
    return "s16le"


class ExotelFraming(ProviderFraming):
    name = "exotel"
    title = "Exotel"
    acknowledges_playout = True
    IGNORED = ("connected", "clear", "silence")
    #: clear drops only audio not yet started (Exotel-applet): a mark echoed after it has played
    CLEAR_FINISHES_PLAYING = True

    def __init__(self, sample_rate: int | None = None) -> None:
        super().__init__()
        if sample_rate is not None and sample_rate not in RATES:
            raise ValueError(f"Exotel sample rate must be one of {RATES}, not {sample_rate!r}")
        self._url_rate = sample_rate
        self.stream_sid: str | None = None
        self._chunk_no = 0
        self._sent_bytes = 0

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ExotelFraming:
        """``sample-rate`` (or ``sample_rate``) from the stream URL's query."""
        raw = params.get("sample-rate", params.get("sample_rate"))
        return cls(sample_rate=None if raw in (None, "") else rate_param(params, RATES, DEFAULT_RATE))

    # frames in -----------------------------------------------------------
    def _event_name(self, msg: dict) -> str | None:
        kind = text(pick(msg, "event"))
        return None if kind is None else kind.lower()

    def _handlers(self) -> dict[str, Handler]:
        return {
            "media": lambda msg: self._media_audio(pick(msg, "media")),
            "start": self._start_message,
            "mark": lambda msg: self._mark_echo(pick(pick(msg, "mark"), "name")),
            "dtmf": lambda msg: self._digit(pick(pick(msg, "dtmf"), "digit")),
            "stop": lambda msg: self._stop(
                msg, text(pick(pick(msg, "stop"), "reason")) or text(pick(msg, "reason")) or "stopped"
            ),
        }

    def _start_body(self, msg: dict) -> object:
        start = pick(msg, "start")
        return start if isinstance(start, dict) else msg

    def _start(self, msg: dict, start: dict) -> list[Event]:
        events: list[Event] = []
        fmt = pick(start, "media_format", "mediaFormat")
        given = pick(fmt, "sample_rate", "sampleRate")
        rate = parse_rate(given, RATES)
        if given is not None and rate is None:
            events.append(ProtocolError(f"unsupported sample_rate {str(given)[:20]!r}"))
        rate = rate or self._url_rate or DEFAULT_RATE
        codec = _codec(text(pick(fmt, "encoding")))
        self.stream_sid = text(pick(start, "stream_sid", "streamSid")) or text(pick(msg, "stream_sid", "streamSid"))
        return self._open_stream(
            events, Decoder(codec, rate), Outbound(codec, rate, _chunker(codec, rate)), missing="stream_sid",
            call_id=text(pick(start, "call_sid", "callSid")), stream_id=self.stream_sid,
            from_number=text(pick(start, "from")), to_number=text(pick(start, "to")),
            custom=string_dict(pick(start, "custom_parameters", "customParameters")),
        )

    # frames out ----------------------------------------------------------
    def _message(self, event: str, **body: object) -> Frame:
        obj: dict = {"event": event}
        if self.stream_sid is not None:
            obj["stream_sid"] = self.stream_sid
        obj.update(body)
        return json_frame(obj)

    @property
    def min_lead(self) -> float:
        """Seconds of agent audio the pacer must hand over at once for the
        first chunk to leave at once: one chunk (200 ms at 8 kHz) plus the
        resampler's block (~50 ms). With the default 100 ms lead the greeting
        waited ~100 ms for its first 3,200 bytes."""
        if self._out is None:
            return 0.0
        size = self._out.chunker.size
        return size / (self._out.rate * bytes_per_sample(self._out.codec)) + (0.05 if self._out.rate != 16000 else 0.0)

    def _media_frames(self, chunk: bytes) -> list[Frame]:
        assert self._out is not None
        self._chunk_no += 1
        ms = self._sent_bytes * 1000 // (self._out.rate * bytes_per_sample(self._out.codec))
        self._sent_bytes += len(chunk)
        media = {"payload": b64encode(chunk), "chunk": str(self._chunk_no), "timestamp": str(ms)}
        return [self._message("media", media=media)]

    def _mark_frame(self, name: str) -> Frame:
        return self._message("mark", mark={"name": name})

    def _clear_frame(self) -> Frame:
        return self._message("clear")


def _chunker(codec: str, rate: int) -> Chunker:
    bps = bytes_per_sample(codec)
    size = rate // 10 * bps  # 100 ms
    if bps == 2:
        # 3,200 bytes is 200 ms at 8 kHz, 100 ms at 16 kHz; 4,800 at 24 kHz.
        size = max(MIN_CHUNK, size)
        return Chunker(size, multiple=MULTIPLE, min_size=MIN_CHUNK, max_size=MAX_CHUNK, fill=silence_byte(codec))
    frame = rate // 50  # 20 ms of G.711 (UNCONFIRMED variant)
    return Chunker(size, multiple=frame, min_size=size, max_size=MAX_CHUNK, fill=silence_byte(codec))
