"""Load generator: N simulated phone calls against a running UpVoot daemon.

    python bench/load.py --url ws://127.0.0.1:8080/voice/KEY --calls 20 --seconds 60 --pid PID

Each call is a ``upvoot.dial`` call (same client, same bookkeeping) whose
caller is ``BenchCaller``: a phone line that sends 20 ms frames in real time,
mostly silence, and

- *talks* (the ``--play`` WAV, or a generated voice-like buzz) when the agent
  has been quiet for ``--talk-after`` seconds, so the agent has turns to
  answer and the line never hits the silence timeout;
- *barges in* (the same audio) into every ``--barge-every``-th agent
  utterance, ``--barge-after`` seconds after its first frame arrived.

Measured per call, from arrival times on the reactor clock:

greeting latency   the upgrade completing (onOpen) -> the first agent frame.
frame jitter       inside each audio_start..audio_end burst,
                   |arrival gap - duration of the previous frame|, skipping
                   the first ``--jitter-skip-ms`` of each burst (the server's
                   pacing lead arrives at once by design).
barge-in latency   our first loud frame -> the last agent frame received
                   before ``audio_end`` with ``"interrupted": true``;
                   "heard" adds the audio still queued at the phone then
                   (frames play back to back from their arrival); "audio_end"
                   is when the interruption was announced.
server CPU         with ``--pid``: utime+stime from /proc/PID/stat (all the
                   daemon's threads) before and after, per call-minute of
                   open calls and as % of one core per call.

A call is *held* when it stayed open until we hung up at ``--seconds``;
otherwise it was ended by the server (a close frame: silence timeout, max
turns ...), dropped (no close handshake), refused (HTTP status), failed (no
connection) or interrupted (Ctrl-C). The
run always ends by itself: every call hangs up at ``--seconds``, connects
and closes have timeouts, and a watchdog ends what is left. Exit code 0 when
every call was held, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from typing import Any, Iterable, Sequence

import attrs
import numpy as np
from twisted.internet import defer, task

from upvoot import audio
from upvoot.audio import FRAME_BYTES
from upvoot.dial import SILENT_FRAME, Burst, Call, DialOptions, DialResult, start_call

CLOSE_GRACE = 15.0  # connect + close timeouts on top of --seconds before the watchdog


# ---- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


def frame_jitter(bursts: Iterable[Burst], skip: float = 0.2) -> list[float]:
    """|arrival gap - previous frame's duration| for every frame of every
    burst whose audio starts at least ``skip`` seconds into its burst."""
    out = []
    for burst in bursts:
        offset = 0.0
        previous: tuple[float, int] | None = None
        for t, n in burst.frames:
            if previous is not None and offset >= skip:
                out.append(abs((t - previous[0]) - audio.duration(previous[1])))
            offset += audio.duration(n)
            previous = (t, n)
    return out


def heard_until(frames: Sequence[tuple[float, int]]) -> float:
    """When the last of ``frames`` finishes playing at a phone that plays
    each frame on arrival or right after the one before."""
    end = 0.0
    for t, n in frames:
        end = max(end, t) + audio.duration(n)
    return end


@attrs.frozen
class BargeIn:
    onset: float
    #: seconds from the onset; None when the agent's audio_end came with
    #: "interrupted": false (or never)
    last_frame: float | None
    heard: float | None
    audio_end: float | None


def barge_ins(bursts: Sequence[Burst], onsets: Iterable[float]) -> list[BargeIn]:
    """Pair each barge-in onset with the burst it fell into."""
    out = []
    for onset in onsets:
        burst = next((b for b in bursts if b.start <= onset and (b.end is None or onset < b.end)), None)
        if burst is None or not burst.interrupted or not burst.frames:
            out.append(BargeIn(onset, None, None, None))
            continue
        end = None if burst.end is None else burst.end - onset
        out.append(BargeIn(onset, burst.frames[-1][0] - onset, heard_until(burst.frames) - onset, end))
    return out


def parse_proc_stat(text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat. The
    command name may hold spaces and parentheses: fields are counted from
    the last ')'. utime and stime are fields 14 and 15 of proc(5)."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields[0] is field 3 (state)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return parse_proc_stat(f.read()) / os.sysconf("SC_CLK_TCK")


# ---- the simulated caller --------------------------------------------------------------------------


def voice_like(seconds: float = 1.5, level_dbfs: float = -18.0, f0: float = 130.0, seed: int = 0) -> bytes:
    """A voiced buzz with intonation and syllable-rate loudness changes:
    what energy and WebRTC VADs take for speech (no words for an STT)."""
    n = int(seconds * audio.RATE)
    t = np.arange(n) / audio.RATE
    pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * 1.3 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / audio.RATE
    x = sum(np.sin(k * phase) / k for k in range(1, int(3800 / f0)))
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2)
    x = x + 0.02 * np.random.default_rng(seed).standard_normal(n)
    x = x / np.sqrt(np.mean(x * x)) * 10 ** (level_dbfs / 20.0)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return audio.from_float32(x * fade)


class BenchCaller:
    """A caller that talks when the agent is quiet and barges into every
    ``barge_every``-th agent utterance (0: never). ``onsets`` and ``talks``
    hold when each started (seconds since the open)."""

    def __init__(
        self,
        speech: bytes,
        barge_every: int = 2,
        barge_after: float = 0.5,
        talk_after: float = 3.0,
        wait_for_answer: float = 8.0,
    ) -> None:
        self._speech = speech
        self._barge_every = barge_every
        self._barge_after = barge_after
        self._talk_after = talk_after
        self._wait_for_answer = wait_for_answer
        self._pos: int | None = None
        self._quiet_since = 0.0
        self._barged: set[int] = set()
        self.onsets: list[float] = []
        self.talks: list[float] = []

    def frame(self, call: Call, t: float) -> bytes:
        if self._pos is not None:
            return self._next_chunk(t)
        bursts = call.result.bursts
        if call.agent_speaking:
            index = len(bursts) - 1
            burst = bursts[-1]
            if (
                self._barge_every
                and index % self._barge_every == 0
                and index not in self._barged
                and burst.frames
                and t - burst.frames[0][0] >= self._barge_after
            ):
                self._barged.add(index)
                self.onsets.append(t)
                return self._start(t)
            return SILENT_FRAME
        last_end = max((b.end for b in bursts if b.end is not None), default=0.0)
        quiet_since = max(last_end, self._quiet_since)
        wait = self._wait_for_answer if self._agent_working(call, quiet_since) else self._talk_after
        if t - quiet_since >= wait:
            self.talks.append(t)
            return self._start(t)
        return SILENT_FRAME

    def _agent_working(self, call: Call, since: float) -> bool:
        """A turn_start came after ``since`` and no audio yet: the agent is thinking."""
        for t, msg in reversed(call.result.messages):
            if t < since:
                return False
            if isinstance(msg, dict) and msg.get("type") == "turn_start":
                return True
        return False

    def _start(self, t: float) -> bytes:
        self._pos = 0
        return self._next_chunk(t)

    def _next_chunk(self, t: float) -> bytes:
        assert self._pos is not None
        chunk = self._speech[self._pos : self._pos + FRAME_BYTES]
        self._pos += FRAME_BYTES
        if self._pos >= len(self._speech):
            self._pos = None
            self._quiet_since = t + audio.duration(FRAME_BYTES)
        return chunk.ljust(FRAME_BYTES, b"\x00")


# ---- the run -------------------------------------------------------------------------------------------


@attrs.define
class Report:
    label: str
    calls: int
    seconds: float
    results: list[DialResult] = attrs.field(factory=list)
    callers: list[BenchCaller] = attrs.field(factory=list)
    wall: float = 0.0
    jitter_skip: float = 0.2
    pid: int | None = None
    server_cpu: float | None = None
    own_cpu: float = 0.0

    # ---- outcome counts
    def count(self, kind: str) -> int:
        return sum(1 for r in self.results if outcome(r) == kind)

    @property
    def call_seconds(self) -> float:
        return sum(r.duration for r in self.results if r.opened)

    def greeting_latencies(self) -> list[float]:
        return [r.first_audio_at for r in self.results if r.first_audio_at is not None]

    def jitter(self) -> list[float]:
        return [j for r in self.results for j in frame_jitter(r.bursts, self.jitter_skip)]

    def barge_ins(self) -> list[BargeIn]:
        return [b for r, c in zip(self.results, self.callers) for b in barge_ins(r.bursts, c.onsets)]

    def figures(self) -> dict:
        b = self.barge_ins()
        ok = [x for x in b if x.last_frame is not None]
        fig: dict[str, Any] = {
            "calls": self.calls,
            "seconds": self.seconds,
            "outcomes": {k: self.count(k) for k in OUTCOMES},
            "greeting_ms": _stats(self.greeting_latencies()),
            "jitter_ms": _stats(self.jitter()),
            "jitter_skip_ms": round(self.jitter_skip * 1000),
            "barge_in_last_frame_ms": _stats([x.last_frame for x in ok]),  # type: ignore[misc]
            "barge_in_heard_ms": _stats([x.heard for x in ok]),  # type: ignore[misc]
            "barge_in_audio_end_ms": _stats([x.audio_end for x in ok]),  # type: ignore[misc]
            "barge_ins_tried": len(b),
            "barge_ins_interrupted": len(ok),
            "stray_frames": sum(r.stray_frames for r in self.results),
            "call_minutes": round(self.call_seconds / 60.0, 3),
            "wall_seconds": round(self.wall, 3),
            "load_generator_cpu_percent": round(100.0 * self.own_cpu / self.wall, 1) if self.wall else None,
        }
        if self.server_cpu is not None and self.call_seconds > 0:
            fig["server_cpu"] = {
                "pid": self.pid,
                "cpu_seconds": round(self.server_cpu, 3),
                "cpu_seconds_per_call_minute": round(self.server_cpu / (self.call_seconds / 60.0), 4),
                "core_percent_per_call": round(100.0 * self.server_cpu / self.call_seconds, 3),
                "core_percent_total": round(100.0 * self.server_cpu / self.wall, 1) if self.wall else None,
            }
        return fig


OUTCOMES = ("held", "ended by server", "dropped", "interrupted", "refused", "failed")


def outcome(r: DialResult) -> str:
    if r.refused is not None:
        return "refused"
    if r.error or not r.opened:
        return "failed"
    if r.closed_by == "client" and r.hangup_reason == "max-seconds":
        return "held"
    if r.closed_by == "server":
        return "ended by server"
    if r.closed_by == "client":
        return "interrupted"  # we hung up early (Ctrl-C)
    return "dropped"


def _stats(seconds: Sequence[float]) -> dict:
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50": _round(percentile(ms, 50)),
        "p99": _round(percentile(ms, 99)),
        "max": _round(max(ms) if ms else None),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def call_urls(url: str, keys: Sequence[str], calls: int) -> list[str]:
    """One URL per call: with keys, ``{key}`` in ``url`` is replaced (or the
    key appended), round-robin; without, every call uses ``url``."""
    if not keys:
        return [url] * calls
    if "{key}" in url:
        return [url.replace("{key}", keys[i % len(keys)]) for i in range(calls)]
    base = url if url.endswith("/") else url + "/"
    return [base + keys[i % len(keys)] for i in range(calls)]


def redact(url: str) -> str:
    """The URL with the API key shortened, for printing."""
    head, sep, key = url.rpartition("/voice/")
    if not sep or not key or key == "{key}":
        return url
    return f"{head}{sep}{key[:6]}…"


async def run_load(reactor: Any, args: argparse.Namespace, speech: bytes, keys: Sequence[str]) -> Report:
    urls = call_urls(args.url, keys, args.calls)
    label = redact(args.url) if not keys else f"{args.url} ({len(keys)} keys)"
    report = Report(label=label, calls=args.calls, seconds=args.seconds, jitter_skip=args.jitter_skip_ms / 1000.0, pid=args.pid)
    report.callers = [BenchCaller(speech, args.barge_every, args.barge_after, args.talk_after) for _ in urls]
    calls: list[Call] = []
    pending: list[defer.Deferred[DialResult]] = []
    own_start = _own_cpu()
    cpu_start = cpu_seconds(args.pid) if args.pid else None
    wall_start = reactor.seconds()

    def place(i: int) -> defer.Deferred[DialResult]:
        options = DialOptions(urls[i], max_seconds=args.seconds, connect_timeout=args.connect_timeout)
        call = start_call(reactor, options, source=report.callers[i])
        calls.append(call)
        return call.done

    for i in range(args.calls):
        delay = args.ramp * i / args.calls
        pending.append(task.deferLater(reactor, delay, place, i))

    def watchdog() -> None:
        for call in calls:
            if not call.done.called:
                call.failed("watchdog: the call did not end in time")

    limit = reactor.callLater(args.ramp + args.seconds + args.connect_timeout + CLOSE_GRACE, watchdog)

    def on_shutdown() -> defer.Deferred[Any] | None:  # Ctrl-C: hang up everything, report
        for call in calls:
            if call.result.opened:
                call.hangup("interrupted")
            else:
                call.failed("interrupted")
        for d in pending:
            if not d.called:
                d.cancel()
        ended = defer.DeferredList(pending, consumeErrors=True)
        return ended.addTimeout(3, reactor).addBoth(lambda _: None)

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    outcomes = await defer.DeferredList(pending, consumeErrors=True)
    if limit.active():
        limit.cancel()
    reactor.removeSystemEventTrigger(trigger)
    report.wall = reactor.seconds() - wall_start
    report.own_cpu = _own_cpu() - own_start
    if args.pid:
        try:
            report.server_cpu = cpu_seconds(args.pid) - cpu_start  # type: ignore[operator]
        except OSError:
            report.server_cpu = None  # the daemon went away
    # calls cancelled before they were placed have no result: count them as failed
    report.results = [r if ok else _not_placed(args) for ok, r in outcomes]
    return report


def _not_placed(args: argparse.Namespace) -> DialResult:
    return DialResult(url=args.url, error="not placed (interrupted)")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- output -------------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    f = report.figures()
    o = f["outcomes"]
    lines = [
        f"UpVoot load: {report.calls} calls x {report.seconds:g} s against {report.label}",
        f"calls: attempted {report.calls}, held {o['held']}, ended by server {o['ended by server']},"
        f" dropped {o['dropped']}, refused {o['refused']}, failed {o['failed']}"
        + (f", interrupted {o['interrupted']}" if o["interrupted"] else ""),
        "",
        f"{'':34}{'n':>7}{'p50':>10}{'p99':>10}{'max':>10}",
    ]

    def row(name: str, s: dict) -> str:
        cells = "".join(f"{'-' if s[k] is None else format(s[k], '.1f'):>10}" for k in ("p50", "p99", "max"))
        return f"{name:34}{s['n']:>7}{cells}"

    lines.append(row("greeting latency (ms)", f["greeting_ms"]))
    lines.append(row(f"frame jitter (ms, after {f['jitter_skip_ms']} ms)", f["jitter_ms"]))
    lines.append(row("barge-in to last frame (ms)", f["barge_in_last_frame_ms"]))
    lines.append(row("barge-in to silence heard (ms)", f["barge_in_heard_ms"]))
    lines.append(row("barge-in to audio_end (ms)", f["barge_in_audio_end_ms"]))
    lines.append("")
    lines.append(f"barge-ins: {f['barge_ins_interrupted']} of {f['barge_ins_tried']} tries interrupted the agent")
    if f["stray_frames"]:
        lines.append(f"protocol: {f['stray_frames']} agent frames outside audio_start..audio_end")
    cpu = f.get("server_cpu")
    if cpu:
        lines.append(
            f"server CPU (pid {cpu['pid']}): {cpu['cpu_seconds']:.1f} s over {f['call_minutes']:.1f} call-minutes ="
            f" {cpu['cpu_seconds_per_call_minute']:.3f} CPU-s per call-minute,"
            f" {cpu['core_percent_per_call']:.2f} % of a core per call"
            f" ({cpu['core_percent_total']:.0f} % of a core in total)"
        )
    elif report.pid:
        lines.append(f"server CPU (pid {report.pid}): not measured (the process went away or no call opened)")
    else:
        lines.append("server CPU: not measured (give --pid PID)")
    lines.append(f"load generator CPU: {f['load_generator_cpu_percent']} % of a core over {f['wall_seconds']:.1f} s")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/voice/KEY (with --keys-file: .../voice/ or ...{key}...)")
    p.add_argument("--keys-file", help="API keys, one a line; calls use them round-robin")
    p.add_argument("--calls", type=int, default=10, help="concurrent calls (default 10)")
    p.add_argument("--seconds", type=_positive, default=60.0, help="length of every call (default 60)")
    p.add_argument("--ramp", type=_non_negative, default=2.0, help="spread the call starts over S seconds (default 2)")
    p.add_argument("--play", metavar="FILE.wav", help="caller speech (16-bit WAV); default: a generated voice-like buzz")
    p.add_argument("--barge-every", type=int, default=2, help="barge into every Nth agent utterance, 0: never (default 2)")
    p.add_argument("--barge-after", type=_non_negative, default=0.5, help="seconds into an utterance (default 0.5)")
    p.add_argument("--talk-after", type=_positive, default=3.0, help="talk after S seconds of agent silence (default 3)")
    p.add_argument("--jitter-skip-ms", type=_non_negative, default=200.0, help="ignore the start of each burst (default 200)")
    p.add_argument("--pid", type=int, help="the daemon's process id, to measure its CPU")
    p.add_argument("--connect-timeout", type=_positive, default=10.0)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        speech = audio.read_wav(args.play) if args.play else voice_like()
        keys = []
        if args.keys_file:
            with open(args.keys_file) as f:
                keys = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"{args.keys_file}: no keys")
        urls = call_urls(args.url, keys, 1)
        if not urls[0].startswith(("ws://", "wss://")):
            raise ValueError(f"not a ws:// or wss:// URL: {args.url}")
        if args.calls < 1:
            raise ValueError("--calls must be at least 1")
        if args.pid:
            cpu_seconds(args.pid)
    except FileNotFoundError as e:
        print(f"error: no such file: {e.filename}", file=sys.stderr)
        return 2
    except (OSError, ValueError, EOFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not speech:
        print("error: the caller audio is empty", file=sys.stderr)
        return 2
    if not args.play:
        print(
            "note: no --play: the caller sends a voice-like buzz with no words; a speech-to-text agent"
            " may hear no turns and end calls for silence. Use --play speech.wav for real figures.",
            file=sys.stderr,
        )

    async def go(reactor: Any) -> None:
        report = await run_load(reactor, args, speech, keys)
        print(json.dumps(report.figures(), indent=2) if args.json else format_report(report))
        raise SystemExit(0 if report.count("held") == report.calls else 1)

    try:
        task.react(go)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
