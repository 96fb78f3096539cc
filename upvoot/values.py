"""The value grammars of the ini file, written once: durations, booleans,
integers and numbers in a range, one-line text, Twisted endpoint ports.

Used by ``upvoot.config`` for its own options and by ``upvoot.engines.options``
for the engines' ``KIND.*`` options, so an engine and the daemon accept the
same spellings. Every parser takes the raw text and returns the value or
raises ``ValueError`` with a one-line message that does not name the option
(the caller adds file, section and option).

A leaf: imports nothing from upvoot, so both ``config`` and ``engines`` may
import it without a cycle.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

TRUE = ("1", "yes", "true", "on")
FALSE = ("0", "no", "false", "off")

#: Characters no option value may hold: every C0/C1 control character and
#: DEL, except tab and the newline of an ini continuation line.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def quoted(text: str, limit: int = 40) -> str:
    """A value quoted for a message, cut at ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_duration(text: str) -> float:
    """'600ms', '10s', '30m', '1h', '30d' or a bare number of seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 600ms, 10s, 30m or 1h, got {quoted(text)}")
    number, unit = float(m.group(1)), m.group(2)
    value = number / 1000 if unit == "ms" else number * _UNITS[unit]  # 700ms is 0.7, not 0.7000000000000001
    if not math.isfinite(value):
        raise ValueError("the duration is too large")
    return value


def show_seconds(seconds: float) -> str:
    """A duration bound for a message: 1ms, 10s, 1h, 30d."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    if seconds == 0:
        return "0"
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def duration_range(lo: float, hi: float, zero_ok: bool = False) -> str:
    """How a duration range is written in messages and in etc/upvoot.ini: '0 or 1s..1h'."""
    return ("0 or " if zero_ok and lo > 0 else "") + f"{show_seconds(lo)}..{show_seconds(hi)}"


def duration_in(text: str, lo: float, hi: float, zero_ok: bool = False) -> float:
    """A duration within ``lo..hi`` seconds (or exactly 0 when ``zero_ok``)."""
    value = parse_duration(text)
    if zero_ok and value == 0:
        return value
    if not lo <= value <= hi:
        raise ValueError(f"{text.strip()} is out of range ({duration_range(lo, hi, zero_ok)})")
    return value


def parse_bool(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0 (any case)."""
    t = text.strip().lower()
    if t in TRUE:
        return True
    if t in FALSE:
        return False
    raise ValueError(f"expected yes or no, got {quoted(text)}")


def int_in(text: str, lo: int, hi: int) -> int:
    """A decimal integer within ``lo..hi``."""
    t = text.strip()
    # Python's own spelling (1_000 too), but short: a 5000-digit number is refused before int() sees it
    if not re.fullmatch(r"[+-]?[0-9](_?[0-9]){0,29}", t):
        raise ValueError(f"expected an integer, got {quoted(text)}")
    value = int(t)
    if not lo <= value <= hi:
        raise ValueError(f"{value} is out of range ({lo}..{hi})")
    return value


def float_in(text: str, lo: float, hi: float) -> float:
    """A finite number within ``lo..hi`` (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {quoted(text)}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {quoted(text)}")
    if not lo <= value <= hi:
        raise ValueError(f"{value:g} is out of range ({lo:g}..{hi:g})")
    return value


def parse_phrases(text: str) -> tuple[str, ...]:
    """A comma-separated list of short phrases (1..4 words each, lower-cased); empty: none."""
    phrases = tuple(p for p in (" ".join(part.lower().split()) for part in text.split(",")) if p)
    if len(text) > 2000 or len(phrases) > 100:
        raise ValueError("at most 100 phrases and 2000 characters")
    for p in phrases:
        if len(p.split()) > 4 or not any(c.isalnum() for c in p):
            raise ValueError(f"{quoted(p)} is not a phrase of one to four words")
    return phrases


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (tab and newline allowed), as U+XXXX."""
    m = _CONTROL.search(text)
    return None if m is None else f"U+{ord(m.group()):04X}"


def one_line(text: str, max_length: int) -> str:
    """Text said or sent as one line: continuation lines joined with spaces,
    at most ``max_length`` characters, no control characters."""
    bad = control_character(text)
    if bad:
        raise ValueError(f"contains the control character {bad}")
    value = " ".join(text.split())
    if len(value) > max_length:
        raise ValueError(f"is {len(value)} characters long (at most {max_length})")
    return value


# ---- Twisted endpoint strings --------------------------------------------------------

#: Endpoint types whose first argument (or ``port=``) is a TCP port.
PORT_TYPES = ("tcp", "tcp6", "ssl")
#: Endpoint types that wrap another endpoint description.
WRAPPER_TYPES = ("haproxy",)


def _endpoint_parts(description: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword arguments, split as twisted.internet.endpoints
    does (``:`` separates, the first ``=`` names, a backslash escapes the next
    character)."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    field: list[str] = [""]  # [value] or [name, value]

    def close() -> None:
        if len(field) == 1:
            args.append(field[0])
        else:
            kwargs[field[0]] = field[1]

    chars = iter(description)
    for ch in chars:
        if ch == "\\":
            field[-1] += next(chars, "")
        elif ch == ":":
            close()
            field = [""]
        elif ch == "=" and len(field) == 1:
            field.append("")
        else:
            field[-1] += ch
    close()
    return args, kwargs


def check_endpoint_port(description: str) -> None:
    """Refuse a tcp:/tcp6:/ssl: (possibly haproxy:-wrapped) endpoint whose
    port is not a number 0..65535. Other types (systemd:, unix:, plugins)
    are left to Twisted's own parser."""
    args, kwargs = _endpoint_parts(description.strip())
    while args and args[0].lower() in WRAPPER_TYPES:
        args = args[1:]
    if not args or args[0].lower() not in PORT_TYPES:
        return
    port = args[1] if len(args) > 1 else kwargs.get("port")
    if port is None:
        raise ValueError(f"bad endpoint {description!r}: no port")
    if not re.fullmatch(r"[0-9]{1,5}", port.strip()) or int(port) > 65535:
        raise ValueError(f"bad endpoint {description!r}: port {port!r} is not a number 0..65535")


__all__ = [
    "FALSE", "TRUE", "check_endpoint_port", "control_character", "duration_in", "duration_range", "float_in", "int_in",
    "one_line", "parse_bool", "parse_duration", "quoted", "show_seconds",
]
