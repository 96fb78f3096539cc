"""The ini options: each one's parser, default and range (``Option``), in
two tables, ``[upvoot]`` (``MAIN``) and ``[agent:NAME]`` (``AGENT``).

``upvoot.config`` reads the file against these tables; ``etc/upvoot.ini``
documents every entry (tests/test_config.py holds the two together). The
value grammars themselves live in ``upvoot.values``.
"""

from __future__ import annotations

from typing import Callable

import attrs

from upvoot.framing.negotiate import AUTO, PROVIDERS
from upvoot.nodes import parse_node_id
from upvoot.values import (
    check_endpoint_port,
    duration_in,
    duration_range,
    int_in,
    one_line,
    parse_bool,
    parse_phrases,
)


# ---- value parsers (the grammars are in upvoot.values, shared with the engines) ----

#: Longest line an agent says (greeting, goodbye, prompts, closing lines).
MAX_SPOKEN = 1000
#: Longest system prompt.
MAX_PROMPT = 100_000
#: Most endpoints in ``listen``.
MAX_LISTEN = 64


@attrs.frozen
class Option:
    """One ini option: its parser, its default (as written in the ini) and,
    for etc/upvoot.ini's "Range:" notes, the range the parser enforces."""

    parse: Callable[[str], object]
    default: str
    range: str = ""


def _int(default: str, lo: int, hi: int) -> Option:
    return Option(lambda text: int_in(text, lo, hi), default, f"{lo}..{hi}")


def _duration(default: str, lo: float, hi: float, zero_ok: bool = False) -> Option:
    return Option(lambda text: duration_in(text, lo, hi, zero_ok), default, duration_range(lo, hi, zero_ok))


def _text(default: str, max_length: int) -> Option:
    # ini continuation lines keep their newlines; speech wants one line
    return Option(lambda text: one_line(text, max_length), default, f"up to {max_length} characters")


def _bool(default: str) -> Option:
    return Option(parse_bool, default)


_PROVIDERS = (AUTO, *PROVIDERS)


BACKCHANNELS = "mm-hm, mhm, mm, hmm, uh-huh, yeah, yep, okay, ok, right, sure, alright, i see"


def _provider(text: str) -> str:
    value = text.strip().lower()
    if value not in _PROVIDERS:
        raise ValueError(f"expected one of {', '.join(_PROVIDERS)}, got {text.strip()!r}")
    return value


def _one_of(text: str, values: tuple[str, ...]) -> str:
    if text.strip().lower() not in values:
        raise ValueError(f"expected one of {', '.join(values)}, got {text.strip()!r}")
    return text.strip().lower()


def _endpoint(text: str) -> str:
    value = text.strip()
    if value:
        check_endpoint_port(value)
    return value


