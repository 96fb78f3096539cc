"""Shared pieces of bench/voice.py and bench/capacity.py: a caller that asks
real spoken questions and times the agent's answers.

- ``question_clips``: the demo agent's questions spoken by the shipped piper
  voice (``tests.daemon.synthesize``), with silence before and after, and
  the exact sample where the speech ends.
- ``QuestionCaller``: a ``upvoot.dial.AudioSource`` (the Autobahn
  client of ``upvoot dial`` and ``bench/load.py``) that, after the greeting,
  asks a question, waits for the reply's ``audio_end``, pauses, asks the
  next; it records per turn when the speech ended (as sent) and when the
  first byte of the reply audio arrived.
- ``run_calls``: N such calls at once, every one bounded in time.
- ``managed_daemon`` / ``call_records``: a real ``twistd -n upvoot`` on
  loopback with the shipped ini (``tests.daemon``), and the server's call
  records (``upvoot calls list/show --json``) matched to our calls.

Figures (``percentile``, ``cpu_seconds``) come from ``bench/load.py``.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from upvoot._env import set_offline_environment  # noqa: E402

set_offline_environment()

import attrs  # noqa: E402
import numpy as np  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from bench.load import cpu_seconds, percentile  # noqa: E402,F401  (re-exported)
from upvoot import audio  # noqa: E402
from upvoot.audio import FRAME_BYTES  # noqa: E402
from upvoot.dial import SILENT_FRAME, Call, DialOptions, DialResult, start_call  # noqa: E402
from upvoot.engines.energy import EnergyDetector, EnergySettings  # noqa: E402

#: Questions the shipped demo agent's rules answer, with a word of the reply
#: each rule gives (to check the agent understood).
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What are your opening hours?", "nine in the morning"),
    ("Where are you located?", "Station Road"),
    ("Can I speak to a human, please?", "automated assistant"),
    ("What time do you close on Friday?", "nine in the morning"),
    ("What is your address?", "Station Road"),
)

#: "End of speech": the end of the last 5 ms window louder than this.
SPEECH_END_DBFS = -50.0


# ---- the caller's audio ----------------------------------------------------------------------


@attrs.frozen
class Clip:
    text: str
    expect: str
    pcm: bytes  # silence + speech + silence, whole 20 ms frames
    speech_start: int  # byte offsets into pcm
    speech_end: int
    #: where the energy VAD (the shipped ini's detector, fed this clip
    #: frame by frame) hears the last voiced frame end
    vad_end: int

    @property
    def speech_seconds(self) -> float:
        return audio.duration(self.speech_end - self.speech_start)


def _loud_span(pcm: bytes, dbfs: float = SPEECH_END_DBFS, window: int = 80) -> tuple[int, int]:
    """Byte offsets of the first and last ``window``-sample block above ``dbfs``."""
    x = audio.to_int16(pcm).astype(np.float64)
    n = len(x) // window
    rms = np.sqrt(np.mean(x[: n * window].reshape(n, window) ** 2, axis=1))
    loud = np.nonzero(rms > 32768.0 * 10 ** (dbfs / 20.0))[0]
    if not len(loud):
        raise ValueError("no speech in the clip")
    return int(loud[0]) * window * 2, (int(loud[-1]) + 1) * window * 2


def _vad_end(pcm: bytes) -> int:
    det = EnergyDetector(EnergySettings())
    last = 0
    for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        if det.is_speech(pcm[i : i + FRAME_BYTES]):
            last = i + FRAME_BYTES
    return last


def make_clip(text: str, expect: str, before: float = 0.5, after: float = 0.3) -> Clip:
    from tests.daemon import synthesize

    speech = synthesize(text)
    lead = bytes(int(round(before / 0.02)) * FRAME_BYTES)
    tail = bytes(int(round(after / 0.02)) * FRAME_BYTES)
    pcm = lead + speech + tail
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    start, end = _loud_span(speech)
    return Clip(text, expect, pcm, len(lead) + start, len(lead) + end, _vad_end(pcm))


def question_clips(questions: Sequence[tuple[str, str]] = QUESTIONS, before: float = 0.5, after: float = 0.3) -> list[Clip]:
    return [make_clip(text, expect, before, after) for text, expect in questions]


def write_clips_wav(path: Path, clips: Sequence[Clip]) -> None:
    """The question clips back to back (16 kHz mono), for listening."""
    audio.write_wav(str(path), b"".join(c.pcm for c in clips))


# ---- the caller ---------------------------------------------------------------------------------


@attrs.define
class TurnTiming:
    """One question and its answer; times in seconds since the call opened."""

    call: int
    index: int
    clip: Clip
    asked_at: float  # first frame of the clip sent
    speech_end: float | None = None  # the clip's speech_end byte sent (sub-frame exact)
    vad_end: float | None = None
    audio_start: float | None = None
    first_byte: float | None = None  # first binary frame after audio_start
    audio_end: float | None = None
    interrupted: bool | None = None
    reply_text: str | None = None
    timed_out: bool = False

    @property
    def v2v(self) -> float | None:
        if self.first_byte is None or self.speech_end is None:
            return None
        return self.first_byte - self.speech_end

    @property
    def understood(self) -> bool:
        return bool(self.reply_text) and self.clip.expect.lower() in self.reply_text.lower()


class QuestionCaller:
    """An ``upvoot.dial.AudioSource`` for ``upvoot.dial.Call``: silence until the greeting's
    ``audio_end``; then, repeatedly, ``pause`` seconds (+- ``jitter``) of
    silence, one question clip (cycling through ``clips`` from ``first``),
    and silence until the ``audio_end`` of the reply (the first agent burst
    that starts after the question began). Stops asking after
    ``max_turns`` questions or ``ask_until`` seconds, then hangs up once the
    last reply has played (or after ``reply_timeout`` without a reply)."""

    def __init__(
        self,
        clips: Sequence[Clip],
        call_no: int = 0,
        max_turns: int = 5,
        ask_until: float = 1e9,
        pause: float = 1.0,
        jitter: float = 0.0,
        first: int = 0,
        reply_timeout: float = 20.0,
        greeting_timeout: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.clips = list(clips)
        self.call_no = call_no
        self.max_turns = max_turns
        self.ask_until = ask_until
        self.pause = pause
        self.jitter = jitter
        self.next_clip = first
        self.reply_timeout = reply_timeout
        self.greeting_timeout = greeting_timeout
        self.rng = random.Random(seed)
        self.turns: list[TurnTiming] = []
        self.opened_wall: float | None = None  # time.time() at the open
        self.hung_up = False
        self.note: str | None = None  # why we stopped early
        self._state = "greeting"
        self._next_at = 0.0
        self._pos = 0
        self._reply_burst: int | None = None

    # upvoot.dial.AudioSource
    def frame(self, call: Call, t: float) -> bytes:
        if self.opened_wall is None:
            self.opened_wall = time.time() - t
        handler = getattr(self, "_" + self._state)
        return handler(call, t)

    def _greeting(self, call: Call, t: float) -> bytes:
        bursts = call.result.bursts
        if bursts and bursts[0].end is not None:
            self._pause_from(bursts[0].end)
        elif t > self.greeting_timeout:
            self._stop(call, "no greeting")
        return SILENT_FRAME

    def _pause_from(self, t: float) -> None:
        self._next_at = t + max(0.0, self.pause + self.rng.uniform(-self.jitter, self.jitter))
        self._state = "pausing"

    def _pausing(self, call: Call, t: float) -> bytes:
        if t < self._next_at:
            return SILENT_FRAME
        if len(self.turns) >= self.max_turns or t >= self.ask_until:
            self._stop(call, None)
            return SILENT_FRAME
        clip = self.clips[self.next_clip % len(self.clips)]
        self.next_clip += 1
        self.turns.append(TurnTiming(self.call_no, len(self.turns), clip, asked_at=t))
        self._pos = 0
        self._state = "talking"
        return self._talking(call, t)

    def _talking(self, call: Call, t: float) -> bytes:
        turn = self.turns[-1]
        clip = turn.clip
        start, end = self._pos, self._pos + FRAME_BYTES
        if start <= clip.speech_end < end or (clip.speech_end == end and end == len(clip.pcm)):
            turn.speech_end = t + audio.duration(clip.speech_end - start)
        if start <= clip.vad_end - 1 < end:
            turn.vad_end = t + audio.duration(clip.vad_end - start)
        chunk = clip.pcm[start:end]
        self._pos = end
        if self._pos >= len(clip.pcm):
            self._reply_burst = None
            self._state = "waiting"
        return chunk.ljust(FRAME_BYTES, b"\x00")

    def _waiting(self, call: Call, t: float) -> bytes:
        turn = self.turns[-1]
        bursts = call.result.bursts
        if self._reply_burst is None:
            for i, b in enumerate(bursts):
                # the first burst begun since the question began: the reply (a
                # burst cannot start otherwise while the caller speaks); not
                # "after the clip's speech end", which a recording's quiet tail
                # can put after the reply's start (the reply was then missed and
                # the next prompt, 6 s later, taken for it)
                if b.start > turn.asked_at:
                    self._reply_burst = i
                    break
        if self._reply_burst is None:
            if t - (turn.speech_end or turn.asked_at) > self.reply_timeout:
                turn.timed_out = True
                self._pause_from(t)
            return SILENT_FRAME
        burst = bursts[self._reply_burst]
        turn.audio_start = burst.start
        if burst.frames:
            turn.first_byte = burst.frames[0][0]
        if burst.end is not None:
            turn.audio_end = burst.end
            turn.interrupted = burst.interrupted
            turn.reply_text = agent_text_at(call.result, burst.end)
            self._pause_from(burst.end)
        elif t - burst.start > self.reply_timeout + 30:
            turn.timed_out = True
            self._pause_from(t)
        return SILENT_FRAME

    def _done(self, call: Call, t: float) -> bytes:
        return SILENT_FRAME

    def _stop(self, call: Call, note: str | None) -> None:
        self.note = note
        self._state = "done"
        if not self.hung_up:
            self.hung_up = True
            call.clock.callLater(0, call.hangup, "done")


def playback_gaps(results: Sequence[DialResult], rate: int = audio.RATE, tolerance: float = 0.002) -> dict:
    """The agent's audio as a phone without a jitter buffer would play it:
    each frame as soon as it has arrived and the one before it has played.
    A gap is a frame arriving after the audio before it ran out, inside one
    reply (``audio_start`` .. ``audio_end``); returns the number of replies,
    of gaps, their total and the longest (seconds)."""
    replies, gaps = 0, []
    for res in results:
        for burst in res.bursts:
            if not burst.frames:
                continue
            replies += 1
            playing_until = None
            for arrived, size in burst.frames:
                if playing_until is not None and arrived > playing_until + tolerance:
                    gaps.append(arrived - playing_until)
                playing_until = max(arrived, playing_until or arrived) + size / (2 * rate)
    return {"replies": replies, "gaps": len(gaps), "total": sum(gaps), "longest": max(gaps, default=0.0)}


def agent_text_at(result: DialResult, t: float) -> str | None:
    for mt, msg in result.messages:
        if mt >= t - 1e-6 and isinstance(msg, dict) and msg.get("type") == "transcript" and msg.get("role") == "agent":
            return msg.get("text")
    return None


# ---- running calls -------------------------------------------------------------------------------


async def run_calls(
    reactor: Any,
    urls: Sequence[str],
    sources: Sequence[QuestionCaller],
    max_seconds: float,
    ramp: float = 0.0,
    connect_timeout: float = 10.0,
    provider: str = "raw",
    sample_rate: int | None = None,
) -> list[DialResult]:
    """Place one call per (url, source), the starts spread over ``ramp``
    seconds. Every call hangs up by itself when its
    caller is done, at ``max_seconds`` at the latest; a watchdog fails what
    is left after that plus the connect timeout and a grace. ``provider``
    (and ``sample_rate``): the framing the calls speak (``upvoot.dial``)."""
    calls: list[Call] = []

    def place(i: int) -> defer.Deferred[DialResult]:
        options = DialOptions(urls[i], max_seconds=max_seconds, connect_timeout=connect_timeout, provider=provider,
                              sample_rate=sample_rate)
        call = start_call(reactor, options, source=sources[i])
        calls.append(call)
        return call.done

    def watchdog() -> None:
        for call in calls:
            if not call.done.called:
                call.failed("watchdog: the call did not end in time")

    pending = [task.deferLater(reactor, ramp * i / max(1, len(urls)), place, i) for i in range(len(urls))]
    limit = reactor.callLater(ramp + max_seconds + connect_timeout + 15.0, watchdog)
    outcomes = await defer.DeferredList(pending, consumeErrors=True)
    if limit.active():
        limit.cancel()
    return [r if ok else DialResult(url=urls[i], error=str(r)) for i, (ok, r) in enumerate(outcomes)]


def react(fn: Any) -> Any:
    """Run ``await fn(reactor)`` on the reactor (once per process) and return its result."""
    box: list = []

    async def go(reactor: Any) -> None:
        box.append(await fn(reactor))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    return box[0]


# ---- the rest of the machine -----------------------------------------------------------------------


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat, all cores)."""
    import os

    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """CPU used by processes other than the daemon and this one, between
    ``start()`` and ``stop()`` (the machine is shared: anything else running
    skews latency figures, so the benches report it)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def _sample(self) -> tuple[float, float, float, float]:
        server = cpu_seconds(self.pid) if self.pid else 0.0
        return time.monotonic(), machine_cpu_seconds(), server, own_cpu_seconds()

    def start(self) -> None:
        self._t0 = self._sample()

    def stop(self) -> dict:
        t1 = self._sample()
        wall, machine, server, own = (b - a for a, b in zip(self._t0, t1))
        wall = max(wall, 1e-6)
        return {"wall": wall, "server": 100 * server / wall, "own": 100 * own / wall,
                "others": max(0.0, 100 * (machine - server - own) / wall), "machine": 100 * machine / wall}


def wait_quiet(pid: int | None, max_wait: float = 45.0, below: float = 25.0, window: float = 1.0) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until other processes use less than
    ``below`` % of one core over ``window``; returns (waited, last %)."""
    t0 = time.monotonic()
    load = OtherLoad(pid)
    while True:
        load.start()
        time.sleep(window)
        others = load.stop()["others"]
        if others < below or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, others


