"""What every provider codec shares: the :class:`ProviderFraming` base class
(its marks in flight and pre-start backlog are :mod:`upvoot.framing.outbox`).

A provider codec (Exotel, Twilio, Plivo, Telnyx, Vonage) subclasses
:class:`ProviderFraming` and writes only what is its own: the names of its
events and the handlers for them, how its start message fixes the audio
format, and its outbound messages. The rest (JSON parsing, bounded by
:mod:`upvoot.framing.jsonwire`; track filtering; base64; DTMF; stop; marks;
queueing before start; barge-in) is here, once. Pure: no provider knowledge.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from upvoot import audio
from upvoot.framing.base import CallerAudio, CallStarted, CallStopped, Dtmf, Event, Frame, ProtocolError
from upvoot.framing.convert import Chunker, Decoder, Outbound, bytes_per_sample, silence_byte
from upvoot.framing.jsonwire import b64decode, load_object, pick, text
from upvoot.framing.outbox import Backlog, MarkBook

Handler = Callable[[dict], list]


def frames_of_20ms(codec: str, rate: int) -> Chunker:
    """A chunker cutting whole 20 ms frames, the last one padded with silence."""
    frame = rate // 50 * bytes_per_sample(codec)
    return Chunker(frame, multiple=frame, min_size=frame, fill=silence_byte(codec))


# ---- the half every provider codec shares --------------------------------------


class ProviderFraming(abc.ABC):
    """Common machinery of the provider codecs (subclassed per provider).

    Inbound: :meth:`receive_text` parses the message (bounded JSON), reads
    its event name (:meth:`_event_name`) and calls the subclass's handler
    for it from :meth:`_handlers`; names in ``IGNORED`` give nothing, others
    a ProtocolError. The start message goes to :meth:`_start_message`, which
    calls the subclass's :meth:`_start`; that ends with :meth:`_open_stream`
    once it knows the audio format. Other handlers use :meth:`_media_audio`
    for each payload, :meth:`_digit`, :meth:`_stop` and :meth:`_mark_echo`.

    Outbound: until :meth:`_begin`, agent audio, marks and ends are queued in
    a :class:`Backlog` (the stream id and the audio format are not known
    yet); ``_begin`` replays them. ``receive_*`` can only return events, so
    the frames that replay produces wait in a ready list: they are returned
    first by the next outbound call of any kind, and :meth:`drain` returns
    them at once (an adapter calls it after each ``receive_*``).

    Subclasses implement ``_handlers()``, ``_start(msg, start)``, ``_media_frames(chunk)``,
    ``_mark_frame(name)`` and ``_clear_frame()``.
    """

    name = "provider"
    #: the provider's name in messages ("unknown Twilio event ...")
    title = "provider"
    acknowledges_playout = True
    #: seconds of lead the pacer must give (see ExotelFraming.min_lead)
    min_lead = 0.0
    #: event names accepted and ignored
    IGNORED: tuple[str, ...] = ()
    #: the name of the message that starts the stream
    START_EVENT = "start"
    CLEAR_FINISHES_PLAYING = False  # a mark echoed after our clear has played (see MarkBook)
    #: media tracks that carry the caller (others are ignored)
    INBOUND_TRACKS: tuple[str, ...] = ("inbound", "inbound_track")

    def __init__(self) -> None:
        self._started = False
        self._stopped = False
        self._decoder: Decoder | None = None
        self._out: Outbound | None = None
        self._backlog = Backlog()
        self._ready: list[Frame] = []
        self._marks = MarkBook(echo_means_played=self.CLEAR_FINISHES_PLAYING)
        self._on = self._handlers()

    # -- inbound ---------------------------------------------------------------
    def receive_binary(self, data: bytes) -> list[Event]:
        return [ProtocolError(f"{self.title} sends no binary frames")]

    def receive_text(self, frame: str) -> list[Event]:
        msg = load_object(frame)
        if isinstance(msg, ProtocolError):
            return [msg]
        kind = self._event_name(msg)
        if kind is None:
            return [ProtocolError("message without an event")]
        handler = self._on.get(kind)
        if handler is not None:
            return handler(msg)
        if kind in self.IGNORED:
            return []
        return [ProtocolError(f"unknown {self.title} event {kind[:40]!r}")]

    @property
    def mark_every(self) -> int:
        """Bytes of 16 kHz audio between marks: the fewest whole outbound
        chunks that make at least 100 ms (Exotel 8 kHz: one 200 ms chunk,
        6,400 bytes at 16 kHz; 20 ms chunks: five). A mark then falls at a
        chunk's end: its echo after a clear (the playing chunk finishes)
        is exactly where the caller's ear stopped, and a resume from it
        says nothing twice."""
        if self._out is None:
            return 3200
        chunk = self._out.chunker.size // bytes_per_sample(self._out.codec)  # provider samples
        internal = -(-chunk * audio.RATE // self._out.rate) * 2  # bytes at 16 kHz
        return -(-3200 // internal) * internal

    def _event_name(self, msg: dict) -> str | None:
        return text(msg.get("event"))

    def _start_message(self, msg: dict) -> list[Event]:
        """The handler of the provider's start message: refuses a second one
        and one without a body, else the subclass's :meth:`_start`."""
        if self._started:
            return [ProtocolError(f"duplicate {self.START_EVENT} (ignored)")]
        start = self._start_body(msg)
        if not isinstance(start, dict):
            return [ProtocolError("start without a start object")]
        return self._start(msg, start)

    def _start_body(self, msg: dict) -> object:
        return msg.get("start")

    def _open_stream(
        self, events: list[Event], decoder: Decoder, out: Outbound, *, missing: str | None = None, **call: Any
    ) -> list[Event]:
        """The end of every start: the stream begins and the call is reported
        (after ``events``, and a ProtocolError if the stream id, ``missing``,
        is absent)."""
        if missing is not None and call.get("stream_id") is None:
            events.append(ProtocolError(f"start without {missing}"))
        self._begin(decoder, out)
        events.append(CallStarted(provider=self.name, **call))
        return events

    def _begin(self, decoder: Decoder, out: Outbound) -> None:
        self._decoder, self._out = decoder, out
        self._started = True
        self._ready += self._backlog.replay(self._run)

    def _inbound(self, media: Any) -> bool:
        """Whether a media object is the caller's track (or names none)."""
        track = text(pick(media, "track"))
        return track is None or track in self.INBOUND_TRACKS

    def _media_audio(self, media: Any) -> list:
        """A media object's base64 ``payload`` as caller audio."""
        payload = b64decode(pick(media, "payload"))
        if isinstance(payload, ProtocolError):
            return [payload]
        return self._caller_audio(payload)

    def _caller_audio(self, payload: bytes) -> list:
        if self._decoder is None:
            return [ProtocolError("media before start (dropped)")]
        if self._stopped:
            return [ProtocolError("media after stop (dropped)")]
        pcm = self._decoder.feed(payload)
        return [CallerAudio(pcm)] if pcm else []

    @staticmethod
    def _digit(*candidates: Any) -> list:
        """The first candidate that is a digit, as a Dtmf event."""
        for candidate in candidates:
            digit = text(candidate)
            if digit:
                return [Dtmf(digit)]
        return [ProtocolError("dtmf without a digit")]

    def _stop(self, msg: dict, reason: str = "stopped") -> list:
        return self._end_of_stream() + [CallStopped(reason)]

    def _end_of_stream(self) -> list:
        events: list = []
        if self._decoder is not None and not self._stopped:
            tail = self._decoder.flush()
            if tail:
                events.append(CallerAudio(tail))
        self._stopped = True
        return events

    def _mark_echo(self, name: Any) -> list:
        label = text(name)
        if label is None:
            return [ProtocolError("mark echo without a name")]
        return self._marks.echoed(label)

    def _cleared(self, msg: dict) -> list:
        """The provider confirmed our clear (Plivo, Vonage)."""
        return self._marks.release_cleared()

    # -- outbound --------------------------------------------------------------
    def drain(self) -> list[Frame]:
        """Frames made due by an inbound message (the backlog released on start)."""
        ready, self._ready = self._ready, []
        return ready

    def _run(self, op: str, args: tuple) -> list[Frame]:
        do = {"audio": self._do_audio, "mark": self._do_mark, "end": self._do_end}[op]
        return do(*args)

    def _items(self, items: list[bytes | str]) -> list[Frame]:
        frames: list[Frame] = []
        for item in items:
            if isinstance(item, str):
                self._marks.sent(item)
                frames.append(self._mark_frame(item))
            else:
                frames += self._media_frames(item)
        return frames

    def _do_audio(self, pcm: bytes) -> list[Frame]:
        assert self._out is not None
        return self._items(self._out.push(pcm))

    def _do_mark(self, name: str) -> list[Frame]:
        assert self._out is not None
        return self._items(self._out.mark(name))

    def _do_end(self) -> list[Frame]:
        assert self._out is not None
        return self._items(self._out.end())

    def audio_start(self) -> list[Frame]:
        return self.drain()

    def audio(self, pcm: bytes) -> list[Frame]:
        if not pcm:
            return self.drain()
        if not self._started:
            self._backlog.add("audio", bytes(pcm))
            return []
        return self.drain() + self._do_audio(bytes(pcm))

    def flush(self) -> list[Frame]:
        """All audio of the utterance has been handed over: send what the
        encoder and chunker still hold (the last chunk padded) and the marks
        waiting for it, without waiting for ``audio_end``. The adapter calls
        it with the utterance's last mark: ``audio_end`` comes only once that
        mark is echoed, which it cannot be while its audio is held here."""
        if not self._started:
            return []
        return self.drain() + self._do_end()

    def audio_end(self, interrupted: bool) -> list[Frame]:
        if not self._started:
            if interrupted:
                self._backlog.clear()
            else:
                self._backlog.add("end")
            return []
        if interrupted:
            # The rest of the reply was dropped: nothing more of it is sent.
            assert self._out is not None
            return self.drain() + self._send_dropped(self._out.drop())
        return self.drain() + self._do_end()

    def prime(self, pcm: bytes) -> list[Frame]:
        """After a clear, before a resume: the audio just before it (heard
        already) primes the outbound resampler; nothing of it is sent."""
        if self._started and self._out is not None:
            self._out.prime(bytes(pcm))
        return self.drain()

    def mark(self, name: str) -> list[Frame]:
        if not self._started:
            self._backlog.add("mark", name)
            return []
        return self.drain() + self._do_mark(name)

    def clear(self) -> list[Frame]:
        if not self._started:
            self._backlog.clear()
            return []
        assert self._out is not None
        waiting = self._out.drop()
        self._marks.cleared()
        frames = self.drain()
        clear = self._clear_frame()
        if clear is not None:
            frames.append(clear)
        return frames + self._send_dropped(waiting)

    def _send_dropped(self, names: list[str]) -> list[Frame]:
        """Marks whose audio was dropped before it was sent: send them anyway
        (the provider echoes them once what it holds has played) and report
        them as cleared."""
        frames = []
        for name in names:
            self._marks.sent_cleared(name)
            frames.append(self._mark_frame(name))
        return frames

    def transcript(self, role: str, text: str) -> list[Frame]:
        return self.drain()

    def interim(self, text: str) -> list[Frame]:
        return self.drain()

    def turn_start(self) -> list[Frame]:
        return self.drain()

    def event(self, type: str, **fields: object) -> list[Frame]:
        return self.drain()

    # -- subclass hooks -------------------------------------------------------
    @abc.abstractmethod
    def _handlers(self) -> dict[str, Handler]:
        """Event name -> handler of the whole message (each codec lists its own)."""

    @abc.abstractmethod
    def _start(self, msg: dict, start: dict) -> list[Event]:
        """The provider's start message (``start`` its body): fix the audio
        format and end with :meth:`_open_stream`."""

    @abc.abstractmethod
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        """The provider's own frame for this (each codec implements it)."""

    @abc.abstractmethod
    def _mark_frame(self, name: str) -> Frame:
        """The provider's own frame for this (each codec implements it)."""

    @abc.abstractmethod
    def _clear_frame(self) -> Frame | None:
        """The provider's own frame for this (each codec implements it)."""
