"""PCM helpers on numpy: the one place that knows UpVoot's internal audio format.

Internal format: 16 kHz, mono, signed 16-bit little-endian (s16le). A *frame*
is 20 ms (320 samples, 640 bytes): the unit of VAD decisions and of pacing.
"""

from __future__ import annotations

import io
import wave

import numpy as np

RATE = 16000
SAMPLE_BYTES = 2
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000  # 320
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_BYTES  # 640
BYTES_PER_SECOND = RATE * SAMPLE_BYTES


def duration(pcm: bytes | int) -> float:
    """Seconds of 16 kHz s16le audio in ``pcm`` (bytes, or a byte count)."""
    n = pcm if isinstance(pcm, int) else len(pcm)
    return n / BYTES_PER_SECOND


def to_int16(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


def to_float32(pcm: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1), the layout speech models want."""
    return to_int16(pcm).astype(np.float32) / 32768.0


def from_float32(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> s16le bytes, clipped rather than wrapped."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32) * 32767.0, -32768, 32767)
    return np.round(clipped).astype("<i2").tobytes()


def rms_dbfs(pcm: bytes) -> float:
    """Level of ``pcm`` in dBFS (a full-scale sine is about -3 dBFS); -120 for digital silence."""
    x = to_int16(pcm).astype(np.float64)
    if x.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(x * x)))
    if rms < 1e-9:
        return -120.0
    return 20.0 * np.log10(rms / 32768.0)


def tone(freq: float, seconds: float, level_dbfs: float = -12.0, rate: int = RATE) -> bytes:
    """A sine tone (handy for tests and for the dialer's self-check)."""
    n = int(round(seconds * rate))
    amp = 10 ** (level_dbfs / 20.0) * np.sqrt(2.0)
    t = np.arange(n) / rate
    return from_float32(amp * np.sin(2 * np.pi * freq * t))


def silence(seconds: float, rate: int = RATE) -> bytes:
    return b"\x00\x00" * int(round(seconds * rate))


def noise(seconds: float, level_dbfs: float = -50.0, seed: int = 0, rate: int = RATE) -> bytes:
    """White noise at an RMS level (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    amp = 10 ** (level_dbfs / 20.0)
    return from_float32(rng.standard_normal(n) * amp)


def resample(pcm: bytes, rate_in: int, rate_out: int = RATE) -> bytes:
    """Resample s16le mono with soxr's high-quality anti-aliasing filter."""
    if rate_in == rate_out or not pcm:
        return pcm
    import soxr

    out = soxr.resample(to_int16(pcm), rate_in, rate_out, quality="HQ")
    return np.asarray(out, dtype="<i2").tobytes()


class StreamResampler:
    """Streaming-safe resampler: filter state is carried across chunks, so
    chunked output equals one-shot output (no clicks at chunk edges)."""

    def __init__(self, rate_in: int, rate_out: int = RATE) -> None:
        import soxr

        self.rate_in = rate_in
        self.rate_out = rate_out
        self._stream = None if rate_in == rate_out else soxr.ResampleStream(rate_in, rate_out, 1, dtype="int16", quality="HQ")

    def feed(self, pcm: bytes, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm
        out = self._stream.resample_chunk(to_int16(pcm), last=last)
        return np.asarray(out, dtype="<i2").tobytes()


def read_wav(path_or_file) -> bytes:
    """Read a WAV file as 16 kHz mono s16le (mixing down and resampling as needed)."""
    with wave.open(path_or_file, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{getattr(path_or_file, 'name', path_or_file)}: only 16-bit PCM WAV is supported")
        channels, rate = w.getnchannels(), w.getframerate()
        data = w.readframes(w.getnframes())
    x = np.frombuffer(data, dtype="<i2")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1).astype("<i2")
    return resample(x.tobytes(), rate, RATE)


def wav_bytes(pcm: bytes, rate: int = RATE, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def write_wav(path: str, pcm: bytes, rate: int = RATE, channels: int = 1) -> None:
    with open(path, "wb") as f:
        f.write(wav_bytes(pcm, rate, channels))


class LowLagResampler:
    """A streaming polyphase FIR resampler whose output lags its input by
    ``taps`` input samples (3 ms at 8 kHz), for caller audio on its way to
    the VAD and Whisper.

    soxr's streaming resampler (:class:`StreamResampler`) is the better
    filter but holds back ~29 ms of 8 kHz audio at steady state (quality HQ,
    100 ms chunks; MQ and LQ more, VHQ ~105 ms; only its cubic QQ mode,
    which filters nothing, emits at once), and python-soxr offers no
    minimum-phase setting: on an 8 kHz call those ms come straight after the
    end of the caller's speech. This is a Kaiser-windowed sinc (cut off at
    the lower rate's Nyquist frequency, ~60 dB stopband, transition ±450 Hz
    at 8 -> 16 kHz) applied as ``L`` polyphase branches of ``2 * taps + 1``
    input samples; every output sample needs only the input up to ``taps``
    samples after it. Chunked output is exactly the one-shot output, and a
    whole stream gives ``ceil(n * L / M)`` samples for ``n`` in.
    """

    def __init__(self, rate_in: int, rate_out: int = RATE, taps: int = 24, beta: float = 5.65) -> None:
        import math

        g = math.gcd(rate_in, rate_out)
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down = rate_out // g, rate_in // g
        L = self.up
        n = 2 * taps * L + 1  # taps of the prototype filter, at rate_in * L
        centre = taps * L
        cutoff = 0.5 * min(rate_in, rate_out) / (rate_in * L)  # cycles per sample of the upsampled stream
        t = np.arange(n) - centre
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, beta) * L
        self._width = 2 * taps + 1
        bank = np.zeros((L, self._width))
        for phase in range(L):
            branch = h[phase::L]
            bank[phase, : branch.size] = branch
        self._bank = bank
        self._centre = centre
        self._x = np.zeros(self._width - 1)  # inputs from index self._base on (zeros before the stream)
        self._base = -(self._width - 1)
        self._n = 0  # input samples fed
        self._j = 0  # next output sample

    @property
    def delay(self) -> float:
        """Seconds of input an output sample waits for."""
        return (self._width // 2) / self.rate_in

    def _total(self, n: int) -> int:  # output samples for n input samples
        return -(-n * self.up // self.down)

    def feed(self, pcm: bytes, last: bool = False) -> bytes:
        x = to_int16(pcm).astype(np.float64)
        self._x = np.concatenate([self._x, x])
        self._n += x.size
        total = self._total(self._n)
        if last:
            available = total
            self._x = np.concatenate([self._x, np.zeros(self._width)])
        else:
            # output j needs input up to (j * M + centre) // L
            available = min(total, ((self._n - 1) * self.up - self._centre) // self.down + 1)
        if available <= self._j:
            return b""
        j = np.arange(self._j, available, dtype=np.int64)
        reach = j * self.down + self._centre
        newest = reach // self.up
        phase = reach - newest * self.up
        at = newest - self._base - (self._width - 1)  # where each sample's window starts in self._x
        y = np.empty(j.size)
        for r in range(min(self.up, j.size)):  # the phase repeats every L output samples
            y[r :: self.up] = np.convolve(self._x, self._bank[phase[r]], "valid")[at[r :: self.up]]
        self._j = available
        # keep what the next output needs: from its oldest input on
        oldest = (self._j * self.down + self._centre) // self.up - (self._width - 1)
        drop = max(0, min(oldest - self._base, self._x.size))
        self._x, self._base = self._x[drop:], self._base + drop
        if last:
            self._x, self._base, self._n, self._j = np.zeros(self._width - 1), -(self._width - 1), 0, 0
        return np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes()