# ---- the daemon and its call records ---------------------------------------------------------


@contextlib.contextmanager
def managed_daemon(keys: int = 1, points: int = 1000, edit: Any = None, **ini_overrides: str) -> Iterator[tuple[Any, list[str]]]:
    """``twistd -n upvoot`` with the shipped etc/upvoot.ini on a free
    loopback port in a temporary directory; yields (Daemon, keys).
    ``edit``: a function of the ini text (e.g. to set agent options)."""
    from tests.daemon import Daemon, shipped_ini

    with tempfile.TemporaryDirectory(prefix="upvoot-bench-") as tmp:
        ini = shipped_ini(**ini_overrides)
        daemon = Daemon(Path(tmp), edit(ini) if edit is not None else ini)
        try:
            t0 = time.monotonic()
            daemon.start(timeout=120)
            print(f"daemon: pid {daemon.proc.pid}, ws://127.0.0.1:{daemon.port}, ready in {time.monotonic() - t0:.1f} s "
                  f"(shipped etc/upvoot.ini, state in {tmp})", flush=True)
            made = [daemon.cli("keys", "create", "--agent", "demo", "--account", "bench") for _ in range(keys)]
            daemon.cli("points", "add", "bench", str(points))
            yield daemon, made
        finally:
            daemon.stop()


