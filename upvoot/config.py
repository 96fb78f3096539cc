"""The ini file -> frozen attrs objects, rejecting anything it does not know.

Every error is one line naming the file, the section and the option, so
twistd can print it and stop before it daemonizes. Relative paths resolve
against ``[upvoot] state_dir``, itself relative to the ini file's directory,
never against the directory the command was started from.

``etc/upvoot.ini`` documents every option, its default and its meaning; the
tables below are the single source of truth for names and defaults.
"""

from __future__ import annotations

import configparser
import os
import re
from typing import Callable, Mapping

import attrs

from upvoot import engines
from upvoot.engines.interfaces import EngineOptionError


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


# ---- value parsers -------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'600ms', '10s', '30m', '1h', '30d' or a bare number of seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 600ms, 10s, 30m or 1h, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{v} is out of range ({lo}..{hi if hi is not None else ''})")
        return v

    return parse


def _duration(lo: float, hi: float | None = None, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        v = parse_duration(text)
        if zero_ok and v == 0:
            return v
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{text.strip()} is out of range ({lo:g}s..{'' if hi is None else f'{hi:g}s'})")
        return v

    return parse


_PROVIDERS = ("auto", "raw", "exotel", "twilio", "plivo", "telnyx", "vonage")


def _provider(text: str) -> str:
    value = text.strip().lower()
    if value not in _PROVIDERS:
        raise ValueError(f"expected one of {', '.join(_PROVIDERS)}, got {text.strip()!r}")
    return value


def _text(text: str) -> str:
    # ini continuation lines keep their newlines; speech wants one line
    return " ".join(text.split())


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


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
    auth_failure_limit: int
    auth_failure_window: float
    trust_x_forwarded_for: int
    websocket: WebSocketLimits
    agents: Mapping[str, AgentConfig]
    recordings_dir: str = "recordings"  # absolute once loaded
    recordings_keep: float = 30 * 86400.0  # 0 = keep forever


# ---- the option tables (name -> (parser, default)) --------------------------------

_MAIN: dict[str, tuple[Callable[[str], object], str]] = {
    "listen": (_lines, "tcp:8080:interface=127.0.0.1"),
    "admin_listen": (str.strip, "tcp:8081:interface=127.0.0.1"),  # /healthz, /metrics; "" = no admin listener
    "state_dir": (str.strip, "."),
    "database": (str.strip, "upvoot.sqlite3"),
    "max_calls": (_int(1), "50"),
    "lag_budget": (_duration(0.005, 10.0), "150ms"),
    "playout_lead": (_duration(0.02, 2.0), "100ms"),
    "workers": (_int(0, 64), "0"),
    "worker_queue": (_int(0, 1000), "8"),
    "log_transcripts": (parse_bool, "no"),
    "max_message_size": (_int(1024), "1048576"),
    "max_frame_size": (_int(1024), "1048576"),
    "open_handshake_timeout": (_duration(0.1, 600.0), "10s"),
    "close_timeout": (_duration(0.1, 600.0), "5s"),
    "auto_ping_interval": (_duration(1.0, 3600.0, zero_ok=True), "0"),
    "auto_ping_timeout": (_duration(1.0, 3600.0), "10s"),
    "max_connections": (_int(0), "0"),
    "detect_timeout": (_duration(0.0, 10.0, zero_ok=True), "150ms"),
    "drain_time": (_duration(0.0, 3600.0, zero_ok=True), "30s"),
    "heartbeat": (_duration(0.5, 3600.0), "15s"),
    "max_calls_per_account": (_int(0), "0"),
    "auth_failure_limit": (_int(0), "10"),
    "auth_failure_window": (_duration(1.0, 86400.0), "1m"),
    "trust_x_forwarded_for": (_int(0, 10), "0"),
    "recordings_dir": (str.strip, "recordings"),
    "recordings_keep": (_duration(3600.0, zero_ok=True), "30d"),
}

_AGENT: dict[str, tuple[Callable[[str], object], str]] = {
    "greeting": (_text, "Hello! How can I help you?"),
    "system_prompt": (_text, "You are a helpful, concise phone agent."),
    "goodbye": (_text, "Thank you for calling. Goodbye!"),
    "apology": (_text, "Sorry, I had a problem there. Could you say that again?"),
    "max_duration": (_duration(10.0, 4 * 3600.0), "30m"),
    "max_turns": (_int(1, 10000), "20"),
    "silence_timeout": (_duration(1.0, 3600.0), "10s"),
    "silence_prompt": (_text, "Are you still there?"),
    "silence_prompt_after": (_duration(0.5, 3600.0, zero_ok=True), "6s"),
    "wrap_up_warning": (_text, "We are almost out of time for this call."),
    "wrap_up_before": (_duration(1.0, 3600.0, zero_ok=True), "1m"),
    "closing_max_duration": (_text, "I'm sorry, we have reached the time limit for this call. Goodbye!"),
    "closing_max_turns": (_text, "We have covered a lot. Thank you for calling, goodbye!"),
    "closing_silence": (_text, "I haven't heard from you, so I'll end the call now. Goodbye!"),
    "closing_error": (_text, "I'm sorry, I'm having technical problems. Please call again later. Goodbye!"),
    "max_failures": (_int(1, 100), "3"),
    "end_of_turn": (_duration(0.1, 5.0), "600ms"),
    "min_utterance": (_duration(0.02, 5.0), "250ms"),
    "max_utterance": (_duration(1.0, 120.0), "20s"),
    "barge_in_min": (_duration(0.02, 5.0), "300ms"),
    "interim_interval": (_duration(0.1, 10.0, zero_ok=True), "400ms"),
    "provider": (_provider, "auto"),
    "dtmf_interrupts": (parse_bool, "yes"),
    "agent_select": (_text, ""),
    "points_per_increment": (_int(0), "1"),
    "billing_increment": (_duration(1.0, 3600.0), "1m"),
    "record": (parse_bool, "no"),
}

_ENGINE_DEFAULTS = {"vad": "energy", "stt": "whisper", "brain": "scripted", "tts": "piper"}


def _parse_table(path, section, items, table):
    out = {}
    for name, (parse, default) in table.items():
        raw = items.get(name, default)
        try:
            out[name] = parse(raw)
        except ValueError as e:
            raise ConfigError(path, section, name, str(e)) from None
    return out


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
            raise ConfigError(path, section, None, "unknown section (expected [upvoot] or [agent:NAME])")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(path, section, None, "agent names use letters, digits, '.', '_' and '-'")
        agents[name] = _parse_agent(path, section, name, dict(parser[section]), state_dir)
    if not agents:
        raise ConfigError(path, None, None, "no [agent:NAME] section: define at least one agent")
    ws = WebSocketLimits(
        max_message_size=main.pop("max_message_size"),
        max_frame_size=main.pop("max_frame_size"),
        open_handshake_timeout=main.pop("open_handshake_timeout"),
        close_timeout=main.pop("close_timeout"),
        auto_ping_interval=main.pop("auto_ping_interval"),
        auto_ping_timeout=main.pop("auto_ping_timeout"),
        max_connections=main.pop("max_connections"),
    )
    main.pop("state_dir")
    main.pop("database")
    main["recordings_dir"] = os.path.normpath(os.path.join(state_dir, os.path.expanduser(main["recordings_dir"])))
    return Config(path=path, state_dir=state_dir, database=database, websocket=ws, agents=agents, **main)
