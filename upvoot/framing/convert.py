"""Streaming audio conversion and small shared pieces for the provider codecs.

Internal audio is 16 kHz mono s16le (``upvoot.audio``). Providers speak
other codecs and rates; each codec owns one :class:`Decoder` (provider ->
internal) and one :class:`Outbound` (internal -> provider chunks). Both keep
their resampler state (``upvoot.audio.StreamResampler``, soxr) across
frames, so chunked conversion matches one-shot conversion (same length,
samples within soxr's ±2 LSB of rounding): no clicks at frame edges.

Codec names used here: ``"s16le"`` (linear PCM little-endian, e.g. Exotel,
Vonage), ``"s16be"`` (linear PCM big-endian, RFC 3551 L16), ``"mulaw"`` and
``"alaw"`` (G.711, :mod:`upvoot.framing.g711`).

Latency note: soxr's streaming resampler emits in blocks, not per frame.
Measured with 20 ms frames at quality HQ: 8 <-> 16 kHz gives nothing for
the first five frames, then about 100 ms at a time; 16 <-> 24 kHz about
20-40 ms at a time. Outbound this is absorbed by the chunker and by
``flush()`` at the end of each utterance; inbound (8 kHz providers) it
delays caller audio by up to ~100 ms more than the frame size.

The module also holds the little helpers every JSON provider codec needs
(tolerant field access, base64, marks bookkeeping, the pre-start backlog);
they are pure and have no knowledge of any one provider.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from upvoot import audio
from upvoot.framing import g711
from upvoot.framing.base import CallerAudio, Frame, PlayoutMark, ProtocolError

CODECS = ("s16le", "s16be", "mulaw", "alaw")


def bytes_per_sample(codec: str) -> int:
    return 1 if codec in ("mulaw", "alaw") else 2


def silence_byte(codec: str) -> bytes:
    """The byte that encodes digital silence (the zero byte is loud in G.711)."""
    if codec == "mulaw":
        return bytes([g711.ULAW_SILENCE])
    if codec == "alaw":
        return bytes([g711.ALAW_SILENCE])
    return b"\x00"


def _check(codec: str, rate: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown audio codec {codec!r} (known: {', '.join(CODECS)})")
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"bad sample rate {rate!r}")


def encode(samples: np.ndarray, codec: str) -> bytes:
    """int16 samples -> ``codec`` bytes."""
    if codec == "s16le":
        return samples.astype("<i2").tobytes()
    if codec == "s16be":
        return samples.astype(">i2").tobytes()
    if codec == "mulaw":
        return g711.ulaw_encode(samples)
    if codec == "alaw":
        return g711.alaw_encode(samples)
    raise ValueError(f"unknown audio codec {codec!r}")


def decode(data: bytes, codec: str) -> np.ndarray:
    """``codec`` bytes (whole samples) -> int16 samples."""
    if codec == "s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    if codec == "s16be":
        return np.frombuffer(data, dtype=">i2").astype(np.int16)
    if codec == "mulaw":
        return g711.ulaw_decode(data)
    if codec == "alaw":
        return g711.alaw_decode(data)
    raise ValueError(f"unknown audio codec {codec!r}")


class Decoder:
    """Provider payloads (``codec`` at ``rate``) -> internal 16 kHz s16le.

    A linear-PCM byte split across two payloads is carried to the next one.
    """

    def __init__(self, codec: str, rate: int) -> None:
        _check(codec, rate)
        self.codec = codec
        self.rate = rate
        self._odd = b""
        self._resampler = audio.StreamResampler(rate, audio.RATE)

    def feed(self, data: bytes) -> bytes:
        if bytes_per_sample(self.codec) == 2:
            data = self._odd + data
            cut = len(data) - len(data) % 2
            data, self._odd = data[:cut], data[cut:]
        if not data:
            return b""
        pcm = decode(data, self.codec).astype("<i2").tobytes()
        return self._resampler.feed(pcm)

    def flush(self) -> bytes:
        """The resampler's tail at the end of the stream; the decoder is then fresh."""
        tail = self._resampler.feed(b"", last=True) if self.rate != audio.RATE else b""
        self._odd = b""
        self._resampler = audio.StreamResampler(self.rate, audio.RATE)
        return tail


