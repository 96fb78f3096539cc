"""Soak: many calls held for many minutes; do memory, fds and timers stay flat?

    python bench/soak.py [--calls 100] [--minutes 10] [--talkers 5]

Starts ``twistd -n upvoot`` on a free loopback port in a temporary directory
(``tests.daemon.Daemon`` with ``tests.daemon.shipped_ini``: the shipped
etc/upvoot.ini, ``max_calls`` raised to at least 100, plus an ``[agent:soak]``
section: the demo agent with ``silence_timeout = 20m``, ``max_duration =
30m``, ``max_turns = 10000`` and no silence prompt, so that silent calls are
not ended after 10 s). Then places ``--calls`` calls at once (starts spread
over ``--ramp`` seconds; a refused call is retried after 5 s, at most
``--retries`` times, during the ramp and the minute after it), each the
Autobahn client of ``upvoot dial`` (``upvoot.dial.start_call``) sending
20 ms frames in real time:

- most calls send silence only, like an open line nobody talks on;
- ``--talkers`` of them (spread evenly) ask one of the demo agent's questions
  (spoken by the shipped piper voice, ``bench/_common.QuestionCaller``)
  30-60 s after each reply has ended (``--ask-every`` +- ``--ask-jitter``),
  so turns happen throughout: transcription, the brain, synthesis, playout.

Every call hangs up ``--minutes`` after the first was placed (plus 5 s).
Every ``--sample`` seconds (30) the daemon's admin listener is scraped
(GET /metrics): ``process_resident_memory_bytes``, ``process_open_fds``,
``upvoot_reactor_delayed_calls``, ``upvoot_calls_active`` and the reactor lag
histogram; the daemon's CPU comes from /proc/PID/stat. One row per minute is
printed as the run goes (the sample at the end of the minute), then one row
after every call has hung up, then the verdict.

**Flat**, from the end of minute 2 (the baseline; minute 1 with
``--minutes 2``) to the end of the last minute, with the same number of calls
active at every minute end:

- RSS: the last minute's value is less than 5 % above the baseline;
- open fds: every minute's value within +-max(2 % of the baseline, 5);
- reactor delayed calls: every minute's value within +-max(2 % of the
  baseline, 10). The absolute slack is there because a talking call holds a
  few short-lived timers (interim decodes, endpointing, playout) and up to
  ``--talkers`` of them may be mid-turn at a sample.

Every loop is bounded: the samples are a fixed number, each scrape has a
10 s timeout, every call hangs up at the end of the window and a watchdog
fails what is left a minute later. Exit code 0 when flat and every call was
held, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from bench._common import QuestionCaller, machine_cpu_seconds, own_cpu_seconds, question_clips, react  # noqa: E402
from bench.load import OUTCOMES, cpu_seconds, outcome  # noqa: E402
from upvoot.dial import Call, DialOptions, DialResult, start_call  # noqa: E402
from upvoot.daemon.service import LagMonitor  # noqa: E402

AGENT = "soak"
SOAK_AGENT_OPTIONS = {
    "silence_timeout": "20m",
    "silence_prompt": "",
    "max_duration": "30m",
    "max_turns": "10000",
}
RETRY_AFTER = 5.0  # the daemon's Retry-After
TAIL = 5.0  # calls hang up this long after the last sample
SCRAPE_TIMEOUT = 10.0
RSS_GROWTH = 5.0  # %
FDS_BAND = (2.0, 5)  # (% of the baseline, absolute): the larger applies
DELAYED_BAND = (2.0, 10)


# ---- the daemon's configuration ----------------------------------------------------------------


def agent_copy(ini_text: str, source: str, name: str, overrides: dict[str, str]) -> str:
    """The ``[agent:SOURCE]`` section of ``ini_text`` as ``[agent:NAME]``, with
    ``overrides`` replacing its options (continuation lines included)."""
    out: list[str] = []
    inside = skipping = False
    for line in ini_text.splitlines():
        if line.startswith("["):
            if inside:
                break
            inside = line.strip() == f"[agent:{source}]"
            if inside:
                out.append(f"[agent:{name}]")
            continue
        if not inside:
            continue
        if line[:1] in (" ", "\t") and line.strip():
            if not skipping:
                out.append(line)
            continue
        key = line.split("=", 1)[0].strip()
        skipping = "=" in line and not line.startswith((";", "#")) and key in overrides
        if not skipping:
            out.append(line)
    if not out:
        raise ValueError(f"no [agent:{source}] section")
    out += [f"{k} = {v}" for k, v in overrides.items()]
    return "\n".join(out) + "\n"


def soak_ini(calls: int, admin_port: int) -> str:
    from tests.daemon import shipped_ini

    text = shipped_ini(max_calls=str(max(100, calls + 10)), admin_listen=f"tcp:{admin_port}:interface=127.0.0.1")
    return text + "\n" + agent_copy(text, "demo", AGENT, SOAK_AGENT_OPTIONS)


# ---- samples ------------------------------------------------------------------------------------------


@attrs.define
class Sample:
    t: float  # seconds since the first call was placed
    error: str | None = None
    rss: float | None = None
    fds: float | None = None
    delayed: float | None = None
    calls_active: float | None = None
    lag_sum: float = 0.0
    lag_count: float = 0.0
    lag_late: float = 0.0  # lag monitor ticks more than 50 ms late
    refusals: float = 0.0  # upvoot_handshake_refusals_total, all statuses
    server_cpu: float = 0.0  # cumulative CPU seconds
    own_cpu: float = 0.0
    machine_cpu: float = 0.0
    wall: float = 0.0  # time.monotonic()
    client_open: int = 0
    turns_asked: int = 0
    turns_answered: int = 0
    gen_lag_worst: float = 0.0  # the load generator's own reactor, since the previous sample


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def fill(sample: Sample, m: dict[tuple[str, frozenset], float]) -> None:
    def get(name: str, **labels: str) -> float | None:
        return m.get((name, frozenset(labels.items())))

    sample.rss = get("process_resident_memory_bytes")
    sample.fds = get("process_open_fds")
    sample.delayed = get("upvoot_reactor_delayed_calls")
    sample.calls_active = get("upvoot_calls_active")
    sample.lag_sum = get("upvoot_reactor_lag_seconds_sum") or 0.0
    sample.lag_count = get("upvoot_reactor_lag_seconds_count") or 0.0
    sample.lag_late = sample.lag_count - (get("upvoot_reactor_lag_seconds_bucket", le="0.05") or 0.0)
    sample.refusals = sum(v for (name, _), v in m.items() if name == "upvoot_handshake_refusals_total")


# ---- the run ---------------------------------------------------------------------------------------------


@attrs.define
class Soak:
    args: argparse.Namespace
    daemon: Any
    url: str
    admin: str
    clips: list
    samples: list[Sample] = attrs.field(factory=list)
    idle: Sample | None = None
    after: Sample | None = None
    results: list[DialResult | None] = attrs.field(factory=list)
    sources: list[Any] = attrs.field(factory=list)
    refused: dict[int, int] = attrs.field(factory=dict)  # status -> refusals seen by the callers (retried or not)
    retried: int = 0
    live: set = attrs.field(factory=set)
    gen_worst: float = 0.0

    def talker(self, i: int) -> bool:
        n, k = self.args.calls, min(self.args.talkers, self.args.calls)
        return k > 0 and i in {round(j * n / k) for j in range(k)}

    def source(self, i: int) -> Any:
        if not self.talker(i):
            return None  # upvoot.dial.PlayThenSilence(b""): silence only
        a = self.args
        return QuestionCaller(self.clips, call_no=i, max_turns=10**6, ask_until=1e9, pause=a.ask_every,
                              jitter=a.ask_jitter, first=i, reply_timeout=20.0, greeting_timeout=60.0, seed=i)

    def turns(self) -> tuple[int, int]:
        asked = answered = 0
        for s in self.sources:
            if isinstance(s, QuestionCaller):
                asked += len(s.turns)
                answered += sum(1 for t in s.turns if t.first_byte is not None)
        return asked, answered


async def scrape(reactor: Any, soak: Soak, t: float) -> Sample:
    from twisted.web.client import Agent, readBody

    sample = Sample(t=t)
    try:
        d = Agent(reactor).request(b"GET", soak.admin.encode("ascii") + b"/metrics")
        d.addCallback(readBody)
        d.addTimeout(SCRAPE_TIMEOUT, reactor)
        body = await d
        fill(sample, parse_metrics(body.decode("utf-8")))
    except Exception as e:  # a failed scrape is a row with an error, not the end of the run
        sample.error = f"{type(e).__name__}: {e}"
    try:
        sample.server_cpu = cpu_seconds(soak.daemon.proc.pid)
    except OSError:
        sample.error = sample.error or "the daemon went away"
    sample.own_cpu = own_cpu_seconds()
    sample.machine_cpu = machine_cpu_seconds()
    sample.wall = time.monotonic()
    sample.client_open = len(soak.live)
    sample.turns_asked, sample.turns_answered = soak.turns()
    sample.gen_lag_worst, soak.gen_worst = soak.gen_worst, 0.0
    return sample


async def run_soak(reactor: Any, soak: Soak) -> Soak:
    args = soak.args
    window = args.minutes * 60.0
    lag = LagMonitor(reactor, on_lag=lambda x: setattr(soak, "gen_worst", max(soak.gen_worst, x)))
    lag.start()
    soak.idle = await scrape(reactor, soak, 0.0)
    print(HEADER, flush=True)
    print(row("idle", soak.idle, None), flush=True)
    t0 = reactor.seconds()
    end = t0 + window + TAIL
    soak.results = [None] * args.calls
    soak.sources = [None] * args.calls
    calls: list[Call] = []

    def attempt(i: int, tries: int) -> defer.Deferred:
        soak.sources[i] = soak.source(i)
        options = DialOptions(soak.url, max_seconds=max(1.0, end - reactor.seconds()), connect_timeout=10.0)
        call = start_call(reactor, options, source=soak.sources[i])
        calls.append(call)
        soak.live.add(call)

        def done(result: DialResult) -> Any:
            soak.live.discard(call)
            soak.results[i] = result
            if result.refused is not None:
                soak.refused[result.refused] = soak.refused.get(result.refused, 0) + 1
                late = reactor.seconds() - t0 > args.ramp + 60.0 or end - reactor.seconds() < 60.0
                if tries < args.retries and not late:
                    soak.retried += 1
                    return task.deferLater(reactor, RETRY_AFTER, attempt, i, tries + 1)
            return result

        return call.done.addCallback(done)

    pending = [task.deferLater(reactor, args.ramp * i / args.calls, attempt, i, 0) for i in range(args.calls)]

    def watchdog() -> None:
        for call in calls:
            if not call.done.called:
                call.failed("watchdog: the call did not end in time")

    limit = reactor.callLater(window + TAIL + 60.0, watchdog)

    n_samples = int(window // args.sample)

    def take(k: int) -> defer.Deferred:
        async def go() -> None:
            s = await scrape(reactor, soak, k * args.sample)
            soak.samples.append(s)
            if (k * args.sample) % 60 == 0:
                minute = int(k * args.sample // 60)
                print(row(str(minute), s, minute_start(soak, minute)), flush=True)

        return defer.Deferred.fromCoroutine(go())

    sampling = [task.deferLater(reactor, k * args.sample, take, k) for k in range(1, n_samples + 1)]
    await defer.DeferredList(sampling, consumeErrors=True)
    await defer.DeferredList(pending, consumeErrors=True)
    if limit.active():
        limit.cancel()
    await task.deferLater(reactor, 10.0, lambda: None)  # settlements, closing handshakes
    soak.after = await scrape(reactor, soak, reactor.seconds() - t0)
    print(row("after", soak.after, soak.samples[-1] if soak.samples else soak.idle), flush=True)
    lag.stop()
    return soak


def minute_start(soak: Soak, minute: int) -> Sample | None:
    """The sample a minute's rates are measured from: the previous minute's."""
    if minute <= 1:
        return soak.idle
    for s in soak.samples:
        if s.t == (minute - 1) * 60:
            return s
    return None


# ---- output ------------------------------------------------------------------------------------------------

HEADER = (f"{'min':>5} {'calls':>5} {'open':>5} {'RSS MiB':>8} {'fds':>5} {'delayed':>7} {'lag ms':>6} "
          f"{'late%':>5} {'srv CPU':>7} {'gen CPU':>7} {'others':>6} {'gen lag':>7} {'turns':>9} {'503s':>5}")


def _n(x: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}{fmt}}"


def row(label: str, s: Sample, prev: Sample | None) -> str:
    if s.error and s.rss is None:
        return f"{label:>5} scrape failed: {s.error}"
    lag_ms = late = srv = gen = others = None
    if prev is not None:
        n = s.lag_count - prev.lag_count
        if n > 0:
            lag_ms = 1000.0 * (s.lag_sum - prev.lag_sum) / n
            late = 100.0 * (s.lag_late - prev.lag_late) / n
        wall = s.wall - prev.wall
        if wall > 0:
            srv = 100.0 * (s.server_cpu - prev.server_cpu) / wall
            gen = 100.0 * (s.own_cpu - prev.own_cpu) / wall
            others = max(0.0, 100.0 * (s.machine_cpu - prev.machine_cpu) / wall - srv - gen)
    turns = f"{s.turns_answered}/{s.turns_asked}"
    return (f"{label:>5} {_n(s.calls_active, '.0f', 5)} {s.client_open:>5} {_n(None if s.rss is None else s.rss / 2**20, '.1f', 8)} "
            f"{_n(s.fds, '.0f', 5)} {_n(s.delayed, '.0f', 7)} {_n(lag_ms, '.1f', 6)} {_n(late, '.1f', 5)} "
            f"{_n(srv, '.0f', 6)}% {_n(gen, '.0f', 6)}% {_n(others, '.0f', 5)}% {1000 * s.gen_lag_worst:6.0f}m "
            f"{turns:>9} {s.refusals:>5.0f}")


LEGEND = """\
min: minute (the row is the sample at its end); calls: upvoot_calls_active; open: calls open at the load
generator; RSS, fds: the daemon's process_resident_memory_bytes and process_open_fds; delayed:
upvoot_reactor_delayed_calls; lag ms: the daemon's mean reactor lag over the minute (50 ms timer),
late%: its ticks over 50 ms late; srv/gen CPU: the daemon's and this script's CPU, % of one core;
others: the rest of the machine; gen lag: the worst lateness of this script's own reactor (ms);
turns: answered/asked by the talking calls so far; 503s: upvoot_handshake_refusals_total so far."""


def minute_rows(soak: Soak) -> dict[int, Sample]:
    return {int(s.t // 60): s for s in soak.samples if s.t % 60 == 0 and s.rss is not None}


def within(value: float, base: float, band: tuple[float, float]) -> bool:
    return abs(value - base) <= max(base * band[0] / 100.0, band[1])


def verdict(soak: Soak) -> tuple[bool, list[str]]:
    minutes = int(soak.args.minutes)
    rows = minute_rows(soak)
    first = 2 if minutes >= 3 else 1
    span = [rows.get(m) for m in range(first, minutes + 1)]
    if minutes < 2 or any(s is None for s in span):
        missing = [m for m in range(first, minutes + 1) if rows.get(m) is None]
        return False, [f"verdict: NO VERDICT (needs minutes {first}..{minutes}; missing or failed samples: {missing})"]
    base, last = span[0], span[-1]
    assert base is not None and last is not None
    lines = []
    actives = [s.calls_active for s in span]  # type: ignore[union-attr]
    same_calls = len(set(actives)) == 1
    rss_growth = 100.0 * (last.rss - base.rss) / base.rss  # type: ignore[operator]
    rss_ok = rss_growth < RSS_GROWTH
    fds = [s.fds for s in span]  # type: ignore[union-attr]
    fds_ok = all(within(x, base.fds, FDS_BAND) for x in fds)  # type: ignore[arg-type]
    delayed = [s.delayed for s in span]  # type: ignore[union-attr]
    delayed_ok = all(within(x, base.delayed, DELAYED_BAND) for x in delayed)  # type: ignore[arg-type]
    flat = rss_ok and fds_ok and delayed_ok and same_calls
    held = sum(1 for r in soak.results if r is not None and outcome(r) == "held")
    lines.append(f"verdict: {'FLAT' if flat else 'NOT FLAT'} from minute {first} to minute {minutes}"
                 f" ({held} of {soak.args.calls} calls held to the end)")
    lines.append(f"  calls active  {'same at every minute end' if same_calls else 'CHANGED'}: "
                 f"{min(actives):.0f}..{max(actives):.0f}")  # type: ignore[type-var]
    lines.append(f"  RSS           {base.rss / 2**20:.1f} -> {last.rss / 2**20:.1f} MiB, {rss_growth:+.1f} %"  # type: ignore[operator]
                 f" (max {max(s.rss for s in span) / 2**20:.1f}); flat: growth < {RSS_GROWTH:g} %"  # type: ignore[union-attr,type-var]
                 f" -> {'ok' if rss_ok else 'FAIL'}")
    lines.append(f"  open fds      {base.fds:.0f} -> {last.fds:.0f} (range {min(fds):.0f}..{max(fds):.0f});"  # type: ignore[type-var]
                 f" flat: within +-max({FDS_BAND[0]:g} %, {FDS_BAND[1]}) of minute {first}"
                 f" -> {'ok' if fds_ok else 'FAIL'}")
    lines.append(f"  delayed calls {base.delayed:.0f} -> {last.delayed:.0f} (range {min(delayed):.0f}..{max(delayed):.0f});"  # type: ignore[type-var]
                 f" flat: within +-max({DELAYED_BAND[0]:g} %, {DELAYED_BAND[1]}) of minute {first}"
                 f" -> {'ok' if delayed_ok else 'FAIL'}")
    return flat, lines


def summary(soak: Soak) -> list[str]:
    results = [r for r in soak.results if r is not None]
    counts = {k: sum(1 for r in results if outcome(r) == k) for k in OUTCOMES}
    lines = [
        f"calls: {soak.args.calls} placed, "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("held", "refused"))
        + (f"; {soak.retried} retries after a refusal" if soak.retried else "")
        + (" (refusals seen: " + ", ".join(f"HTTP {k} x{v}" for k, v in sorted(soak.refused.items())) + ")"
           if soak.refused else ""),
    ]
    ended = [r for r in results if outcome(r) != "held"]
    for r in ended[:5]:
        lines.append(f"  not held: {outcome(r)}: close {r.close_code} {r.close_reason or ''} {r.error or ''}"
                     f" after {r.duration:.0f} s".rstrip())
    asked, answered = soak.turns()
    if asked:
        lines.append(f"turns: {answered} of {asked} questions answered by the agent")
    if soak.idle is not None and soak.after is not None and soak.after.fds is not None:
        lines.append(f"after every call hung up: calls active {soak.after.calls_active:.0f}, open fds {soak.after.fds:.0f}"
                     f" (idle before the calls: {soak.idle.fds:.0f}), delayed calls {soak.after.delayed:.0f}"
                     f" (idle: {soak.idle.delayed:.0f}), RSS {soak.after.rss / 2**20:.1f} MiB"  # type: ignore[operator]
                     f" (idle: {soak.idle.rss / 2**20:.1f})")  # type: ignore[operator]
    return lines


# ---- command line ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    p.add_argument("--minutes", type=int, default=10, help="minutes to hold them (default 10; at least 2)")
    p.add_argument("--talkers", type=int, default=5, help="calls that ask questions (default 5; 0: all silent)")
    p.add_argument("--ask-every", type=float, default=45.0, help="seconds from a reply's end to the next question (45)")
    p.add_argument("--ask-jitter", type=float, default=15.0, help="+- seconds on --ask-every (15)")
    p.add_argument("--ramp", type=float, default=30.0, help="spread the call starts over S seconds (default 30)")
    p.add_argument("--retries", type=int, default=3, help="retries of a refused call, 5 s apart (default 3)")
    p.add_argument("--sample", type=int, default=30, help="seconds between scrapes, a divisor of 60 (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.calls < 1 or args.minutes < 2 or args.talkers < 0 or args.retries < 0 or args.ramp < 0:
        p.print_usage(sys.stderr)
        print("error: --calls >= 1, --minutes >= 2, --talkers, --retries, --ramp >= 0", file=sys.stderr)
        return 2
    if args.sample < 1 or 60 % args.sample or args.ask_jitter < 0 or args.ask_every - args.ask_jitter < 1:
        print("error: --sample must divide 60; --ask-every - --ask-jitter must be at least 1 s", file=sys.stderr)
        return 2
    if args.ramp >= args.minutes * 60 - 60:
        print("error: --ramp must end at least a minute before the run does", file=sys.stderr)
        return 2

    from tests.daemon import Daemon, free_port

    clips = question_clips() if args.talkers else []
    admin = free_port()
    with tempfile.TemporaryDirectory(prefix="upvoot-soak-") as tmp:
        daemon = Daemon(Path(tmp), soak_ini(args.calls, admin))
        soak = None
        try:
            t0 = time.monotonic()
            daemon.start(timeout=180)
            key = daemon.cli("keys", "create", "--agent", AGENT, "--account", "soak")
            daemon.cli("points", "add", "soak", "1000000")
            print(f"UpVoot soak: {args.calls} calls ({min(args.talkers, args.calls)} talking) for {args.minutes} min"
                  f" against pid {daemon.proc.pid}, ws://127.0.0.1:{daemon.port}, ready in {time.monotonic() - t0:.0f} s;"
                  f" ramp {args.ramp:g} s, a scrape every {args.sample} s", flush=True)
            soak = Soak(args, daemon, daemon.url(f"/voice/{key}"), f"http://127.0.0.1:{admin}", clips)
            react(lambda reactor: defer.Deferred.fromCoroutine(run_soak(reactor, soak)))
        except IndexError:  # the reactor stopped before the run ended (Ctrl-C)
            print("interrupted", file=sys.stderr)
        finally:
            code = daemon.stop()
        log = daemon.log_text()
    if soak is None:
        return 1
    print(LEGEND)
    print()
    for line in summary(soak):
        print(line)
    errors = sum(1 for line in log.splitlines() if "Traceback" in line or "Unhandled" in line)
    print(f"daemon: stopped with {code}; {errors} tracebacks or unhandled errors in its log")
    flat, lines = verdict(soak)
    print()
    for line in lines:
        print(line)
    held = sum(1 for r in soak.results if r is not None and outcome(r) == "held")
    return 0 if flat and held == args.calls else 1


if __name__ == "__main__":
    sys.exit(main())
