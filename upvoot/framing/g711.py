"""ITU-T G.711 μ-law and A-law on numpy, table-based.

``audioop`` is deprecated and gone in Python 3.13, so UpVoot carries its own
G.711. Both directions are table look-ups built once at import from the
reference algorithm of ITU-T G.711 (as published in the well-known Sun
Microsystems ``g711.c`` that ``audioop`` also follows):

* encode: one ``uint8`` table of 65,536 entries indexed by the 16-bit sample
  (viewed as unsigned), so any int16 array encodes in one ``take``;
* decode: one ``int16`` table of 256 entries.

μ-law works on the 14 most significant bits (the sample is shifted right by
2, biased by 33 and clipped at 8,159), A-law on the 13 most significant bits
(shift by 3). Codes are transmitted with the usual inversions (μ-law: all
bits; A-law: even bits, ``^ 0x55``). Known values: μ-law ``0xFF`` and
``0x7F`` decode to 0 and linear 0 encodes to ``0xFF``; ``0x00``/``0x80``
are -32,124/+32,124. A-law ``0xD5``/``0x55`` are +8/-8 and 0 encodes to
``0xD5``; ``0x2A``/``0xAA`` are -32,256/+32,256. Every A-law code round
trips; every μ-law code round trips except the "negative zero" ``0x7F``,
which comes back as ``0xFF``.

Silence is *not* the zero byte in either law: pad μ-law with ``0xFF`` and
A-law with ``0xD5`` (see :data:`ULAW_SILENCE`, :data:`ALAW_SILENCE`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ALAW_SILENCE",
    "ULAW_SILENCE",
    "alaw_decode",
    "alaw_encode",
    "ulaw_decode",
    "ulaw_encode",
]

ULAW_SILENCE = 0xFF
ALAW_SILENCE = 0xD5

_ULAW_BIAS = 0x84  # 132, applied as 33 on the 14-bit value
_ULAW_CLIP = 8159
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_encode_reference(x: np.ndarray) -> np.ndarray:
    """G.711 μ-law encoder over an int array of 16-bit samples (vectorised)."""
    v = x.astype(np.int64) >> 2  # arithmetic shift, as in C on a short
    negative = v < 0
    v = np.where(negative, -v, v)
    mask = np.where(negative, 0x7F, 0xFF)
    v = np.minimum(v, _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, v, side="left")  # first seg_end >= v
    code = (seg << 4) | ((v >> (seg + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_reference(codes: np.ndarray) -> np.ndarray:
    u = (~codes.astype(np.int64)) & 0xFF
    t = ((u & 0x0F) << 3) + _ULAW_BIAS
    t = t << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_encode_reference(x: np.ndarray) -> np.ndarray:
    v = x.astype(np.int64) >> 3
    negative = v < 0
    mask = np.where(negative, 0x55, 0xD5)
    v = np.where(negative, -v - 1, v)
    seg = np.searchsorted(_ALAW_SEG_END, v, side="left")
    shift = np.where(seg < 2, 1, seg)
    code = (seg << 4) | ((v >> shift) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_reference(codes: np.ndarray) -> np.ndarray:
    a = codes.astype(np.int64) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


# Tables: index the encoders by the sample's bit pattern as uint16.
_ALL_SAMPLES = np.arange(65536, dtype=np.uint16).view(np.int16)
_ULAW_ENC = _ulaw_encode_reference(_ALL_SAMPLES)
_ALAW_ENC = _alaw_encode_reference(_ALL_SAMPLES)
_ALL_CODES = np.arange(256, dtype=np.uint8)
_ULAW_DEC = _ulaw_decode_reference(_ALL_CODES)
_ALAW_DEC = _alaw_decode_reference(_ALL_CODES)
for _t in (_ULAW_ENC, _ALAW_ENC, _ULAW_DEC, _ALAW_DEC):
    _t.flags.writeable = False
del _t


def _index(pcm: bytes | np.ndarray) -> np.ndarray:
    """Table index of each sample: its 16-bit pattern as 0..65535."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        x = np.frombuffer(pcm, dtype="<i2")
    else:
        x = np.asarray(pcm, dtype=np.int16)
    return x.astype(np.int32) & 0xFFFF


def ulaw_encode(pcm: bytes | np.ndarray) -> bytes:
    """s16le bytes (or an int16 array) -> μ-law bytes, one per sample."""
    return _ULAW_ENC[_index(pcm)].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> int16 samples."""
    return _ULAW_DEC[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(pcm: bytes | np.ndarray) -> bytes:
    """s16le bytes (or an int16 array) -> A-law bytes, one per sample."""
    return _ALAW_ENC[_index(pcm)].tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    """A-law bytes -> int16 samples."""
    return _ALAW_DEC[np.frombuffer(data, dtype=np.uint8)]