class Encoder:
    """Internal 16 kHz s16le -> ``codec`` bytes at ``rate``."""

    def __init__(self, codec: str, rate: int) -> None:
        _check(codec, rate)
        self.codec = codec
        self.rate = rate
        self._odd = b""
        self._resampler = audio.StreamResampler(audio.RATE, rate)

    def feed(self, pcm: bytes) -> bytes:
        pcm = self._odd + pcm
        cut = len(pcm) - len(pcm) % 2
        pcm, self._odd = pcm[:cut], pcm[cut:]
        if not pcm:
            return b""
        out = self._resampler.feed(pcm)
        return encode(audio.to_int16(out), self.codec) if out else b""

    def flush(self) -> bytes:
        """End of an utterance: the resampler's tail; then ready for the next one."""
        out = self._resampler.feed(b"", last=True) if self.rate != audio.RATE else b""
        self.reset()
        return encode(audio.to_int16(out), self.codec) if out else b""

    def reset(self) -> None:
        """Drop all state (barge-in): the next audio starts a fresh stream."""
        self._odd = b""
        self._resampler = audio.StreamResampler(audio.RATE, self.rate)


class Chunker:
    """Accumulates bytes and cuts chunks that obey a provider's size rules.

    ``push`` emits chunks of exactly ``size`` bytes; ``flush`` emits what is
    left, padded with ``fill`` up to a multiple of ``multiple`` and to at
    least ``min_size``. Every chunk is therefore a multiple of ``multiple``
    and within ``[min_size, max_size]``.
    """

    def __init__(
        self,
        size: int,
        *,
        multiple: int = 1,
        min_size: int = 0,
        max_size: int | None = None,
        fill: bytes = b"\x00",
    ) -> None:
        max_size = size if max_size is None else max_size
        if size <= 0 or multiple <= 0 or size % multiple:
            raise ValueError(f"chunk size {size} is not a positive multiple of {multiple}")
        if not (min_size <= size <= max_size):
            raise ValueError(f"chunk size {size} is outside [{min_size}, {max_size}]")
        if len(fill) != 1:
            raise ValueError("fill must be a single byte")
        self.size = size
        self.multiple = multiple
        self.min_size = min_size
        self.max_size = max_size
        self.fill = fill
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def push(self, data: bytes) -> list[bytes]:
        self._buf += data
        n = len(self._buf) // self.size
        if not n:
            return []
        out = [bytes(self._buf[i * self.size : (i + 1) * self.size]) for i in range(n)]
        del self._buf[: n * self.size]
        return out

    def flush(self) -> list[bytes]:
        if not self._buf:
            return []
        n = len(self._buf)
        target = max(-(-n // self.multiple), -(-self.min_size // self.multiple)) * self.multiple
        chunk = bytes(self._buf) + self.fill * (target - n)
        self._buf.clear()
        return [chunk]

    def reset(self) -> None:
        self._buf.clear()


class Outbound:
    """Agent audio -> provider chunks: an :class:`Encoder` then a :class:`Chunker`,
    with marks kept in place.

    ``push``/``end`` return a list of items in wire order: ``bytes`` is a
    chunk to send, ``str`` is the name of a mark to send right after the
    chunks before it. A mark is held until every chunk that carries audio
    pushed before the mark has been emitted (the encoder and chunker hold up
    to one chunk plus the resampler's block), so the provider's echo means
    "the caller heard everything up to here", never earlier.
    """

    def __init__(self, codec: str, rate: int, chunker: Chunker) -> None:
        self.encoder = Encoder(codec, rate)
        self.chunker = chunker
        self._bps = bytes_per_sample(codec)
        self._pushed = 0  # 16 kHz samples in since the utterance began
        self._emitted = 0  # provider bytes out in chunks since then
        self._marks: list[tuple[int, str]] = []  # (emitted-bytes threshold, name)

    @property
    def codec(self) -> str:
        return self.encoder.codec

    @property
    def rate(self) -> int:
        return self.encoder.rate

    def push(self, pcm: bytes) -> list[bytes | str]:
        self._pushed += len(pcm) // 2
        return self._emit(self.chunker.push(self.encoder.feed(pcm)))

    def mark(self, name: str) -> list[bytes | str]:
        samples = -(-self._pushed * self.rate // audio.RATE)
        self._marks.append((samples * self._bps, name))
        return self._emit([])

    def end(self) -> list[bytes | str]:
        """End of an utterance: everything still held, the last chunk padded."""
        chunks = self.chunker.push(self.encoder.flush()) + self.chunker.flush()
        items = self._emit(chunks)
        items += [name for _, name in self._marks]  # all their audio is out now
        self._marks.clear()
        self._pushed = self._emitted = 0
        return items

    def drop(self) -> list[str]:
        """Barge-in: forget the audio not yet emitted; returns the marks that
        were waiting for it (the caller sends them after its clear)."""
        self.encoder.reset()
        self.chunker.reset()
        names = [name for _, name in self._marks]
        self._marks.clear()
        self._pushed = self._emitted = 0
        return names

    def _emit(self, chunks: list[bytes]) -> list[bytes | str]:
        items: list[bytes | str] = []
        for chunk in chunks:
            items.append(chunk)
            self._emitted += len(chunk)
            items += self._due()
        items += self._due()
        return items

    def _due(self) -> list[str]:
        names = []
        while self._marks and self._marks[0][0] <= self._emitted:
            names.append(self._marks.pop(0)[1])
        return names


# ---- JSON message helpers -----------------------------------------------------


def load_object(text: str) -> dict | ProtocolError:
    """A text frame as a JSON object, or the ProtocolError saying why not."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return ProtocolError("text frame is not JSON")
    if not isinstance(msg, dict):
        return ProtocolError("text frame is not a JSON object")
    return msg


def pick(obj: Any, *names: str) -> Any:
    """The first of ``names`` present in ``obj`` (a dict), else a
    case-insensitive match of any of them (``Event`` for ``event``), else None."""
    if not isinstance(obj, dict):
        return None
    for name in names:
        if name in obj:
            return obj[name]
    lowered = {n.lower() for n in names}
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() in lowered:
            return value
    return None


def text(value: Any) -> str | None:
    """A JSON scalar as a string (numbers too); None for missing/structured."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def integer(value: Any) -> int | None:
    """A JSON number or numeric string as an int; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                return None
            return int(f) if f.is_integer() else None
    return None


def b64decode(value: Any) -> bytes | ProtocolError:
    if not isinstance(value, str):
        return ProtocolError("media payload is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return ProtocolError("media payload is not valid base64")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_frame(obj: dict) -> Frame:
    return Frame(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def string_dict(value: Any) -> dict:
    """Custom parameters as a flat ``str -> str`` dict (other shapes dropped)."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for k, v in value.items():
        s = text(v)
        out[str(k)] = s if s is not None else json.dumps(v, separators=(",", ":"))
    return out


def parse_rate(value: Any, allowed: tuple[int, ...]) -> int | None:
    rate = integer(value)
    return rate if rate in allowed else None


def rate_param(params: Mapping[str, str], allowed: tuple[int, ...], default: int) -> int:
    """``sample-rate`` / ``sample_rate`` from URL query parameters."""
    raw = params.get("sample-rate", params.get("sample_rate"))
    if raw is None or raw == "":
        return default
    rate = parse_rate(raw, allowed)
    if rate is None:
        raise ValueError(f"sample-rate must be one of {', '.join(map(str, allowed))}, not {raw!r}")
    return rate


# ---- marks and the pre-start backlog ----------------------------------------


class MarkBook:
    """Names of marks sent and not yet acknowledged.

    After :meth:`cleared` (we sent a clear), marks still outstanding are
    reported ``cleared=True`` if the provider echoes them later (Twilio and
    Telnyx return pending marks on clear). Providers that confirm a clear
    with a message of their own (Plivo, Vonage) use :meth:`release_cleared`.
    """

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._cleared: list[str] = []

    def sent(self, name: str) -> None:
        self._pending.append(name)

    def cleared(self) -> None:
        self._cleared.extend(self._pending)
        self._pending.clear()

    def sent_cleared(self, name: str) -> None:
        """A mark sent after the audio before it was dropped."""
        self._cleared.append(name)

    def echoed(self, name: str) -> list:
        if name in self._pending:
            self._pending.remove(name)
            return [PlayoutMark(name)]
        if name in self._cleared:
            self._cleared.remove(name)
            return [PlayoutMark(name, cleared=True)]
        return [ProtocolError(f"mark {name[:60]!r} was not pending")]

    def release_cleared(self) -> list:
        """The provider confirmed our clear: marks outstanding at that clear
        will never be echoed; report them cleared now."""
        names, self._cleared = self._cleared, []
        return [PlayoutMark(n, cleared=True) for n in names]


class Backlog:
    """Outbound calls made before the provider's ``start`` (stream id or
    audio format still unknown), replayed in order once it arrives.

    ``clear()`` before start drops the queued audio but keeps marks, so every
    mark is still sent (and echoed) once the stream exists. Audio beyond
    ``max_audio_bytes`` (internal 16 kHz s16le) is dropped.
    """

    def __init__(self, max_audio_bytes: int = 30 * audio.BYTES_PER_SECOND) -> None:
        self.max_audio_bytes = max_audio_bytes
        self._ops: list[tuple[str, tuple]] = []
        self._audio_bytes = 0

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, op: str, *args: object) -> None:
        if op == "audio":
            pcm = args[0]
            assert isinstance(pcm, (bytes, bytearray))
            room = self.max_audio_bytes - self._audio_bytes
            room -= room % 2
            if room <= 0:
                return
            pcm = bytes(pcm[:room])
            self._audio_bytes += len(pcm)
            args = (pcm,)
        self._ops.append((op, args))

    def clear(self) -> None:
        self._ops = [(op, args) for op, args in self._ops if op == "mark"]
        self._audio_bytes = 0

    def replay(self, call: Callable[[str, tuple], list[Frame]]) -> list[Frame]:
        ops, self._ops, self._audio_bytes = self._ops, [], 0
        frames: list[Frame] = []
        for op, args in ops:
            frames += call(op, args)
        return frames


# ---- the half every provider codec shares --------------------------------------


class ProviderFraming(abc.ABC):
    """Common machinery of the provider codecs (subclassed per provider).

    Inbound: a subclass parses its messages and calls :meth:`_begin` when the
    provider's start message fixes the audio format, :meth:`_caller_audio`
    for each payload and :meth:`_end_of_stream` on stop.

    Outbound: until :meth:`_begin`, agent audio, marks and ends are queued in
    a :class:`Backlog` (the stream id and the audio format are not known
    yet); ``_begin`` replays them. ``receive_*`` can only return events, so
    the frames that replay produces wait in a ready list: they are returned
    first by the next outbound call of any kind, and :meth:`drain` returns
    them at once (an adapter should call it after each ``receive_*``).

    Subclasses implement ``_media_frames(chunk)``, ``_mark_frame(name)`` and
    ``_clear_frame()``.
    """

    name = "provider"
    acknowledges_playout = True

    def __init__(self) -> None:
        self._started = False
        self._stopped = False
        self._decoder: Decoder | None = None
        self._out: Outbound | None = None
        self._backlog = Backlog()
        self._ready: list[Frame] = []
        self._marks = MarkBook()

    # -- inbound helpers -------------------------------------------------------
    def _begin(self, decoder: Decoder, out: Outbound) -> None:
        self._decoder, self._out = decoder, out
        self._started = True
        self._ready += self._backlog.replay(self._run)

    def _caller_audio(self, payload: bytes) -> list:
        if self._decoder is None:
            return [ProtocolError("media before start (dropped)")]
        if self._stopped:
            return [ProtocolError("media after stop (dropped)")]
        pcm = self._decoder.feed(payload)
        return [CallerAudio(pcm)] if pcm else []

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

    # -- outbound --------------------------------------------------------------
    def drain(self) -> list[Frame]:
        """Frames made due by an inbound message (the backlog released on start)."""
        ready, self._ready = self._ready, []
        return ready

    def _run(self, op: str, args: tuple) -> list[Frame]:
        return getattr(self, "_do_" + op)(*args)

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
    def _media_frames(self, chunk: bytes) -> list[Frame]:
        """The provider's own frame for this (each codec implements it)."""

    @abc.abstractmethod
    def _mark_frame(self, name: str) -> Frame:
        """The provider's own frame for this (each codec implements it)."""

    @abc.abstractmethod
    def _clear_frame(self) -> Frame | None:
        """The provider's own frame for this (each codec implements it)."""
