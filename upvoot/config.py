"""The ini file -> frozen attrs objects, rejecting anything it does not know.

Every error is one line naming the file, the section and the option, so
twistd can print it and stop before it daemonizes. Relative paths resolve
against ``[upvoot] state_dir``, itself relative to the ini file's directory,
never against the directory the command was started from.

``etc/upvoot.ini`` documents every option, its meaning, default and range;
the tables below are the single source of truth for names, defaults and
ranges (tests/test_config.py holds the ini to them). Every value is range
checked here, at load, so nothing out of range reaches a socket, an engine
or the database. The value grammars (durations, booleans, integers, one-line
text, endpoint ports) live in ``upvoot.values``, shared with the engines.
"""

from __future__ import annotations

import configparser
import os
import re
from typing import Callable, Mapping

import attrs

from upvoot import engines
from upvoot.engines.interfaces import EngineOptionError
from upvoot.framing.negotiate import AUTO, PROVIDERS
from upvoot.values import (
    check_endpoint_port,
    control_character,
    duration_in,
    duration_range,
    int_in,
    one_line,
    parse_bool,
    parse_duration,
)


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is one line for the operator."""

    def __init__(self, path: str, section: str | None, option: str | None, message: str) -> None:
        where = path
        if section:
            where += f": [{section}]"
        if option:
            where += f" {option}"
        # one line even when the message quotes a library error or a value
        super().__init__(f"{where}: {' '.join(message.split())}")


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


def _provider(text: str) -> str:
    value = text.strip().lower()
    if value not in _PROVIDERS:
        raise ValueError(f"expected one of {', '.join(_PROVIDERS)}, got {text.strip()!r}")
    return value


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


# ---- the objects -----------------------------------------------------------------


@attrs.frozen
class EngineSpec:
    """Which engine of a kind an agent uses, with its validated settings."""

    kind: str
    name: str
    settings: object


@attrs.frozen
class AgentConfig:
    name: str
    greeting: str
    system_prompt: str
    goodbye: str
    apology: str
    max_duration: float
    max_turns: int
    silence_timeout: float
    silence_prompt: str
    silence_prompt_after: float
    wrap_up_warning: str
    wrap_up_before: float
    closing_max_duration: str
    closing_max_turns: str
    closing_silence: str
    closing_error: str
    max_failures: int
    end_of_turn: float
    min_utterance: float
    max_utterance: float
    barge_in_min: float
    interim_interval: float
    provider: str
    dtmf_interrupts: bool
    agent_select: str
    points_per_increment: int
    billing_increment: float
    engines: Mapping[str, EngineSpec]
    record: bool = False  # stereo WAV of the call (upvoot.ledger.recordings)

    def fixed_lines(self) -> tuple[str, ...]:
        """Lines the agent may say verbatim: synthesized once and cached."""
        lines = (
            self.greeting, self.goodbye, self.apology, self.silence_prompt, self.wrap_up_warning,
            self.closing_max_duration, self.closing_max_turns, self.closing_silence, self.closing_error,
        )
        return tuple(dict.fromkeys(line for line in lines if line))


@attrs.frozen
class WebSocketLimits:
    max_message_size: int
    max_frame_size: int
    open_handshake_timeout: float
    close_timeout: float
    auto_ping_interval: float
    auto_ping_timeout: float
    max_connections: int
    start_timeout: float = 10.0  # no call started within it: close 4408
    max_handshake_size: int = 8192  # bytes of opening handshake before 431


@attrs.frozen
class Config:
    path: str
    state_dir: str
    listen: tuple[str, ...]
    admin_listen: str  # health and metrics (upvoot.daemon.web); "" = none
    database: str
    max_calls: int
    lag_budget: float
    playout_lead: float
    workers: int
    worker_queue: int
    log_transcripts: bool
    detect_timeout: float
    drain_time: float
    heartbeat: float
    max_calls_per_account: int
    max_calls_per_address: int
    auth_failure_limit: int
    auth_failure_window: float
    trust_x_forwarded_for: int
    websocket: WebSocketLimits
    agents: Mapping[str, AgentConfig]
    recordings_dir: str = "recordings"  # absolute once loaded
    recordings_keep: float = 30 * 86400.0  # 0 = keep forever


# ---- the option tables (name -> Option(parser, default, range)) ---------------------

_MAIN: dict[str, Option] = {
    "listen": Option(_endpoints, "tcp:8080:interface=127.0.0.1"),
    "admin_listen": Option(_endpoint, "tcp:8081:interface=127.0.0.1"),  # /healthz, /metrics; "" = none
    "state_dir": Option(str.strip, "."),
    "database": Option(str.strip, "upvoot.sqlite3"),
    "max_calls": _int("50", 1, 100_000),
    "lag_budget": _duration("150ms", 0.005, 10.0),
    "playout_lead": _duration("100ms", 0.02, 2.0),
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
    "max_calls_per_account": _int("0", 0, 100_000),
    "max_calls_per_address": _int("0", 0, 100_000),
    "auth_failure_limit": _int("10", 0, 1_000_000),
    "auth_failure_window": _duration("1m", 1.0, 86400.0),
    "trust_x_forwarded_for": _int("0", 0, 10),
    "recordings_dir": Option(str.strip, "recordings"),
    "recordings_keep": _duration("30d", 3600.0, 36500 * 86400.0, zero_ok=True),
}

#: The [upvoot] options that make up ``Config.websocket``.
_WEBSOCKET = tuple(attrs.fields_dict(WebSocketLimits))

_AGENT: dict[str, Option] = {
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
    "max_failures": _int("3", 1, 100),
    "end_of_turn": _duration("600ms", 0.1, 5.0),
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
}

_ENGINE_DEFAULTS = {"vad": "energy", "stt": "whisper", "brain": "scripted", "tts": "piper"}


def _parse_table(path: str, section: str, items: Mapping[str, str], table: Mapping[str, Option]) -> dict:
    out = {}
    for name, option in table.items():
        try:
            out[name] = option.parse(items.get(name, option.default))
        except ValueError as e:
            raise ConfigError(path, section, name, str(e)) from None
    return out


def _refuse_control_characters(path: str, parser: configparser.ConfigParser) -> None:
    """No control character (tab and continuation newlines aside) anywhere:
    a NUL in a spoken line, a path or an engine option fails here, at load."""
    for section in parser.sections():
        if control_character(section):
            raise ConfigError(path, repr(section), None, f"the section name holds the control character {control_character(section)}")
        for key, value in parser[section].items():
            if control_character(key):
                raise ConfigError(path, section, repr(key), f"the option name holds the control character {control_character(key)}")
            if control_character(value):
                raise ConfigError(path, section, key, f"contains the control character {control_character(value)}")


def _parse_agent(path: str, section: str, name: str, items: Mapping[str, str], base_dir: str) -> AgentConfig:
    engine_options: dict[str, dict[str, str]] = {k: {} for k in engines.KINDS}
    plain: dict[str, str] = {}
    for key, value in items.items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in engine_options:
            if not rest:
                raise ConfigError(path, section, key, "empty engine option name")
            engine_options[prefix][rest] = value
        elif key in _AGENT or key in engines.KINDS:
            plain[key] = value
        else:
            raise ConfigError(path, section, key, "unknown option")
    values = _parse_table(path, section, plain, _AGENT)
    specs = {}
    for kind in engines.KINDS:
        engine_name = plain.get(kind, _ENGINE_DEFAULTS[kind]).strip()
        try:
            factory = engines.get_factory(kind, engine_name)
        except EngineOptionError as e:
            raise ConfigError(path, section, kind, e.message) from None
        except ImportError as e:
            raise ConfigError(path, section, kind, f"engine {engine_name!r} cannot be loaded: {e}") from None
        try:
            settings = factory.parse_options(engine_options[kind], base_dir)
        except EngineOptionError as e:
            raise ConfigError(path, section, f"{kind}.{e.option}" if e.option else kind, e.message) from None
        specs[kind] = EngineSpec(kind, engine_name, settings)
    # an empty line disables its timer (as in upvoot.call.machine), so only check the timing of lines said
    if values["wrap_up_warning"] and values["wrap_up_before"] and values["wrap_up_before"] >= values["max_duration"]:
        raise ConfigError(path, section, "wrap_up_before", "must be shorter than max_duration")
    if (
        values["silence_prompt"]
        and values["silence_prompt_after"]
        and values["silence_prompt_after"] >= values["silence_timeout"]
    ):
        raise ConfigError(path, section, "silence_prompt_after", "must be shorter than silence_timeout")
    if values["min_utterance"] >= values["max_utterance"]:
        raise ConfigError(path, section, "min_utterance", "must be shorter than max_utterance")
    return AgentConfig(name=name, engines=specs, **values)


def load_config(path: str) -> Config:
    """Read and validate the ini file at ``path``; raise ``ConfigError``."""
    path = os.path.abspath(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    parser.optionxform = str  # option names are case-sensitive, as documented
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError(path, None, None, "no such file") from None
    except PermissionError:
        raise ConfigError(path, None, None, "permission denied") from None
    except OSError as e:  # a directory, an I/O error: still one line, no traceback
        raise ConfigError(path, None, None, e.strerror or str(e)) from None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(path, None, None, " ".join(str(e).split())) from None
    _refuse_control_characters(path, parser)
    if "upvoot" not in parser:
        raise ConfigError(path, "upvoot", None, "missing section")
    main = _parse_table(path, "upvoot", dict(parser["upvoot"]), _MAIN)
    for key in parser["upvoot"]:
        if key not in _MAIN:
            raise ConfigError(path, "upvoot", key, "unknown option")
    ini_dir = os.path.dirname(path)
    state_dir = os.path.normpath(os.path.join(ini_dir, os.path.expanduser(main["state_dir"])))
    database = os.path.normpath(os.path.join(state_dir, os.path.expanduser(main["database"])))
    if not main["listen"]:
        raise ConfigError(path, "upvoot", "listen", "at least one endpoint is required")
    agents: dict[str, AgentConfig] = {}
    for section in parser.sections():
        if section == "upvoot":
            continue
        kind, colon, name = section.partition(":")
        if kind != "agent" or not colon:
            hint = "; the WebSocket limits are [upvoot] options" if section == "websocket" else ""
            raise ConfigError(path, section, None, f"unknown section (expected [upvoot] or [agent:NAME]){hint}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(path, section, None, "agent names use letters, digits, '.', '_' and '-'")
        agents[name] = _parse_agent(path, section, name, dict(parser[section]), state_dir)
    if not agents:
        raise ConfigError(path, None, None, "no [agent:NAME] section: define at least one agent")
    if main["detect_timeout"] >= main["start_timeout"]:
        raise ConfigError(path, "upvoot", "detect_timeout", "must be shorter than start_timeout")
    ws = WebSocketLimits(**{name: main.pop(name) for name in _WEBSOCKET})
    main.pop("state_dir")
    main.pop("database")
    main["recordings_dir"] = os.path.normpath(os.path.join(state_dir, os.path.expanduser(main["recordings_dir"])))
    return Config(path=path, state_dir=state_dir, database=database, websocket=ws, agents=agents, **main)


__all__ = [
    "AgentConfig", "Config", "ConfigError", "EngineSpec", "Option", "WebSocketLimits", "load_config",
    "parse_bool", "parse_duration",
]
