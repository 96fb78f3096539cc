"""JSON on the wire, bounded: parsing a client's text frame and the tolerant
field access every JSON codec needs.

Every JSON text UpVoot takes from a client (the raw protocol's control
messages, every provider's messages, dialect detection) goes through
:func:`loads`, which bounds it before ``json.loads`` sees it: at most
:data:`MAX_TEXT` characters and :data:`MAX_DEPTH` levels of nesting. Any
text thus gives a value or a :class:`ProtocolError` (which becomes the
``error`` reply), never a ``RecursionError`` or a traceback.

The depth check costs nothing for ordinary messages (fewer than
``MAX_DEPTH`` opening brackets in all: no nesting can exceed it) and is
linear otherwise: escapes, strings and every other character are removed by
regular expressions (each matches at one place only, so no backtracking),
then at most ``MAX_DEPTH`` passes remove the innermost ``[]`` / ``{}``
pairs; balanced brackets no deeper than ``MAX_DEPTH`` are gone by then.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from upvoot.framing.base import Frame, ProtocolError

#: the longest text frame parsed (characters); provider messages are a few KB
#: (a 100 ms media chunk of 24 kHz PCM is 6.4 KB of base64)
MAX_TEXT = 128 * 1024
#: the deepest nesting of arrays and objects parsed (providers use 3)
MAX_DEPTH = 32

_ESCAPE = re.compile(r"\\.", re.S)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def nesting_error(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``text`` must not reach ``json.loads`` (too deep, or brackets
    that cannot balance), or None when it may."""
    if text.count("[") + text.count("{") <= max_depth:
        return None
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    for _ in range(max_depth):
        if not brackets:
            return None
        shorter = _INNERMOST.sub("", brackets)
        if shorter == brackets:
            return "text frame is not JSON"  # brackets that never balance
        brackets = shorter
    return None if not brackets else f"text frame is nested deeper than {max_depth} levels"


def loads(text: str) -> Any:
    """A client's text frame parsed, or the ProtocolError saying why not."""
    if not isinstance(text, str):
        return ProtocolError("text frame is not text")
    if len(text) > MAX_TEXT:
        return ProtocolError(f"text frame is longer than {MAX_TEXT} characters")
    why = nesting_error(text)
    if why is not None:
        return ProtocolError(why)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return ProtocolError("text frame is not JSON")


def load_object(text: str) -> dict | ProtocolError:
    """A text frame as a JSON object, or the ProtocolError saying why not."""
    msg = loads(text)
    if isinstance(msg, ProtocolError):
        return msg
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
