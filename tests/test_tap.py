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
from upvoot.daemon.tap import Options, ReactorProcess, _exit_now, build_service, makeService

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


# ---- the composition root -------------------------------------------------------------


def test_make_service_builds_everything_on_the_reactor_it_is_given(ini):
    from twisted.internet.testing import MemoryReactorClock

    from upvoot.daemon.service import UpVootService

    reactor = MemoryReactorClock()
    service = makeService(parse("--config", str(ini)), reactor)
    assert isinstance(service, UpVootService)
    assert service.clock is reactor and service.process._reactor is reactor
    assert [d for d, _, _ in service._listeners] == ["tcp:9001:interface=127.0.0.1", "tcp:9002:interface=127.0.0.1"]
    assert service.admin is not None
    # collaborators share the one reactor
    assert service.spooler._loop.clock is reactor and service.lag.clock is reactor
    assert service.guard.clock is reactor


def test_build_service_refuses_an_unknown_collaborator(ini):
    from twisted.internet.task import Clock

    with pytest.raises(TypeError, match="no collaborator named nosuch"):
        build_service(load_config(str(ini)), Clock(), nosuch=object())


def test_a_failed_start_stops_the_reactor_and_exits_1_after_twistd_cleaned_up():
    from types import SimpleNamespace

    stopped, registered = [], []
    reactor = SimpleNamespace(running=True, stop=lambda: stopped.append(True))
    process = ReactorProcess(reactor, at_exit=lambda *a: registered.append(a))
    process.fail("Could not load the engines: EngineUnavailable: no model")
    process.fail("a second failure is not logged again")
    assert stopped == [True] and registered == [(_exit_now, 1)]
    assert process.failed == "Could not load the engines: EngineUnavailable: no model"


def test_a_clean_drain_clears_the_exit_signal():
    from types import SimpleNamespace

    reactor = SimpleNamespace(_exitSignal=15)
    ReactorProcess(reactor).drained()
    assert reactor._exitSignal is None


ENGINES_FAIL_INI = """\
[upvoot]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1

[agent:x]
stt = whisper
stt.model = missing-model-dir
"""


def _twistd(tmp_path: Path, ini_text: str, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    config = tmp_path / "upvoot.ini"
    config.write_text(ini_text)
    log = tmp_path / "twistd.log"
    argv = [TWISTD, "-n", "--pidfile", str(tmp_path / "twistd.pid"), f"--logfile={log}", "upvoot",
            "--config", str(config), *extra]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return result, log.read_text() if log.exists() else ""


@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd script next to the interpreter")
def test_engines_that_cannot_load_exit_1_with_one_line(tmp_path):
    result, log = _twistd(tmp_path, ENGINES_FAIL_INI)
    assert result.returncode == 1, result.stdout + result.stderr + log
    lines = [line for line in log.splitlines() if "upvoot.start_failed" in line or "#critical]" in line]
    assert len(lines) == 1 and "Could not load the engines: EngineUnavailable: " in lines[0], log
    assert "Traceback" not in log + result.stdout + result.stderr
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd script next to the interpreter")
def test_a_port_that_cannot_be_listened_on_exits_1_with_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, log = _twistd(tmp_path, ENGINES_FAIL_INI, "--listen", f"tcp:{port}:interface=127.0.0.1")
    assert result.returncode == 1, result.stdout + result.stderr + log
    assert "Traceback" not in log + result.stdout + result.stderr, log
    [line] = [line for line in log.splitlines() if "#critical]" in line]
    assert f"Could not listen: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in line
    assert not (tmp_path / "twistd.pid").exists()