def _endpoints(text: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(lines) > MAX_LISTEN:
        raise ValueError(f"{len(lines)} endpoints (at most {MAX_LISTEN})")
    for line in lines:
        check_endpoint_port(line)
    return lines


# ---- the option tables (name -> Option(parser, default, range)) ---------------------

MAIN: dict[str, Option] = {
    "listen": Option(_endpoints, "tcp:8080:interface=127.0.0.1"),
    "admin_listen": Option(_endpoint, "tcp:8081:interface=127.0.0.1"),  # /healthz, /metrics; "" = none
    "console": _bool("yes"),
    "admin_token_file": Option(str.strip, ""),
    "console_key_ttl": _duration("5m", 30.0, 3600.0),
    "state_dir": Option(str.strip, "."),
    "database": Option(str.strip, "upvoot.sqlite3"),  # a file, or a postgresql:// URL (upvoot.ledger.backends)
    "database_password_file": Option(str.strip, ""),
    "database_pool": _int("4", 1, 64),
    "max_calls": _int("50", 1, 100_000),
    "lag_budget": _duration("150ms", 0.005, 10.0),
    "playout_lead": _duration("100ms", 0.02, 2.0),
    "playout_lead_min": _duration("60ms", 0.02, 2.0),
    "workers": _int("0", 0, 64),
    "worker_queue": _int("8", 0, 1000),
    "log_transcripts": _bool("no"),
    "max_message_size": _int("1048576", 1024, 64 << 20),
    "max_frame_size": _int("1048576", 1024, 64 << 20),
    "open_handshake_timeout": _duration("10s", 0.1, 600.0),
    "close_timeout": _duration("5s", 0.1, 600.0),
    "auto_ping_interval": _duration("0", 1.0, 3600.0, zero_ok=True),
    "auto_ping_timeout": _duration("10s", 1.0, 3600.0),
    "max_connections": _int("0", 0, 1_000_000),
    "start_timeout": _duration("10s", 1.0, 60.0),
    "max_handshake_size": _int("8192", 1024, 65536),
    "detect_timeout": _duration("150ms", 0.0, 10.0),
    "drain_time": _duration("30s", 0.0, 3600.0),
    "heartbeat": _duration("15s", 0.5, 3600.0),
    "node_id": Option(parse_node_id, ""),
    "lease": _duration("1m", 1.0, 86400.0),
    "reservation_horizon": _duration("2m", 30.0, 86400.0),
    "max_calls_per_account": _int("0", 0, 100_000),
    "max_calls_per_address": _int("0", 0, 100_000),
    "auth_failure_limit": _int("10", 0, 1_000_000),
    "auth_failure_window": _duration("1m", 1.0, 86400.0),
    "trust_x_forwarded_for": _int("0", 0, 10),
    "recordings_dir": Option(str.strip, "recordings"),
    "recordings_keep": _duration("30d", 3600.0, 36500 * 86400.0, zero_ok=True),
}

AGENT: dict[str, Option] = {
    "greeting": _text("Hello! How can I help you?", MAX_SPOKEN),
    "system_prompt": _text("You are a helpful, concise phone agent.", MAX_PROMPT),
    "goodbye": _text("Thank you for calling. Goodbye!", MAX_SPOKEN),
    "apology": _text("Sorry, I had a problem there. Could you say that again?", MAX_SPOKEN),
    "max_duration": _duration("30m", 10.0, 4 * 3600.0),
    "max_turns": _int("20", 1, 10000),
    "silence_timeout": _duration("10s", 1.0, 3600.0),
    "silence_prompt": _text("Are you still there?", MAX_SPOKEN),
    "silence_prompt_after": _duration("6s", 0.5, 3600.0, zero_ok=True),
    "wrap_up_warning": _text("We are almost out of time for this call.", MAX_SPOKEN),
    "wrap_up_before": _duration("1m", 1.0, 3600.0, zero_ok=True),
    "closing_max_duration": _text("I'm sorry, we have reached the time limit for this call. Goodbye!", MAX_SPOKEN),
    "closing_max_turns": _text("We have covered a lot. Thank you for calling, goodbye!", MAX_SPOKEN),
    "closing_silence": _text("I haven't heard from you, so I'll end the call now. Goodbye!", MAX_SPOKEN),
    "closing_error": _text("I'm sorry, I'm having technical problems. Please call again later. Goodbye!", MAX_SPOKEN),
    "closing_no_points": _text("I'm sorry, your account has run out of points. Goodbye.", MAX_SPOKEN),
    "max_failures": _int("3", 1, 100),
    "end_of_turn": _duration("600ms", 0.1, 5.0),
    "turn": Option(lambda text: _one_of(text, ("smart", "silence")), "smart"),
    "turn_pause": _duration("200ms", 0.06, 2.0),
    "turn_transcribe_after": _duration("100ms", 0.02, 2.0),
    "turn_max_pause": _duration("2500ms", 0.2, 10.0),
    "turn_unfinished_pause": _duration("700ms", 0.1, 10.0),
    "min_utterance": _duration("250ms", 0.02, 5.0),
    "max_utterance": _duration("20s", 1.0, 120.0),
    "barge_in_min": _duration("300ms", 0.02, 5.0),
    "interim_interval": _duration("400ms", 0.1, 10.0, zero_ok=True),
    "provider": Option(_provider, "auto"),
    "dtmf_interrupts": _bool("yes"),
    "agent_select": _text("", 200),
    # 10**9 points per increment, at most 4h of 1s increments: 1.44e13 a call, far inside SQLite's 64-bit INTEGER
    "points_per_increment": _int("1", 0, 10**9),
    "billing_increment": _duration("1m", 1.0, 3600.0),
    "record": _bool("no"),
    "backchannels": Option(parse_phrases, BACKCHANNELS, "up to 100 phrases, 2000 characters"),
}
