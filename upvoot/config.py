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
from typing import Mapping

import attrs

from upvoot import engines
from upvoot.engines.interfaces import EngineOptionError, EngineUnavailable
from upvoot.nodes import CLOSING_ALLOWANCE
from upvoot.options import AGENT, MAIN, Option
from upvoot.values import (
    control_character,
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
    closing_no_points: str
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
    backchannels: tuple[str, ...] = ()  # listener words that do not interrupt the agent (upvoot.call.bargein)
    turn: str = "smart"  # the turn policy, smart | silence (upvoot.call.turns)
    turn_pause: float = 0.2  # smart: the silence after which the end-of-turn model is asked
    turn_transcribe_after: float = 0.1  # smart: the silence after which the final transcription starts (<= turn_pause)
    turn_max_pause: float = 2.5  # smart: the silence that ends a turn whose transcript dangles
    turn_unfinished_pause: float = 0.7  # smart: the silence that ends a turn the model says is not finished

    def fixed_lines(self) -> tuple[str, ...]:
        """Lines the agent may say verbatim: synthesized once and cached."""
        lines = (
            self.greeting, self.goodbye, self.apology, self.silence_prompt, self.wrap_up_warning,
            self.closing_max_duration, self.closing_max_turns, self.closing_silence, self.closing_error,
            self.closing_no_points,
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
    database_password_file: str = ""  # absolute once loaded; "" = none (libpq's environment, ~/.pgpass)
    database_pool: int = 4  # PostgreSQL connections (and threads) per node; SQLite has one
    node_id: str = "node"  # this process in the shared ledger (upvoot.nodes)
    playout_lead_min: float = 0.06  # the lead follows the pacer's recent lateness down to this
    lease: float = 60.0  # an active call without a heartbeat this long is settled as a crash
    reservation_horizon: float = 120.0  # how far ahead a running call holds points
    console: bool = True  # the browser console on the admin listener (upvoot.console)
    admin_token_file: str = ""  # absolute once loaded; "" = state_dir/admin_token, loopback admin listener only
    console_key_ttl: float = 300.0  # how long a console test key may wait for its call


# ---- the option tables live in upvoot.options --------------------------------------

_MAIN = MAIN
_AGENT = AGENT

#: The [upvoot] options that make up ``Config.websocket``.
_WEBSOCKET = tuple(attrs.fields_dict(WebSocketLimits))

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
    if values["turn_pause"] >= values["turn_max_pause"]:
        raise ConfigError(path, section, "turn_pause", "must be shorter than turn_max_pause")
    if values["turn"] == "smart":  # before daemonizing: is the end-of-turn model installed?
        from upvoot.engines import smartturn

        try:
            smartturn.model_path()
        except EngineUnavailable as e:
            raise ConfigError(path, section, "turn", f"turn = smart: {e}; or set turn = silence") from None
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
    database, password_file = main.pop("database"), main.pop("database_password_file")
    if not re.match(r"(?i)postgres(ql)?://", database):
        if "://" in database:
            raise ConfigError(path, "upvoot", "database", "expected a file path or a postgresql:// URL")
        database = os.path.normpath(os.path.join(state_dir, os.path.expanduser(database)))
    if password_file:
        password_file = os.path.normpath(os.path.join(state_dir, os.path.expanduser(password_file)))
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
    if main["playout_lead_min"] > main["playout_lead"]:
        raise ConfigError(path, "upvoot", "playout_lead_min", "must not be longer than playout_lead")
    if main["detect_timeout"] >= main["start_timeout"]:
        raise ConfigError(path, "upvoot", "detect_timeout", "must be shorter than start_timeout")
    if main["lease"] <= main["heartbeat"]:
        raise ConfigError(path, "upvoot", "lease", "must be longer than heartbeat (a few heartbeats)")
    if main["reservation_horizon"] < main["heartbeat"] + CLOSING_ALLOWANCE:
        raise ConfigError(path, "upvoot", "reservation_horizon", f"must be at least heartbeat + {CLOSING_ALLOWANCE:g}s")
    ws = WebSocketLimits(**{name: main.pop(name) for name in _WEBSOCKET})
    main.pop("state_dir")
    main["recordings_dir"] = os.path.normpath(os.path.join(state_dir, os.path.expanduser(main["recordings_dir"])))
    if main["admin_token_file"]:
        main["admin_token_file"] = os.path.normpath(os.path.join(state_dir, os.path.expanduser(main["admin_token_file"])))
    return Config(path=path, state_dir=state_dir, database=database, database_password_file=password_file,
                  websocket=ws, agents=agents, **main)


__all__ = [
    "AgentConfig", "Config", "ConfigError", "EngineSpec", "Option", "WebSocketLimits", "load_config",
    "parse_bool", "parse_duration",
]
