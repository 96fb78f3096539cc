"""Small parsers engines use for their ``KIND.*`` ini options.

The grammars themselves (durations, booleans, numbers) are those of the whole
ini file, from ``upvoot.values``; here they are bound to an option name.
Each raises ``EngineOptionError(option, message)``; the config loader turns
that into one line naming file, section and the full option name. Every
number has a range: ``lo`` and ``hi`` are required.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Mapping, TypeVar

from upvoot import values
from upvoot.engines.interfaces import EngineOptionError

T = TypeVar("T")


def reject_unknown(options: Mapping[str, str], known: Iterable[str]) -> None:
    known = set(known)
    for name in options:
        if name not in known:
            raise EngineOptionError(name, f"unknown option (known: {', '.join(sorted(known)) or 'none'})")


def _named(name: str, parse: Callable[[], T]) -> T:
    try:
        return parse()
    except ValueError as e:
        raise EngineOptionError(name, str(e)) from None


def parse_float(options: Mapping[str, str], name: str, lo: float, hi: float) -> float:
    return _named(name, lambda: values.float_in(options[name], lo, hi))


def parse_int(options: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    return _named(name, lambda: values.int_in(options[name], lo, hi))


def parse_bool(options: Mapping[str, str], name: str) -> bool:
    return _named(name, lambda: values.parse_bool(options[name]))


def parse_seconds(options: Mapping[str, str], name: str, default: float, lo: float = 0.001, hi: float = 3600.0) -> float:
    """A duration option in the config's grammar (``1500ms``, ``5s``, ``1m``,
    ``1h``...), ``default`` when absent; within ``lo..hi`` (1ms..1h)."""
    if name not in options:
        return default
    return _named(name, lambda: values.duration_in(options[name], lo, hi))


def parse_language(options: Mapping[str, str], name: str = "language", default: str | None = "en") -> str | None:
    """A speech-to-text language: a 2- or 3-letter code, or ``auto`` (None: detect)."""
    if name not in options:
        return default
    lang = options[name].strip().lower()
    if lang == "auto":
        return None
    if re.fullmatch(r"[a-z]{2,3}", lang):
        return lang
    raise EngineOptionError(name, f"expected a language code like 'en' or 'auto', got {options[name]!r}")


def parse_path(options: Mapping[str, str], name: str, base_dir: str, must_exist: bool = True) -> str:
    """A path, relative ones resolved against the ini file's directory."""
    raw = os.path.expanduser(options[name].strip())
    path = raw if os.path.isabs(raw) else os.path.normpath(os.path.join(base_dir, raw))
    if must_exist and not os.path.exists(path):
        raise EngineOptionError(name, f"{path} does not exist")
    return path
