"""Full calls against the real daemon where the client speaks a telephony
provider's own protocol (``upvoot.dial.providers``): Exotel at 8 and 16 kHz,
Twilio, Plivo, Telnyx (L16 by URL ``codec``) and Vonage. Slow: real engines,
real time."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.daemon import BIN, Caller, Daemon, shipped_ini, synthesize
from upvoot import audio
from upvoot.config import load_config
from upvoot.dial import AgentAudio, Cleared, MarkSent, Violation, make_sim

pytestmark = pytest.mark.slow

STORY = ("Let me tell you a long story. Once upon a time there was a small village by the sea.\n"
         "    Every morning the fishermen went out in their boats to catch fish for the market.\n"
         "    The children played on the beach until the sun went down behind the hills.")

AGENTS = f"""
[agent:prov]
greeting = Hello, thanks for calling.
silence_timeout = 60s
brain.rule.hours = hours|opening -> We open at nine.
brain.fallback = {STORY}

[agent:long]
greeting = Hi.
silence_timeout = 30s
brain.fallback = {STORY}

[agent:picker]
greeting = This is the switchboard.
agent_select = agent
"""

CUSTOM = {"campaign": "spring", "ticket": "42"}

# (id, provider, sample rate, codec)
CASES = [
    ("exotel-8k", "exotel", None, None),
    ("exotel-16k", "exotel", 16000, None),
    ("twilio", "twilio", None, None),
    ("plivo", "plivo", None, None),
    ("telnyx-l16", "telnyx", None, "L16"),
    ("vonage", "vonage", None, None),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("providers"), shipped_ini(max_calls="4") + AGENTS)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def question():
    return synthesize("What are your opening hours?")


@pytest.fixture(scope="module")
def story_request():
    return synthesize("Tell me a story please.")


@pytest.fixture(scope="module")
def interruption():
    return synthesize("Stop, stop. Wait a moment please.")


class ProviderCall:
    """A provider's side of one call over a real socket: sends the sim's
    opening messages at once, then caller audio in real time (silence
    unless :meth:`play` gives speech), echoes marks when they are due, and
    records every simulator event with its arrival time (seconds from the open)."""

    def __init__(self, url: str, sim) -> None:
        self.sim = sim
        self.ws = connect(url, open_timeout=10, max_size=None).__enter__()
        self.opened = time.monotonic()
        self.events: list[tuple[float, object]] = []
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self._lock = threading.Condition()
        self._speech = bytearray()
        self._running = True
        with self._lock:
            self._send(sim.open())
            self.started_at = self.now()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def now(self) -> float:
        return time.monotonic() - self.opened

    def _send(self, frames) -> None:
        for f in frames:
            self.ws.send(f.payload)

    def _read(self) -> None:
        try:
            for msg in self.ws:
                with self._lock:
                    t = self.now()
                    if isinstance(msg, bytes):
                        evs = self.sim.receive_binary(msg, t)
                    else:
                        evs = self.sim.receive_text(msg, t)
                    self.events += [(t, e) for e in evs]
                    self._lock.notify_all()
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self.closed_at = self.now()
                self.close_code = self.ws.close_code
                self._lock.notify_all()

    def _write(self) -> None:
        step = self.sim.frame_seconds
        chunk = int(audio.BYTES_PER_SECOND * step) // 2 * 2
        next_audio = 0.0
        try:
            while self._running and self.closed_at is None:
                with self._lock:
                    now = self.now()
                    frames = self.sim.poll(now)
                    if now >= next_audio:
                        pcm = bytes(self._speech[:chunk]).ljust(chunk, b"\x00")
                        del self._speech[:chunk]
                        frames += self.sim.caller_audio(pcm)
                        next_audio += step
                        self._lock.notify_all()
                    self._send(frames)
                time.sleep(0.005)
        except ConnectionClosed:
            pass

    # --- actions
    def play(self, pcm: bytes) -> None:
        """Speak ``pcm`` (16 kHz) in real time; returns when it has been sent."""
        with self._lock:
            self._speech += pcm
            while self._speech and self.closed_at is None:
                self._lock.wait(0.1)

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def stop(self) -> None:
        """The provider ends the stream: its stop message, or closing the socket."""
        with self._lock:
            frames = self.sim.stop()
            self._send(frames)
        if self.sim.ends_by_closing:
            self.close()

    def close(self) -> None:
        self._running = False
        self.ws.close()
        self._reader.join(10)
        self._writer.join(10)

    # --- reading
    def of(self, kind, after: float = 0.0) -> list[tuple[float, object]]:
        with self._lock:
            return [(t, e) for t, e in self.events if isinstance(e, kind) and t >= after]

    def wait(self, kind, after: float = 0.0, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [(t, e) for t, e in self.events if isinstance(e, kind) and t >= after]
                if found:
                    return found[0]
                if self.closed_at is not None:
                    raise AssertionError(f"closed ({self.close_code}) while waiting for {kind.__name__}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {kind.__name__} after {after:.2f}s; events: {self.summary()}")
                self._lock.wait(0.05)

    def wait_quiet(self, after: float, quiet: float = 0.8, timeout: float = 30.0) -> float:
        """Wait for agent audio after ``after`` and then for ``quiet`` seconds
        with none; returns the time of the last audio."""
        self.wait(AgentAudio, after=after, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.of(AgentAudio, after)[-1][0]
            if self.now() - last >= quiet:
                return last
            time.sleep(0.05)
        raise AssertionError("the agent never stopped talking")

    def wait_closed(self, timeout: float = 20.0) -> int | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.closed_at is None:
                if time.monotonic() > deadline:
                    raise AssertionError("the server did not close")
                self._lock.wait(0.1)
        return self.close_code

    def summary(self) -> list:
        out: list = []
        for t, e in self.events:
            name = type(e).__name__
            if out and out[-1][1] == name == "AgentAudio":
                continue
            out.append((round(t, 2), name, getattr(e, "name", getattr(e, "message", ""))))
        return out[-40:]


def _sim(provider, rate, codec, **kw):
    return make_sim(provider, sample_rate=rate, codec=codec, custom=dict(CUSTOM), **kw)


def _agent_entries(record):
    return [t for t in record["transcript"] if t["role"] == "agent"]


@pytest.mark.parametrize("provider,rate,codec", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_full_call(daemon, question, story_request, interruption, provider, rate, codec):
    key = daemon.key(agent="prov", account=f"p-{provider}-{rate or 0}", points=10)
    sim = _sim(provider, rate, codec)
    call = ProviderCall(sim.url(daemon.url(f"/voice/{key}")), sim)
    try:
        # greeting: decoded media right after the start message
        t_first, first = call.wait(AgentAudio, timeout=5)
        if provider == "exotel":
            assert t_first - call.started_at < 0.05, "Exotel's greeting leaves within 50 ms of start"
        else:
            assert t_first - call.started_at < 0.5
        greeting_end = call.wait_quiet(0.0)
        greeting = b"".join(e.pcm for _, e in call.of(AgentAudio))
        assert audio.duration(greeting) > 0.8 and audio.rms_dbfs(greeting) > -40

        # a turn
        asked = call.now()
        call.play(question)
        reply_end = call.wait_quiet(asked + 0.1, timeout=30)
        assert reply_end > asked

        # barge-in over the long story
        mark_from = call.now()
        call.play(story_request)
        t_story, _ = call.wait(AgentAudio, after=mark_from + 0.5, timeout=30)
        call.pause(2.0)
        call.play(interruption)
        t_clear, cleared = call.wait(Cleared, after=t_story, timeout=10)
        if sim.name in ("twilio", "telnyx"):
            assert cleared.lost == ()  # they return pending marks; the server took them
        call.pause(0.5)
        call.stop()
        if not sim.ends_by_closing:
            assert call.wait_closed() in (1000, None)
    finally:
        call.close()

    assert [v for v in sim.violations] == []
    if provider == "exotel":
        assert sim.chunk_sizes and all(3200 <= n <= 100_000 and n % 320 == 0 for n in sim.chunk_sizes)
    if sim.name != "vonage":
        assert call.of(MarkSent), "marks every ~200 ms of agent audio"

    record = daemon.call()
    assert record["provider"] == provider
    assert record["end_reason"] == "hangup"
    callers = [t["text"].lower() for t in record["transcript"] if t["role"] == "caller"]
    # 8 kHz G.711 costs the recognizer a word now and then ("opening now"): the turn is what counts
    assert any("opening" in c for c in callers), callers
    assert any("nine" in t["text"] for t in _agent_entries(record)), record["transcript"]
    cut = [t for t in _agent_entries(record) if t.get("interrupted")]
    assert cut and record["barge_ins"] >= 1
    assert cut[0]["text"].startswith("Let me tell you") and "sun went down" not in cut[0]["text"]

    meta = record["metadata"]
    assert meta["provider"] == provider and meta["call_id"] == sim.call_id
    if sim.stream_id is not None:
        assert meta["stream_id"] == sim.stream_id
    if provider in ("exotel", "telnyx"):
        assert meta["from_number"] == sim.from_number and meta["to_number"] == sim.to_number
    else:  # Twilio has no from/to; Plivo and Vonage carry them as custom values
        assert provider == "twilio" or (meta["custom"]["from"], meta["custom"]["to"]) == (sim.from_number, sim.to_number)
    assert {k: meta["custom"][k] for k in CUSTOM} == CUSTOM
    turns = [lat for lat in meta["latencies"] if "voice_to_voice" in lat]
    assert turns
    if provider in ("exotel", "twilio", "plivo", "telnyx"):
        # voice-to-voice follows acknowledged playout: heard, not sent
        for lat in turns:
            assert lat["voice_to_voice"] >= lat["voice_to_voice_sent"] > 0


def test_barge_in_cut_follows_acknowledged_marks(daemon, question, interruption):
    """Exotel acknowledges playback with marks: when none come back the
    caller has provably heard nothing, and the record says so."""
    key = daemon.key(agent="long", account="p-unacked", points=10)
    sim = _sim("exotel", None, None)
    sim.buffer.mark = lambda now, name: None  # this provider never echoes a mark
    call = ProviderCall(sim.url(daemon.url(f"/voice/{key}")), sim)
    try:
        call.wait_quiet(0.0, quiet=2.0)  # the greeting's wait for its marks gives up after MARK_GRACE
        asked = call.now()
        call.play(question)
        t_story, _ = call.wait(AgentAudio, after=asked + 0.5, timeout=30)
        call.pause(2.0)
        call.play(interruption)
        call.wait(Cleared, after=t_story, timeout=10)
        call.pause(0.3)
        call.stop()
        call.wait_closed()
    finally:
        call.close()
    received = sum(audio.duration(e.pcm) for t, e in call.of(AgentAudio, t_story))
    assert received > 1.5, "the story was sent for seconds..."
    record = daemon.call()
    assert record["barge_ins"] >= 1 and record["end_reason"] == "hangup"
    story = [t for t in _agent_entries(record) if "story" in t["text"] or "village" in t["text"]]
    assert story == [], "...but no mark said it played, so none of it counts as heard"


@pytest.mark.parametrize("provider", ["exotel", "twilio"])
def test_auto_detection_from_the_start_message(daemon, provider):
    key = daemon.key(agent="prov", account=f"auto-{provider}", points=10)
    sim = _sim(provider, None, None)
    url = sim.url(daemon.url(f"/voice/{key}"), name_provider=False)
    assert "provider=" not in url
    call = ProviderCall(url, sim)
    try:
        t_first, _ = call.wait(AgentAudio, timeout=5)
        assert t_first - call.started_at < 0.5
        call.pause(0.5)
        call.stop()
        call.wait_closed()
    finally:
        call.close()
    assert sim.violations == []
    record = daemon.call()
    assert record["provider"] == provider and record["end_reason"] == "hangup"
    assert record["metadata"]["call_id"] == sim.call_id


def test_raw_is_detected_within_the_documented_bound(daemon):
    bound = load_config(str(daemon.ini)).detect_timeout
    assert 0 < bound <= 0.5
    key = daemon.key(agent="prov", account="auto-raw", points=10)
    silent = Caller(daemon.url(f"/voice/{key}"))  # says nothing: raw after detect_timeout
    try:
        t, kind, msg = silent.wait_for(lambda ev: ev[1] == "json", timeout=5, keep_playing=False)
        assert msg == {"type": "audio_start"}
        assert t < bound + 0.25
    finally:
        silent.close()
    speaking = Caller(daemon.url(f"/voice/{key}"))  # sends audio at once: raw without waiting
    try:
        speaking.ws.send(bytes(audio.FRAME_BYTES))
        t, kind, msg = speaking.wait_for(lambda ev: ev[1] == "json", timeout=5)
        assert msg == {"type": "audio_start"}
        assert t < bound
    finally:
        speaking.close()


def test_dial_command_speaks_exotel(daemon, question, tmp_path):
    key = daemon.key(agent="prov", account="dial-exotel", points=10)
    wav = tmp_path / "q.wav"
    audio.write_wav(str(wav), question)
    out = subprocess.run(
        [str(BIN / "upvoot"), "dial", "--provider", "exotel", daemon.url(f"/voice/{key}"), "--play", str(wav),
         "--play-after-greeting", "--hangup-after", "9", "--json", "--config", str(daemon.ini)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    transcripts = [row["transcript"] for row in rows if "transcript" in row]
    assert transcripts, out.stdout[-2000:]
    said = [(t["role"], t["text"]) for t in transcripts[-1]]
    assert any(role == "caller" and "opening" in text.lower() for role, text in said), said
    assert any(role == "agent" and "nine" in text for role, text in said), said
    summary = rows[-1]["summary"] if "summary" in rows[-1] else next(r["summary"] for r in rows if "summary" in r)
    assert summary["provider"] == "exotel" and summary["violations"] == []


@pytest.mark.parametrize("wanted, answered", [("long", "long"), ("prov", "picker")])
def test_custom_parameter_picks_among_the_accounts_agents(daemon, wanted, answered):
    """agent_select: a custom parameter may pick another agent, but only one
    the key's account also holds a key for."""
    account = f"switchboard-{wanted}"
    key = daemon.key(agent="picker", account=account, points=10)
    daemon.key(agent="long", account=account, points=0)  # entitles the account to "long", not to "prov"
    sim = make_sim("exotel", custom={"agent": wanted})
    call = ProviderCall(sim.url(daemon.url(f"/voice/{key}")), sim)
    try:
        call.wait(AgentAudio, timeout=5)
        call.pause(0.3)
        call.stop()
        call.wait_closed()
    finally:
        call.close()
    record = daemon.call()
    assert record["account"] == account and record["agent"] == answered
    assert record["metadata"]["custom"] == {"agent": wanted}
    if wanted != answered:
        assert "call.agent_refused" in daemon.log_text() or "has no key for" in daemon.log_text()