def cli_json(config: Path | str, *args: str) -> Any:
    from tests.daemon import upvoot_cli

    return json.loads(upvoot_cli(Path(config), *args, "--json"))


def call_record(config: Path | str, key: str, opened_wall: float, wait: float = 15.0) -> dict | None:
    """The settled record of the call made with ``key`` that opened at
    ``opened_wall`` (time.time()), read with ``upvoot calls show ID --json``."""
    prefix = key[:12]
    deadline = time.monotonic() + wait
    while True:
        listed = cli_json(config, "calls", "list", "--limit", "200")
        mine = [c for c in listed if c["key_prefix"] == prefix and abs(c["started_at"] - opened_wall) < 5.0]
        mine.sort(key=lambda c: abs(c["started_at"] - opened_wall))
        if mine and mine[0]["state"] == "settled":
            return cli_json(config, "calls", "show", mine[0]["call_id"])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.3)


def pair_latencies(turns: Sequence[TurnTiming], record: dict | None, apology: str | None = None) -> list[tuple[TurnTiming, dict | None]]:
    """Client turns that got a reply, each with the server's latency split of
    the same turn (the call record's metadata.latencies, in order). The server
    records a split only for replies to a transcribed turn, so an apology
    (an engine failure) has none."""
    answered = [t for t in turns if t.first_byte is not None]
    server = list((record or {}).get("metadata", {}).get("latencies", []))
    out: list[tuple[TurnTiming, dict | None]] = []
    for t in answered:
        if apology and t.reply_text and t.reply_text.strip() == apology.strip():
            out.append((t, None))
        else:
            out.append((t, server.pop(0) if server else None))
    return out


def ms(seconds: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if seconds is None else f"{seconds * 1000:{width}.0f}"
