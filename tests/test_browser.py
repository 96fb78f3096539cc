"""The console in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing downloaded) against the real
daemon on loopback, with a fake microphone that plays a WAV made here from
the shipped piper voice: log in with the URL `upvoot console-url` prints,
call the demo agent, hear its greeting, ask it a question, hear the
answer, hang up, find the call in History and its timeline with one bar
per spoken turn. A screenshot of the page is kept (the path is printed)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
import wave
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.daemon import Daemon, shipped_ini, synthesize
from upvoot.audio import silence

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SVG = "{http://www.w3.org/2000/svg}"
QUESTION = "What are your opening hours?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (see the README's install commands)"),
]


def fake_microphone(path: Path) -> None:
    """The caller: silent while the greeting plays, then the question, then quiet."""
    pcm = silence(7.0) + synthesize(QUESTION) + silence(25.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)


def browser(wav: Path, downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={downloads}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path is given: Selenium Manager has nothing to find or fetch
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


def test_a_call_from_the_browser(tmp_path, monkeypatch):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it asked, must not go online
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    ini = shipped_ini()
    assert ini.count("\nrecord = no\n") == 1
    daemon = Daemon(tmp_path / "daemon", ini.replace("\nrecord = no\n", "\nrecord = yes\n"))  # the demo agent's
    started: dict = {}

    def start_daemon():  # the account, its points and the console URL, then the daemon: while we make the caller
        try:
            cli(daemon.ini, "keys", "create", "--agent", "demo", "--account", "acme")
            cli(daemon.ini, "points", "add", "acme", "100")
            started["url"] = cli(daemon.ini, "console-url")
            daemon.start()
        except BaseException as e:  # raised again below, in the test
            started["error"] = e

    starter = threading.Thread(target=start_daemon, daemon=True)
    starter.start()
    driver = None
    try:
        wav = tmp_path / "caller.wav"
        fake_microphone(wav)
        driver = browser(wav, tmp_path / "chromium")
        starter.join(120)
        if "error" in started:
            raise started["error"]
        url = started["url"]
        assert url.startswith("http://127.0.0.1:") and "#token=" in url
        phases["start"] = time.monotonic() - t0

        def wait(predicate, timeout=30.0, what=""):
            try:
                return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[
                    StaleElementReferenceException]).until(lambda d: predicate())
            except Exception as e:
                shot(driver, tmp_path, "failed")
                raise AssertionError(f"waiting for {what}: {e!r}; page log: {console_log(driver)}\n"
                                     f"events: {text_of(driver, 'events')}") from None

        def said(role):  # read in one script: the page rebuilds the list as the transcript grows
            return driver.execute_script(
                "return Array.from(document.querySelectorAll(`#transcript li[data-role=${arguments[0]}] .text`),"
                " el => el.textContent);", role)

        def fetch(path):
            return driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "fetch(arguments[0], {credentials: 'same-origin'}).then(r => r.text()).then(done, e => done(String(e)));",
                path)

        # log in: the token leaves the address bar
        driver.get(url)
        wait(lambda: driver.find_element(By.ID, "nav").is_displayed(), what="the login")
        assert "token" not in driver.current_url
        Select(driver.find_element(By.ID, "agent")).select_by_value("demo")
        Select(driver.find_element(By.ID, "account")).select_by_value("acme")

        t_call = time.monotonic()
        driver.find_element(By.ID, "call").click()
        wait(lambda: any("UpVoot demo" in s for s in said("agent")), what="the greeting's transcript")
        driver.find_element(By.ID, "nav-live").click()  # the call goes on while we look at the live calls
        live = "return Array.from(document.querySelectorAll('#live-table tbody td'), td => td.textContent);"
        wait(lambda: driver.execute_script(live)[1:3] == ["demo", "acme"], what="the call among the live calls")
        driver.find_element(By.ID, "nav-call").click()
        # the question's words as Whisper heard them through the browser's microphone path (once "What are
        # you opening now"): "opening" is what the demo agent's rule needs, and the answer is checked below
        wait(lambda: any("opening" in s.lower() for s in said("caller")), what="the caller's question")
        rx = driver.find_element(By.ID, "rx")
        heard_before = int(rx.get_attribute("data-bytes"))
        wait(lambda: len(said("agent")) >= 2, what="the answer's transcript")
        assert "nine" in said("agent")[1].lower()
        assert int(rx.get_attribute("data-bytes")) > heard_before > 0  # the answer's audio arrived
        wait(lambda: int(rx.get_attribute("data-played")) > 0, what="audio played")
        status = driver.find_element(By.ID, "call-status").text
        assert "uvk_" in status and "\u2026" in status  # the key's prefix, never the key
        shot(driver, tmp_path, "call")
        driver.find_element(By.ID, "hangup").click()
        wait(lambda: driver.find_element(By.ID, "call-status").get_attribute("data-state") == "closed",
             what="the hang-up")
        phases["call"] = time.monotonic() - t_call

        # the call in History, with its timeline
        driver.find_element(By.ID, "nav-history").click()
        rows = "#history-table tbody tr"
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, rows), what="the call in History")
        row = driver.find_element(By.CSS_SELECTOR, rows)
        call_id = row.get_attribute("data-call-id")
        row.find_element(By.TAG_NAME, "a").click()
        record = json.loads(fetch(f"api/calls/{call_id}"))
        record = record.get("call", record)
        assert record["state"] == "settled" and record["metadata"].get("console") is True
        assert [e["role"] for e in record["transcript"]] == ["agent", "caller", "agent"]
        img = driver.find_element(By.ID, "detail-svg")
        wait(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img),
             what="the timeline picture")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#detail-transcript li")) == len(record["transcript"])
        # the recording: its waveform under the picture, and a cursor that moves along both as it plays
        wave_ = driver.find_element(By.ID, "detail-wave")
        wait(lambda: wave_.is_displayed(), what="the recording's waveform")
        cursor = driver.find_element(By.ID, "detail-cursor")
        at_start = cursor.value_of_css_property("left")
        driver.execute_script("document.getElementById('detail-audio').play()")
        wait(lambda: cursor.value_of_css_property("left") != at_start, what="the cursor to move")
        svg = fetch(img.get_attribute("src"))
        (tmp_path / "timeline.svg").write_text(svg, encoding="utf-8")
        root = ET.fromstring(svg.encode("utf-8"))
        bars = [el for el in root.iter(SVG + "rect") if "speech" in (el.get("class") or "").split()]
        assert [el.get("class").split()[1] for el in bars] == ["agent", "caller", "agent"]  # one per spoken turn
        print(f"\nscreenshots: {tmp_path / 'call.png'} {shot(driver, tmp_path, 'history')}\n"
              f"timeline: {tmp_path / 'timeline.svg'}\nseconds: {', '.join(f'{k} {v:.1f}' for k, v in phases.items())}, all {time.monotonic() - t0:.1f}")
    finally:
        if driver is not None:
            driver.quit()
        starter.join(120)
        daemon.stop()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def cli(ini: Path, *argv: str) -> str:
    """The operator's command line, run here (not in a new process: seconds saved)."""
    from upvoot.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run(["--config", str(ini), *argv])
    if status:
        raise RuntimeError(f"upvoot {' '.join(argv)}: {err.getvalue().strip()}")
    return out.getvalue().strip()


def shot(driver, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    try:
        driver.save_screenshot(str(path))
    except Exception:  # the page is gone: no picture, but the test's own error matters
        pass
    return path


def console_log(driver) -> list[str]:
    try:
        return [entry["message"] for entry in driver.get_log("browser")][-20:]
    except Exception:
        return []


def text_of(driver, element_id: str) -> str:
    try:
        return driver.find_element("id", element_id).text[-2000:]
    except Exception:
        return ""

