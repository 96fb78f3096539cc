"""upvoot.config: ini files -> frozen objects, one-line errors, and the shipped example."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from upvoot import engines, values
from upvoot.config import _AGENT, _MAIN, ConfigError, load_config, parse_duration

SHIPPED_INI = Path(__file__).resolve().parent.parent / "etc" / "upvoot.ini"

MINIMAL = """\
[upvoot]

[agent:x]
"""


def write(directory: Path, text: str, name: str = "upvoot.ini") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def agent_ini(**options: str) -> str:
    """MINIMAL with ``options`` set in [agent:x]."""
    return MINIMAL + "".join(f"{name} = {value}\n" for name, value in options.items())


def config_error(path: Path) -> str:
    """Load ``path`` expecting a ConfigError; return its one-line message."""
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    message = str(e.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# ---- the shipped example ----------------------------------------------------------


def test_shipped_ini_loads_with_the_demo_agent_and_documented_defaults():
    cfg = load_config(str(SHIPPED_INI))
    assert set(cfg.agents) == {"demo"}
    demo = cfg.agents["demo"]
    assert demo.max_duration == 1800.0
    assert demo.max_turns == 20
    assert demo.silence_timeout == 10.0
    # continuation lines are joined into one spoken line
    assert demo.greeting == (
        "Hello! You have reached the UpVoot demo. Ask me about our opening hours, "
        "or say goodbye to end the call."
    )
    assert {kind: spec.name for kind, spec in demo.engines.items()} == {
        "vad": "energy", "stt": "whisper", "brain": "scripted", "tts": "piper",
    }
    brain = demo.engines["brain"].settings
    assert [r.name for r in brain.rules] == ["hours", "where", "human", "bye"]
    assert [r.ends_call for r in brain.rules] == [False, False, False, True]
    assert cfg.listen == ("tcp:8080:interface=127.0.0.1",)
    assert cfg.state_dir == str(SHIPPED_INI.parent)
    assert cfg.database == str(SHIPPED_INI.parent / "upvoot.sqlite3")


def _option_names(table: dict) -> list[str]:
    return sorted(table)


@pytest.mark.parametrize("name", _option_names(_MAIN) + _option_names(_AGENT) + list(engines.KINDS))
def test_every_option_is_documented_in_the_shipped_ini(name):
    """Doc drift: each name in the option tables is set (or shown commented) in etc/upvoot.ini."""
    text = SHIPPED_INI.read_text(encoding="utf-8")
    assert re.search(rf"^[;#]?[ \t]*{re.escape(name)}[ \t]*=", text, re.MULTILINE), (
        f"option {name!r} is in upvoot/config.py but not in etc/upvoot.ini"
    )


@pytest.mark.parametrize("kind", engines.KINDS)
def test_every_engine_name_is_documented_in_the_shipped_ini(kind):
    text = SHIPPED_INI.read_text(encoding="utf-8")
    for name in engines.names(kind):
        assert re.search(rf"\b{re.escape(name)}\b", text), f"{kind} engine {name!r} is not documented"


def test_shipped_ini_values_are_the_defaults(tmp_path):
    """The example sets every limit to its default, as its comments say."""
    shipped = load_config(str(SHIPPED_INI))
    defaults = load_config(str(write(tmp_path, "[upvoot]\n[agent:demo]\n")))
    for field in ("listen", "max_calls", "lag_budget", "playout_lead", "playout_lead_min", "workers", "worker_queue",
                  "log_transcripts", "websocket"):
        assert getattr(shipped, field) == getattr(defaults, field), field
    demo, default = shipped.agents["demo"], defaults.agents["demo"]
    for field in attrs.fields(type(demo)):
        if field.name in ("greeting", "system_prompt", "engines"):
            continue  # the demo's own words and rules
        assert getattr(demo, field.name) == getattr(default, field.name), field.name
    for kind in ("vad", "stt", "tts"):
        assert demo.engines[kind] == default.engines[kind], kind


def _documented_options() -> dict[tuple[str, str], tuple[str, str]]:
    """(section, option) -> (value as written, the comment block right above it)."""
    out = {}
    section = None
    comments: list[str] = []
    for line in SHIPPED_INI.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section, comments = line.strip()[1:-1], []
        elif line.startswith((";", "#")):
            comments.append(line.lstrip(";# "))
        elif not line.strip():
            comments = []
        elif not line[0].isspace() and "=" in line:
            name, _, value = line.partition("=")
            out[(section, name.strip())] = (value.strip(), " ".join(comments))
            comments = []
    return out


DOCUMENTED_TABLES = [("upvoot", name, option) for name, option in _MAIN.items()] + [
    ("agent:demo", name, option) for name, option in _AGENT.items()
]


@pytest.mark.parametrize("section, name, option", DOCUMENTED_TABLES, ids=[f"{s}-{n}" for s, n, _ in DOCUMENTED_TABLES])
def test_the_shipped_ini_documents_each_default_and_range_above_its_option(section, name, option):
    """Each option's comment block says the code's default and, where the code
    checks one, its range; the value set is the default (the demo's own words aside)."""
    value, doc = _documented_options()[(section, name)]
    default = option.default or "(empty)"
    assert re.search(rf"Default: {re.escape(default)}(?=[.,;]?(\s|$))", doc), f"{name}: no 'Default: {default}' in {doc!r}"
    if option.range:
        assert f"Range: {option.range}" in doc, f"{name}: no 'Range: {option.range}' in {doc!r}"
    if name not in ("greeting", "system_prompt"):
        assert " ".join(value.split()) == option.default, name


# ---- values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("600ms", 0.6), ("10s", 10.0), ("30m", 1800.0), ("1h", 3600.0), ("2.5s", 2.5), ("3", 3.0),
     (" 45 s ", 45.0), ("0", 0.0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10 parsecs", "-1s", "1.5.2s", "s", "10 S"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_in_an_agent_section(tmp_path):
    path = write(tmp_path, agent_ini(
        end_of_turn="600ms", silence_timeout="10s", max_duration="1h", wrap_up_before="30m",
        barge_in_min="2.5s", max_utterance="3",
    ))
    a = load_config(str(path)).agents["x"]
    assert a.end_of_turn == pytest.approx(0.6)
    assert a.silence_timeout == 10.0
    assert a.max_duration == 3600.0
    assert a.wrap_up_before == 1800.0
    assert a.barge_in_min == 2.5
    assert a.max_utterance == 3.0


def test_minimal_ini_gets_every_default(tmp_path):
    cfg = load_config(str(write(tmp_path, MINIMAL)))
    assert cfg.max_calls == 50 and cfg.workers == 0 and cfg.log_transcripts is False
    assert cfg.websocket.max_message_size == 1048576
    assert cfg.websocket.auto_ping_interval == 0
    a = cfg.agents["x"]
    assert (a.max_duration, a.max_turns, a.silence_timeout) == (1800.0, 20, 10.0)
    assert a.greeting == "Hello! How can I help you?"
    assert {kind: spec.name for kind, spec in a.engines.items()} == {
        "vad": "energy", "stt": "whisper", "brain": "scripted", "tts": "piper",
    }


@pytest.mark.parametrize("text, value", [("yes", True), ("On", True), ("1", True), ("false", False), ("0", False)])
def test_bools(tmp_path, text, value):
    cfg = load_config(str(write(tmp_path, f"[upvoot]\nlog_transcripts = {text}\n[agent:x]\n")))
    assert cfg.log_transcripts is value


def test_listen_takes_one_endpoint_per_line(tmp_path):
    path = write(tmp_path, "[upvoot]\nlisten = tcp:9001:interface=127.0.0.1\n    tcp:9002\n[agent:x]\n")
    assert load_config(str(path)).listen == ("tcp:9001:interface=127.0.0.1", "tcp:9002")


def test_empty_prompt_lines_switch_off_their_timing_checks(tmp_path):
    # silence_prompt_after (default 6s) would not fit in a 5s silence_timeout,
    # and wrap_up_before (default 1m) not in a 1m call: harmless when never said
    path = write(tmp_path, agent_ini(silence_prompt="", silence_timeout="5s", wrap_up_warning="",
                                     max_duration="1m"))
    a = load_config(str(path)).agents["x"]
    assert (a.silence_prompt, a.wrap_up_warning) == ("", "")


def test_scripted_rules(tmp_path):
    path = write(tmp_path, agent_ini(**{
        "brain.rule.hours": "hours|opening time -> Nine to five.",
        "brain.rule.price": r"re:\bcost(s)?\b -> Ten pounds.",
        "brain.end.bye": "bye -> Goodbye!",
        "brain.fallback": "Pardon?",
    }))
    brain = load_config(str(path)).agents["x"].engines["brain"].settings
    assert [(r.name, r.reply, r.ends_call) for r in brain.rules] == [
        ("hours", "Nine to five.", False), ("price", "Ten pounds.", False), ("bye", "Goodbye!", True),
    ]
    assert brain.fallback == "Pardon?"


# ---- errors: one line naming file, section and option ------------------------------

ERRORS = [
    # (id, ini text, what follows "<file>: ")
    ("unknown section", MINIMAL + "[frob]\na = 1\n", "[frob]: unknown section"),
    ("unknown section kind", MINIMAL + "[agnet:y]\n", "[agnet:y]: unknown section"),
    ("bad agent name", MINIMAL + "[agent:a b]\n", "[agent:a b]: agent names use"),
    ("unknown upvoot option", "[upvoot]\nbogus = 1\n[agent:x]\n", "[upvoot] bogus: unknown option"),
    ("options are case-sensitive", "[upvoot]\nMax_Calls = 5\n[agent:x]\n", "[upvoot] Max_Calls: unknown option"),
    ("agent option in [upvoot]", "[upvoot]\nmax_turns = 5\n[agent:x]\n", "[upvoot] max_turns: unknown option"),
    ("unknown agent option", agent_ini(greting="Hi"), "[agent:x] greting: unknown option"),
    ("upvoot option in agent", agent_ini(max_calls="5"), "[agent:x] max_calls: unknown option"),
    ("bad duration", "[upvoot]\nlag_budget = 10 parsecs\n[agent:x]\n",
     "[upvoot] lag_budget: expected a duration"),
    ("bad agent duration", agent_ini(silence_timeout="soon"), "[agent:x] silence_timeout: expected a duration"),
    ("duration out of range", agent_ini(max_duration="5h"), "[agent:x] max_duration: 5h is out of range"),
    ("int out of range", "[upvoot]\nmax_calls = 0\n[agent:x]\n", "[upvoot] max_calls: 0 is out of range"),
    ("agent int out of range", agent_ini(max_turns="0"), "[agent:x] max_turns: 0 is out of range"),
    ("int above range", "[upvoot]\nworkers = 65\n[agent:x]\n", "[upvoot] workers: 65 is out of range"),
    ("not an int", "[upvoot]\nmax_calls = many\n[agent:x]\n", "[upvoot] max_calls: expected an integer"),
    ("multi-line value", "[upvoot]\nmax_calls = 5\n  6\n[agent:x]\n", "[upvoot] max_calls: expected an integer"),
    ("bad bool", "[upvoot]\nlog_transcripts = maybe\n[agent:x]\n",
     "[upvoot] log_transcripts: expected yes or no"),
    ("empty listen", "[upvoot]\nlisten =\n[agent:x]\n", "[upvoot] listen: at least one endpoint"),
    ("missing [upvoot]", "[agent:x]\n", "[upvoot]: missing section"),
    ("no agents", "[upvoot]\nmax_calls = 5\n", "no [agent:NAME] section"),
    ("not an ini file", "max_calls = 5\n", "File contains no section headers"),
    ("duplicate option", "[upvoot]\nmax_calls = 5\nmax_calls = 6\n[agent:x]\n", "While reading from"),
    ("unknown engine", agent_ini(vad="nope"), "[agent:x] vad: unknown vad engine 'nope' (choose from: energy,"),
    ("unknown engine option", agent_ini(**{"tts.bogus": "1"}), "[agent:x] tts.bogus: unknown option"),
    ("engine option for another engine", agent_ini(tts="espeak", **{"tts.length_scale": "1.0"}),
     "[agent:x] tts.length_scale: unknown option"),
    ("bad engine option value", agent_ini(**{"vad.threshold": "loud"}),
     "[agent:x] vad.threshold: expected a number"),
    ("empty engine option name", agent_ini(**{"vad.": "1"}), "[agent:x] vad.: empty engine option name"),
    ("bad scripted rule", agent_ini(**{"brain.rule.x": "no arrow"}),
     "[agent:x] brain.rule.x: expected 'PATTERN -> REPLY'"),
    ("scripted rule without reply", agent_ini(**{"brain.rule.x": "hello ->"}),
     "[agent:x] brain.rule.x: expected 'PATTERN -> REPLY'"),
    ("unknown scripted option", agent_ini(**{"brain.rules.x": "a -> b"}), "[agent:x] brain.rules.x: unknown option"),
    ("bad regex", agent_ini(**{"brain.rule.x": "re:( -> hi"}), "[agent:x] brain.rule.x: bad regular expression"),
    ("wrap-up not before the end", agent_ini(max_duration="1m", wrap_up_before="1m"),
     "[agent:x] wrap_up_before: must be shorter than max_duration"),
    ("silence prompt not before the timeout", agent_ini(silence_timeout="5s", silence_prompt_after="5s"),
     "[agent:x] silence_prompt_after: must be shorter than silence_timeout"),
    ("silence prompt default after a short timeout", agent_ini(silence_timeout="5s"),
     "[agent:x] silence_prompt_after: must be shorter than silence_timeout"),
    ("utterance limits", agent_ini(min_utterance="2s", max_utterance="1s"),
     "[agent:x] min_utterance: must be shorter than max_utterance"),
]


@pytest.mark.parametrize("text, expected", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_naming_file_section_and_option(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: {expected}"), message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "upvoot.ini"
    assert config_error(path) == f"{path}: no such file"


def test_a_directory_is_not_a_config_file(tmp_path):
    assert config_error(tmp_path).startswith(f"{tmp_path}: ")


def test_undecodable_file(tmp_path):
    path = tmp_path / "upvoot.ini"
    path.write_bytes(b"[upvoot]\nlisten = \xff\xfe\n[agent:x]\n")
    config_error(path)


def test_the_first_bad_agent_is_named(tmp_path):
    path = write(tmp_path, MINIMAL + "[agent:y]\nmax_turns = 0\n")
    assert config_error(path).startswith(f"{path}: [agent:y] max_turns: ")


# ---- paths -------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_ini_not_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(tmp_path, "[upvoot]\nstate_dir = ../var\ndatabase = db/upvoot.sqlite3\n"
                    "[agent:x]\ntts.model = voices/joe.onnx\nstt.model = models/tiny\n", "etc/upvoot.ini")
    cfg = load_config("../etc/upvoot.ini")  # a relative --config, too
    assert cfg.path == str(tmp_path / "etc" / "upvoot.ini")
    assert cfg.state_dir == str(tmp_path / "var")
    assert cfg.database == str(tmp_path / "var" / "db" / "upvoot.sqlite3")
    engines_ = cfg.agents["x"].engines
    assert engines_["tts"].settings.model == str(tmp_path / "var" / "voices" / "joe.onnx")
    assert engines_["stt"].settings.model == str(tmp_path / "var" / "models" / "tiny")


def test_default_state_dir_is_the_ini_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, MINIMAL, "etc/upvoot.ini")
    cfg = load_config(str(path))
    assert cfg.state_dir == str(tmp_path / "etc")
    assert cfg.database == str(tmp_path / "etc" / "upvoot.sqlite3")


def test_absolute_database_path_is_kept(tmp_path):
    db = tmp_path / "elsewhere" / "calls.sqlite3"
    path = write(tmp_path, f"[upvoot]\nstate_dir = state\ndatabase = {db}\n[agent:x]\n", "etc/upvoot.ini")
    cfg = load_config(str(path))
    assert cfg.state_dir == str(tmp_path / "etc" / "state")
    assert cfg.database == str(db)


# ---- the objects are frozen ---------------------------------------------------------


def test_config_objects_are_frozen(tmp_path):
    cfg = load_config(str(write(tmp_path, MINIMAL)))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.max_calls = 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.websocket.max_connections = 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.agents["x"].max_turns = 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.agents["x"].engines["vad"].name = "webrtc"


# ---- ranges (issue 9, item 10): every option is checked at load -----------------------


def _section_of(name: str) -> str:
    return "upvoot" if name in _MAIN else "agent:x"


def _ini_with(name: str, value: str) -> str:
    if name in _MAIN:
        return f"[upvoot]\n{name} = {value}\n[agent:x]\n"
    return agent_ini(**{name: value})


def _beyond(option) -> list[str]:
    """Values just outside an option's documented range, as ini text."""
    if option.range.endswith("characters"):
        return []  # lengths: RANGE_ERRORS below
    lo_text, hi_text = option.range.removeprefix("0 or ").split("..")
    if re.fullmatch(r"-?\d+", lo_text) and re.fullmatch(r"\d+", hi_text):  # an integer option
        return [str(int(lo_text) - 1), str(int(hi_text) + 1)]
    lo, hi = parse_duration(lo_text), parse_duration(hi_text)
    def seconds(x: float) -> str:
        return f"{x:f}".rstrip("0").rstrip(".")

    return ([seconds(lo / 2)] if lo > 0 else []) + [seconds(hi * 1.5)]


RANGED = [(name, value) for table in (_MAIN, _AGENT) for name, option in table.items()
          if option.range for value in _beyond(option)]


def test_every_number_and_duration_has_a_range():
    for table in (_MAIN, _AGENT):
        for name, option in table.items():
            if re.fullmatch(r"\d+(\.\d+)?(ms|s|m|h|d)?", option.default):
                assert option.range, f"{name} has no range"


@pytest.mark.parametrize("name, value", RANGED, ids=[f"{n}={v}" for n, v in RANGED])
def test_a_value_outside_the_documented_range_fails_at_load(tmp_path, name, value):
    path = write(tmp_path, _ini_with(name, value))
    option = (_MAIN | _AGENT)[name]
    assert config_error(path) == f"{path}: [{_section_of(name)}] {name}: {value} is out of range ({option.range})"


RANGE_ERRORS = [
    # (option, value, message after "<file>: [section] option: ")
    ("points_per_increment", "9223372036854775808", "9223372036854775808 is out of range (0..1000000000)"),
    ("points_per_increment", "1000000001", "1000000001 is out of range (0..1000000000)"),
    ("points_per_increment", "-1", "-1 is out of range (0..1000000000)"),
    ("points_per_increment", "9" * 5000, "expected an integer, got '" + "9" * 40 + "'..."),
    ("billing_increment", "0", "0 is out of range (1s..1h)"),
    ("billing_increment", "2h", "2h is out of range (1s..1h)"),
    ("max_turns", "10001", "10001 is out of range (1..10000)"),
    ("max_calls", "100001", "100001 is out of range (1..100000)"),
    ("max_calls_per_account", "100001", "100001 is out of range (0..100000)"),
    ("max_calls_per_address", "100001", "100001 is out of range (0..100000)"),
    ("workers", "65", "65 is out of range (0..64)"),
    ("worker_queue", "1001", "1001 is out of range (0..1000)"),
    ("max_message_size", "1023", "1023 is out of range (1024..67108864)"),
    ("max_frame_size", "67108865", "67108865 is out of range (1024..67108864)"),
    ("max_connections", "1000001", "1000001 is out of range (0..1000000)"),
    ("max_handshake_size", "1023", "1023 is out of range (1024..65536)"),
    ("max_handshake_size", "65537", "65537 is out of range (1024..65536)"),
    ("start_timeout", "500ms", "500ms is out of range (1s..1m)"),
    ("start_timeout", "61s", "61s is out of range (1s..1m)"),
    ("start_timeout", "0", "0 is out of range (1s..1m)"),
    ("recordings_keep", "30m", "30m is out of range (0 or 1h..36500d)"),
    ("recordings_keep", "36501d", "36501d is out of range (0 or 1h..36500d)"),
    ("heartbeat", "9" * 400, "the duration is too large"),
    ("max_duration", "1d", "1d is out of range (10s..4h)"),
    ("auth_failure_window", "2d", "2d is out of range (1s..1d)"),
    ("trust_x_forwarded_for", "11", "11 is out of range (0..10)"),
    ("greeting", "a" * 1001, "is 1001 characters long (at most 1000)"),
    ("closing_error", "b" * 1001, "is 1001 characters long (at most 1000)"),
    ("agent_select", "c" * 201, "is 201 characters long (at most 200)"),
    ("system_prompt", "d" * 100_001, "is 100001 characters long (at most 100000)"),
]


@pytest.mark.parametrize("name, value, expected", RANGE_ERRORS,
                         ids=[f"{n}={v[:24]}" for n, v, _ in RANGE_ERRORS])
def test_out_of_range_values_are_one_line_errors(tmp_path, name, value, expected):
    path = write(tmp_path, _ini_with(name, value))
    assert config_error(path) == f"{path}: [{_section_of(name)}] {name}: {expected}"


IN_RANGE = [
    ("points_per_increment", "1000000000", 10**9), ("points_per_increment", "0", 0),
    ("max_calls", "1_000", 1000), ("max_handshake_size", "65536", 65536), ("max_handshake_size", "1024", 1024),
    ("start_timeout", "1m", 60.0), ("start_timeout", "1s", 1.0), ("recordings_keep", "0", 0.0),
    ("recordings_keep", "36500d", 36500 * 86400.0), ("billing_increment", "1h", 3600.0),
    ("greeting", "a" * 1000, "a" * 1000), ("greeting", "Hello\tthere", "Hello there"),
]


@pytest.mark.parametrize("name, value, expected", IN_RANGE, ids=[f"{n}={v[:24]}" for n, v, _ in IN_RANGE])
def test_the_range_bounds_themselves_load(tmp_path, name, value, expected):
    cfg = load_config(str(write(tmp_path, _ini_with(name, value))))
    where = cfg.websocket if name in ("start_timeout", "max_handshake_size") else (
        cfg if name in _MAIN else cfg.agents["x"])
    assert getattr(where, name) == expected


def test_start_timeout_and_max_handshake_size(tmp_path):
    cfg = load_config(str(write(tmp_path, MINIMAL)))
    assert (cfg.websocket.start_timeout, cfg.websocket.max_handshake_size) == (10.0, 8192)
    cfg = load_config(str(write(tmp_path, "[upvoot]\nstart_timeout = 2500ms\nmax_handshake_size = 4096\n[agent:x]\n")))
    assert (cfg.websocket.start_timeout, cfg.websocket.max_handshake_size) == (2.5, 4096)


def test_playout_lead_min_is_at_most_playout_lead(tmp_path):
    cfg = load_config(str(write(tmp_path, "[upvoot]\n[agent:x]\n")))
    assert (cfg.playout_lead, cfg.playout_lead_min) == (0.1, 0.06)
    cfg = load_config(str(write(tmp_path, "[upvoot]\nplayout_lead = 80ms\nplayout_lead_min = 80ms\n[agent:x]\n")))
    assert (cfg.playout_lead, cfg.playout_lead_min) == (0.08, 0.08)
    path = write(tmp_path, "[upvoot]\nplayout_lead = 80ms\nplayout_lead_min = 100ms\n[agent:x]\n")
    assert config_error(path) == f"{path}: [upvoot] playout_lead_min: must not be longer than playout_lead"


def test_detect_timeout_must_be_shorter_than_start_timeout(tmp_path):
    path = write(tmp_path, "[upvoot]\ndetect_timeout = 5s\nstart_timeout = 5s\n[agent:x]\n")
    assert config_error(path) == f"{path}: [upvoot] detect_timeout: must be shorter than start_timeout"


def test_a_websocket_section_says_where_the_limits_go(tmp_path):
    path = write(tmp_path, MINIMAL + "[websocket]\nstart_timeout = 5s\n")
    assert config_error(path) == (
        f"{path}: [websocket]: unknown section (expected [upvoot] or [agent:NAME]); "
        "the WebSocket limits are [upvoot] options"
    )


ENDPOINT_ERRORS = [
    ("listen", "tcp:99999", "bad endpoint 'tcp:99999': port '99999' is not a number 0..65535"),
    ("listen", "tcp:65536:interface=127.0.0.1", "bad endpoint 'tcp:65536:interface=127.0.0.1': port '65536' is not"),
    ("listen", "tcp:port=70000", "bad endpoint 'tcp:port=70000': port '70000' is not"),
    ("listen", "tcp:-1", "bad endpoint 'tcp:-1': port '-1' is not"),
    ("listen", "tcp6:99999", "bad endpoint 'tcp6:99999': port '99999' is not"),
    ("listen", "ssl:99999:privateKey=key.pem", "bad endpoint 'ssl:99999:privateKey=key.pem': port '99999' is not"),
    ("listen", "haproxy:tcp:99999", "bad endpoint 'haproxy:tcp:99999': port '99999' is not"),
    ("listen", "tcp:interface=127.0.0.1", "bad endpoint 'tcp:interface=127.0.0.1': no port"),
    ("listen", "tcp:8080\n    tcp:99999", "bad endpoint 'tcp:99999': port '99999' is not"),
    ("admin_listen", "tcp:99999", "bad endpoint 'tcp:99999': port '99999' is not"),
]


@pytest.mark.parametrize("name, value, expected", ENDPOINT_ERRORS, ids=[f"{n}={v}" for n, v, _ in ENDPOINT_ERRORS])
def test_endpoint_ports_are_checked_at_load(tmp_path, name, value, expected):
    path = write(tmp_path, f"[upvoot]\n{name} = {value}\n[agent:x]\n")
    assert config_error(path).startswith(f"{path}: [upvoot] {name}: {expected}")


@pytest.mark.parametrize("value", [
    "tcp:0", "tcp:65535:interface=127.0.0.1", r"tcp:8080:interface=\:\:1", "ssl:8443:privateKey=k.pem:certKey=c.pem",
    "haproxy:tcp:8080:interface=127.0.0.1", "systemd:domain=INET:index=0", "unix:upvoot.sock",
])
def test_good_endpoints_load(tmp_path, value):
    cfg = load_config(str(write(tmp_path, f"[upvoot]\nlisten = {value}\nadmin_listen = {value}\n[agent:x]\n")))
    assert cfg.listen == (value,) and cfg.admin_listen == value


def test_too_many_listeners(tmp_path):
    lines = "\n".join(f"    tcp:{9000 + i}" for i in range(65))
    path = write(tmp_path, f"[upvoot]\nlisten =\n{lines}\n[agent:x]\n")
    assert config_error(path) == f"{path}: [upvoot] listen: 65 endpoints (at most 64)"


CONTROL = [
    # (where, option, value, character named)
    ("agent:x", "greeting", "Hello\x00there", "U+0000"),
    ("agent:x", "goodbye", "Bye\x07", "U+0007"),
    ("agent:x", "system_prompt", "Be \x1b[31m red", "U+001B"),
    ("agent:x", "closing_silence", "Bye\x7f", "U+007F"),
    ("agent:x", "silence_prompt", "Hello?\x85 Hello?", "U+0085"),
    ("agent:x", "brain.rule.x", "hi -> Hello\x00", "U+0000"),
    ("agent:x", "brain.fallback", "Pardon\x0c?", "U+000C"),
    ("agent:x", "stt.model", "models/\x00tiny", "U+0000"),
    ("upvoot", "listen", "tcp:8080\x00", "U+0000"),
    ("upvoot", "database", "db\x00.sqlite3", "U+0000"),
]


@pytest.mark.parametrize("section, name, value, char", CONTROL, ids=[f"{c[1]}-{c[3]}" for c in CONTROL])
def test_control_characters_fail_at_load(tmp_path, section, name, value, char):
    text = f"[upvoot]\n{name} = {value}\n[agent:x]\n" if section == "upvoot" else agent_ini(**{name: value})
    path = write(tmp_path, text)
    message = config_error(path)
    assert message == f"{path}: [{section}] {name}: contains the control character {char}"
    assert not values.control_character(message)


# ---- one grammar for the ini and the engines (issue 10, item 5) -------------------------


@pytest.mark.parametrize("text, seconds", [("1d", 86400.0), ("2d", 172800.0), ("1500ms", 1.5), ("0.5h", 1800.0)])
def test_the_one_duration_grammar(text, seconds):
    assert values.parse_duration(text) == pytest.approx(seconds)


def test_config_and_engines_share_the_grammars():
    import upvoot.config as config
    from upvoot.engines import options

    assert config.parse_duration is values.parse_duration
    assert config.parse_bool is values.parse_bool
    assert options.parse_bool({"x": "On"}, "x") is True and options.parse_bool({"x": "off"}, "x") is False
    # a duration an engine takes is spelled as in [upvoot]
    assert options.parse_seconds({"t": "1h"}, "t", 5.0) == 3600.0
    assert options.parse_seconds({}, "t", 5.0) == 5.0


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999"])
def test_engine_numbers_must_be_finite(text):
    from upvoot.engines.interfaces import EngineOptionError
    from upvoot.engines.options import parse_float

    with pytest.raises(EngineOptionError) as e:
        parse_float({"x": text}, "x", -100.0, 100.0)
    assert e.value.option == "x" and "finite" in e.value.message


@pytest.mark.parametrize("text, bad", [("Hello\tthere", None), ("a\nb", None), ("a\x00b", "U+0000"),
                                       ("\x9f", "U+009F"), ("caf\u00e9 \u200d", None)])
def test_control_character(text, bad):
    assert values.control_character(text) == bad
