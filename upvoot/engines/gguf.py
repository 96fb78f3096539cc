"""Read one string from a GGUF file's metadata (the chat template), without
loading the model or parsing its tensors.

GGUF (llama.cpp's model format): the magic ``GGUF``, a uint32 version
(2 or 3), uint64 tensor and metadata counts, then the metadata as
key/typed-value pairs, little-endian. Only the metadata is read, from the
start of the file, stopping at the key asked for. (The ``gguf`` package
parses every tensor too: seconds per model and four dependencies, for one
string.)
"""

from __future__ import annotations

import struct
from typing import BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 16 << 20  # a chat template is a few KB; a vocabulary entry a few bytes


class GGUFError(ValueError):
    """Not a GGUF file, or a damaged one."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("truncated metadata")
    return data


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _string(f: BinaryIO) -> bytes:
    n = _u64(f)
    if n > _MAX_STRING:
        raise GGUFError(f"a metadata string of {n} bytes")
    return _read(f, n)


def _skip(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        _read(f, struct.calcsize(_SCALARS[kind]))
    elif kind == _STRING:
        _string(f)
    elif kind == _ARRAY:
        item = struct.unpack("<I", _read(f, 4))[0]
        count = _u64(f)
        if item in _SCALARS:  # fixed size: one seek
            f.seek(count * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise GGUFError(f"unknown metadata type {kind}")


def metadata_string(path: str, key: str) -> str | None:
    """The string value of ``key`` in the GGUF file's metadata, or None."""
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = struct.unpack("<I", _read(f, 4))[0]
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not known")
        _u64(f)  # tensors
        for _ in range(_u64(f)):
            name = _string(f)
            kind = struct.unpack("<I", _read(f, 4))[0]
            if name == key.encode() and kind == _STRING:
                return _string(f).decode("utf-8", "replace")
            _skip(f, kind)
    return None


def chat_template(path: str) -> str | None:
    """The model's own chat template (Jinja), if its GGUF carries one."""
    return metadata_string(path, "tokenizer.chat_template")
