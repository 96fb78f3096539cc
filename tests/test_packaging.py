"""The wheel ships the twistd plugin (and no twisted/__init__.py), and twistd finds it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _pip_wheel(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *extra, "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # build from a clean copy: an in-tree build would read and write build/ and *.egg-info here
    source = tmp_path_factory.mktemp("src") / "upvoot"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "dropin.cache", "var",
    ))
    out = tmp_path_factory.mktemp("wheelhouse")
    result = _pip_wheel(source, out, "--no-build-isolation")
    if result.returncode != 0:
        # the environment lacks the build requirements (setuptools>=68, wheel): let pip fetch them
        result = _pip_wheel(source, out)
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("upvoot-*.whl")
    with zipfile.ZipFile(built) as z:
        yield z


def test_wheel_ships_the_plugin_and_the_type_marker(wheel):
    names = set(wheel.namelist())
    assert "twisted/plugins/upvoot_plugin.py" in names
    assert "upvoot/py.typed" in names
    assert "upvoot/daemon/tap.py" in names and "upvoot/engines/__init__.py" in names


def test_wheel_ships_every_package_and_module_of_the_tree(wheel):
    names = set(wheel.namelist())
    for package in ("call", "daemon", "dial", "engines", "framing", "ledger"):
        assert f"upvoot/{package}/__init__.py" in names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "upvoot").rglob("*.py")}
    assert sources - names == set()


def test_wheel_ships_the_module_the_plugin_names(wheel):
    text = wheel.read("twisted/plugins/upvoot_plugin.py").decode("utf-8")
    [target] = re.findall(r'ServiceMaker\(\s*"upvoot",\s*"([\w.]+)"', text)
    assert target.replace(".", "/") + ".py" in set(wheel.namelist())


def test_wheel_does_not_own_the_twisted_packages(wheel):
    names = set(wheel.namelist())
    # either file would shadow Twisted's own packages once installed
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]


def test_wheel_holds_only_upvoot_and_its_plugin(wheel):
    strays = [
        n for n in wheel.namelist()
        if not n.startswith(("upvoot/", "upvoot-", "twisted/plugins/upvoot_plugin.py"))
    ]
    assert strays == []


def test_plugin_file_is_tiny(wheel):
    text = wheel.read("twisted/plugins/upvoot_plugin.py").decode("utf-8")
    assert len(text.splitlines()) < 20
    assert 'ServiceMaker("upvoot", "upvoot.daemon.tap"' in text


def test_twisted_finds_the_upvoot_service_maker():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import IPlugin, getPlugins

    makers = [p for p in getPlugins(IPlugin) if IServiceMaker.providedBy(p) and p.tapname == "upvoot"]
    assert len(makers) == 1
    maker = makers[0]

    from upvoot.daemon import tap

    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService
