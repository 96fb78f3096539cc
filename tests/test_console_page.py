"""The console page as shipped (upvoot/console/static/), read as text: it
runs under ``script-src 'self'; style-src 'self'`` (no inline script or
style, no event-handler attributes), fetches nothing from another origin
(no CDN), writes call text only as text (no innerHTML and friends), and
every file it loads is shipped."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import upvoot.console

STATIC = Path(upvoot.console.__file__).parent / "static"
SCRIPTS = sorted(STATIC.glob("*.js"))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_script = True


def test_the_page_has_no_inline_script_or_style_and_loads_only_its_own_files():
    page = _Page()
    page.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert not page.inline_script
    for tag, attrs in page.tags:
        assert tag != "style", "an inline <style>"
        assert not [a for a in attrs if a == "style" or a.startswith("on")], (tag, attrs)
        for name in ("src", "href"):
            if name in attrs:
                assert not re.match(r"^([a-z]+:|//)", attrs[name]), attrs[name]  # relative: this origin
                assert (STATIC.parent / attrs[name]).is_file(), attrs[name]
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert scripts == [{"type": "module", "src": "static/app.js"}]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_write_no_html_and_load_only_shipped_files(script):
    js = script.read_text(encoding="utf-8")
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                  "setAttribute(\"style\"", "http://", "https://", "localStorage", "sessionStorage"):
        assert risky not in js, f"{script.name} uses {risky}"
    for module in re.findall(r"""^\s*import\s.*?from\s+["']([^"']+)["']""", js, re.M):
        assert module.startswith("./") and (STATIC / module).is_file(), module
    for worklet in re.findall(r"""addModule\(["']static/([^"']+)["']\)""", js):
        assert (STATIC / worklet).is_file(), worklet


def test_worklets_register_the_processors_the_page_asks_for():
    names = {m for p in SCRIPTS for m in re.findall(r"""registerProcessor\(["']([\w-]+)["']""", p.read_text())}
    asked = {m for p in SCRIPTS for m in re.findall(r"""new AudioWorkletNode\(\w+, ["']([\w-]+)["']""", p.read_text())}
    assert asked == names == {"upvoot-mic", "upvoot-player"}


def test_the_style_sheet_fetches_nothing():
    css = (STATIC / "style.css").read_text(encoding="utf-8")
    assert "@import" not in css and "url(" not in css
