"""upvoot.daemon.tap: ``twistd upvoot`` options, and a bad config stopping twistd before it daemonizes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.python import usage

from upvoot.config import ConfigError, load_config
from upvoot.daemon.tap import Options

INI = """\
[upvoot]
listen = tcp:9001:interface=127.0.0.1
    tcp:9002:interface=127.0.0.1

[agent:x]
"""

BAD_INI = """\
[upvoot]
max_calls = 0

[agent:x]
"""


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    path = tmp_path / "upvoot.ini"
    path.write_text(INI)
    return path


@pytest.fixture
def bad_ini(tmp_path: Path) -> Path:
    path = tmp_path / "bad.ini"
    path.write_text(BAD_INI)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    return str(e.value)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


# ---- Options -----------------------------------------------------------------------


def test_config_is_required():
    with pytest.raises(usage.UsageError, match="--config FILE is required"):
        parse()


def test_config_is_loaded(ini):
    options = parse("--config", str(ini))
    assert options.config.path == str(ini)
    assert options.endpoints == ["tcp:9001:interface=127.0.0.1", "tcp:9002:interface=127.0.0.1"]


def test_short_config_flag(ini):
    assert parse("-c", str(ini)).config.path == str(ini)


def test_bad_config_is_a_usage_error_with_the_one_line_config_error(bad_ini):
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(bad_ini))
    assert str(e.value) == config_error(bad_ini)
    assert str(e.value).startswith(f"{bad_ini}: [upvoot] max_calls: ")
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.ini"
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(missing))
    assert str(e.value) == f"{missing}: no such file"


def test_listen_is_repeatable_and_replaces_the_ini_listen(ini):
    options = parse("--config", str(ini), "--listen", "tcp:0:interface=127.0.0.1", "--listen", r"tcp:0:interface=\:\:1")
    assert options.endpoints == ["tcp:0:interface=127.0.0.1", r"tcp:0:interface=\:\:1"]
    assert options["listen"] == options.endpoints


def test_bad_listen_endpoint_is_named(ini):
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(ini), "--listen", "tcp:0", "--listen", "nosuchtype:1234")
    message = str(e.value)
    assert message.startswith("--listen: bad endpoint 'nosuchtype:1234'"), message
    assert "\n" not in message


def test_bad_endpoint_in_the_ini_names_file_section_and_option(tmp_path):
    path = tmp_path / "upvoot.ini"
    path.write_text("[upvoot]\nlisten = tcp:notaport\n[agent:x]\n")
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(path))
    assert str(e.value).startswith(f"{path}: [upvoot] listen: bad endpoint 'tcp:notaport'"), str(e.value)


# ---- the real twistd ------------------------------------------------------------------

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd script next to the interpreter")
@pytest.mark.parametrize("daemon", [False, True], ids=["nodaemon", "daemon"])
@pytest.mark.parametrize("problem", ["bad value", "missing file"])
def test_twistd_stops_on_a_bad_config_before_daemonizing(tmp_path, daemon, problem):
    if problem == "bad value":
        config = tmp_path / "bad.ini"
        config.write_text(BAD_INI)
    else:
        config = tmp_path / "missing.ini"
    expected = config_error(config)
    pidfile = tmp_path / "twistd.pid"
    argv = [TWISTD, *([] if daemon else ["-n"]), "--pidfile", str(pidfile), "upvoot", "--config", str(config)]

    started = time.monotonic()
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 30, elapsed
    assert "Traceback" not in output, output
    # twistd prints "<argv0>: <message>"; the message is the config error, whole, on one line
    assert any(line.endswith(f": {expected}") for line in output.splitlines()), output
    assert not pidfile.exists()
    if Path("/proc").is_dir():
        time.sleep(0.2)  # a forked daemon would still be alive now
        assert _processes_mentioning(str(config)) == []
