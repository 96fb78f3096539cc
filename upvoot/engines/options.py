"""Small parsers engines use for their ``KIND.*`` ini options.

Each raises ``EngineOptionError(option, message)``; the config loader turns
that into one line naming file, section and the full option name.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from upvoot.engines.interfaces import EngineOptionError


def reject_unknown(options: Mapping[str, str], known: Iterable[str]) -> None:
    known = set(known)
    for name in options:
        if name not in known:
            raise EngineOptionError(name, f"unknown option (known: {', '.join(sorted(known)) or 'none'})")


def parse_float(options: Mapping[str, str], name: str, lo: float | None = None, hi: float | None = None) -> float:
    raw = options[name]
    try:
        value = float(raw)
    except ValueError:
        raise EngineOptionError(name, f"expected a number, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise EngineOptionError(name, f"{value} is out of range [{lo}, {hi}]")
    return value


def parse_int(options: Mapping[str, str], name: str, lo: int | None = None, hi: int | None = None) -> int:
    raw = options[name]
    try:
        value = int(raw)
    except ValueError:
        raise EngineOptionError(name, f"expected an integer, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise EngineOptionError(name, f"{value} is out of range [{lo}, {hi}]")
    return value


def parse_bool(options: Mapping[str, str], name: str) -> bool:
    raw = options[name].strip().lower()
    if raw in ("1", "yes", "true", "on"):
        return True
    if raw in ("0", "no", "false", "off"):
        return False
    raise EngineOptionError(name, f"expected yes or no, got {options[name]!r}")


def parse_path(options: Mapping[str, str], name: str, base_dir: str, must_exist: bool = True) -> str:
    """A path, relative ones resolved against the ini file's directory."""
    raw = os.path.expanduser(options[name].strip())
    path = raw if os.path.isabs(raw) else os.path.normpath(os.path.join(base_dir, raw))
    if must_exist and not os.path.exists(path):
        raise EngineOptionError(name, f"{path} does not exist")
    return path
