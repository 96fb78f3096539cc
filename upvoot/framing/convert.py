"""Streaming audio conversion and small shared pieces for the provider codecs.

Internal audio is 16 kHz mono s16le (``upvoot.audio``). Providers speak
other codecs and rates; each codec owns one :class:`Decoder` (provider ->
internal) and one :class:`Outbound` (internal -> provider chunks). Both keep
their resampler state across frames, so chunked conversion matches one-shot
conversion (same length; the decoder's samples exactly, the outbound's
within soxr's ±2 LSB of rounding): no clicks at frame edges.

Codec names used here: ``"s16le"`` (linear PCM little-endian, e.g. Exotel,
Vonage), ``"s16be"`` (linear PCM big-endian, RFC 3551 L16), ``"mulaw"`` and
``"alaw"`` (G.711, :mod:`upvoot.framing.g711`).

Latency note: soxr's streaming resampler (``upvoot.audio.StreamResampler``,
quality HQ) emits in blocks, not per frame, and holds back ~29 ms of 8 kHz
audio at steady state (100 ms chunks; with 20 ms frames it gives nothing for
the first five frames, then about 100 ms at a time). Outbound this is
absorbed by the chunker and by ``flush()`` at the end of each utterance, so
the agent's audio keeps soxr's better filter. Inbound those ms would come
straight after the end of the caller's speech, so the decoder uses
``upvoot.audio.LowLagResampler`` (a short polyphase FIR: 3 ms at 8 kHz,
1 ms at 24 kHz).

Audio only: the JSON field helpers are in :mod:`upvoot.framing.jsonwire`,
the provider base class in :mod:`upvoot.framing.provider`, its mark book and
backlog in :mod:`upvoot.framing.outbox`.
"""

from __future__ import annotations

import numpy as np

from upvoot import audio
from upvoot.framing import g711

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
        self._resampler = audio.LowLagResampler(rate, audio.RATE) if rate != audio.RATE else None

    def feed(self, data: bytes) -> bytes:
        if bytes_per_sample(self.codec) == 2:
            data = self._odd + data
            cut = len(data) - len(data) % 2
            data, self._odd = data[:cut], data[cut:]
        if not data:
            return b""
        pcm = decode(data, self.codec).astype("<i2").tobytes()
        return pcm if self._resampler is None else self._resampler.feed(pcm)

    def flush(self) -> bytes:
        """The resampler's tail at the end of the stream; the decoder is then fresh."""
        tail = b"" if self._resampler is None else self._resampler.feed(b"", last=True)
        self._odd = b""
        return tail


class Encoder:
    """Internal 16 kHz s16le -> ``codec`` bytes at ``rate``.

    soxr HQ by default (the agent's audio: the chunker waits anyway);
    ``low_lag`` uses :class:`upvoot.audio.LowLagResampler` instead (1.5 ms of
    lag where soxr gives 20-100 ms with 20 ms frames), for a caller whose line
    is natively at ``rate`` (``upvoot.dial``'s provider simulators).
    """

    def __init__(self, codec: str, rate: int, low_lag: bool = False) -> None:
        _check(codec, rate)
        self.codec = codec
        self.rate = rate
        self.low_lag = low_lag
        self._odd = b""
        self._resampler = self._fresh()

    def _fresh(self) -> audio.StreamResampler | audio.LowLagResampler:
        if self.low_lag and self.rate != audio.RATE:
            return audio.LowLagResampler(audio.RATE, self.rate)
        return audio.StreamResampler(audio.RATE, self.rate)

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
        self._resampler = self._fresh()


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
        self._skip = 0  # encoded bytes still to discard: the output of a prime

    @property
    def codec(self) -> str:
        return self.encoder.codec

    @property
    def rate(self) -> int:
        return self.encoder.rate

    def push(self, pcm: bytes) -> list[bytes | str]:
        self._pushed += len(pcm) // 2
        return self._emit(self.chunker.push(self._unprimed(self.encoder.feed(pcm))))

    def prime(self, pcm: bytes) -> None:
        """Right after :meth:`drop`: ``pcm`` is the audio just before what
        comes next (already heard). It fills the resampler's filter, so the
        next audio is encoded as it was in the uninterrupted stream (a fresh
        resampler's start differs for some ms, up to thousands of LSB); none
        of it is sent. Nothing to do where the rate is 16 kHz."""
        if self.rate == audio.RATE or self._pushed or self.chunker.pending:
            return
        pcm = pcm[len(pcm) % 2:]
        self._skip = len(pcm) // 2 * self.rate // audio.RATE * self._bps
        self._unprimed(self.encoder.feed(pcm))

    def _unprimed(self, data: bytes) -> bytes:
        if self._skip and data:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
        return data

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
        self._pushed = self._emitted = self._skip = 0
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
