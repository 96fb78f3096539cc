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
