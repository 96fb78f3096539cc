"""How many simultaneous *talking* calls this machine sustains.

    python bench/capacity.py [--steps 2,4,6,8,10,12] [--seconds 40] [--limit 1.0] [--turn smart] [--framing raw]

Starts ``twistd -n upvoot`` with the shipped etc/upvoot.ini on a free
loopback port in a temporary directory (``tests.daemon``), with one key per
concurrent call. Then, for each step N, places N calls at once (their starts
spread over ``--ramp`` seconds), each the Autobahn client of ``upvoot dial``
streaming 20 ms frames in real time (``--framing``: raw, or Exotel at 8 kHz)
and asking questions continuously: after the greeting, a question (the turns
of bench/turns.py: piper, espeak-ng and recorded voices), silence until the
reply has played, a pause of ``--pause`` +- 0.25 s, the next question; no new
question after ``--seconds``, then the call hangs up once the last reply
has played. ``--turn``: the demo agent's turn policy (default: the shipped ini's).

Per step: turns measured, client-side voice-to-voice (the end of speech
found by energy in the audio the caller played -> the first byte of the
reply's audio; ``bench._turns.PlayedCaller``) p50/p95/max, the server's own
voice_to_voice, turn model and transcription p95 (call records, metadata.latencies),
calls refused (HTTP 503), engine failures (daemon log), the daemon's CPU
(utime+stime of /proc/PID/stat over the step, % of one core) and the load
generator's. Stops after the first step whose p95 is over ``--limit`` or
that had a refusal. A step that fails while other processes on
the (shared) machine used over ``--disturbed`` % of a core is repeated once.
Verdict: the largest N with p95 <= --limit and no refusal. Exit 0 when at least one step passed.
Each step's line ends with the machine's load average (os.getloadavg) at its end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import task  # noqa: E402

from bench._common import (  # noqa: E402
    OtherLoad,
    agent_text_at,
    call_record,
    managed_daemon,
    ms,
    percentile,
    playback_gaps,
    react,
    run_calls,
    wait_quiet,
)
from bench._turns import FRAMINGS, PlayedCaller, load_line, server_split, turn_clips, with_agent_options  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/capacity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="2,4,6,8,10,12", help="concurrent calls per step (default 2,4,6,8,10,12)")
    p.add_argument("--seconds", type=float, default=40.0, help="seconds each call keeps asking (default 40)")
    p.add_argument("--limit", type=float, default=1.0, help="p95 voice-to-voice limit in seconds (default 1.0)")
    p.add_argument("--turn", default="", help="the demo agent's turn policy: silence or smart (default: the shipped ini's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another [agent:demo] option for the daemon (repeatable), e.g. turn_transcribe_after=200ms")
    p.add_argument("--daemon-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an [upvoot] option for the daemon (repeatable), e.g. playout_lead=60ms")
    p.add_argument("--framing", default="raw", choices=sorted(FRAMINGS), help="raw or exotel (8 kHz) (default raw)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds from a reply's audio_end to the next question (default 1)")
    p.add_argument("--ramp", type=float, default=4.0, help="spread the call starts of a step over S seconds (default 4)")
    p.add_argument("--disturbed", type=float, default=50.0,
                   help="repeat a failed step once when other processes used more than this %% of a core (default 50)")
    p.add_argument("--rest", type=float, default=3.0, help="seconds of idle between steps (default 3)")
    return p


HEADER = (f"{'N':>2} {'calls':>5} {'turns':>5} {'unans':>5} {'v2v p50':>8} {'v2v p95':>8} {'max':>6} "
          f"{'srv p95':>8} {'eot p95':>8} {'stt p95':>8} {'503':>4} {'fail':>4} {'srv CPU':>8} {'gen CPU':>8} {'others':>7}  verdict")


async def step(reactor: Any, n: int, args: argparse.Namespace, clips: list, daemon: Any, keys: list[str]) -> dict:
    urls = [daemon.url(f"/voice/{keys[i]}") for i in range(n)]
    sources = [
        PlayedCaller(clips, call_no=i, max_turns=19, ask_until=args.seconds, pause=args.pause, jitter=0.25,
                     first=3 * i, seed=1000 * n + i, rate=FRAMINGS[args.framing])
        for i in range(n)
    ]
    log_before = daemon.log_text()
    pid = daemon.proc.pid
    waited, others = wait_quiet(pid)  # the reactor has no call to serve meanwhile
    load = OtherLoad(pid)
    load.start()
    results = await run_calls(reactor, urls, sources, max_seconds=args.seconds + 40.0, ramp=args.ramp,
                              provider=args.framing, sample_rate=None if args.framing == "raw" else FRAMINGS[args.framing])
    cpu = load.stop()
    log = daemon.log_text()[len(log_before):]

    turns, server, v2v = [], [], []
    for i, (src, res) in enumerate(zip(sources, results)):
        for t in src.turns:
            if t.reply_text is None and t.audio_end is not None:
                t.reply_text = agent_text_at(res, t.audio_end)
        turns += src.turns
        v2v += [v for v in map(src.v2v, src.turns) if v is not None]
        if res.opened and src.opened_wall:
            record = call_record(daemon.ini, keys[i], src.opened_wall)
            server += [s for _, s in server_split(src.turns, record) if s]
    fig = {
        "n": n,
        "opened": sum(1 for r in results if r.opened),
        "refused": sum(1 for r in results if r.refused == 503),
        "other_refused": sum(1 for r in results if r.refused and r.refused != 503),
        "failed": sum(1 for r in results if r.error),
        "turns": len(v2v),
        "unanswered": sum(1 for t in turns if t.first_byte is None),
        "misunderstood": sum(1 for t in turns if t.first_byte is not None and t.clip.expect and not t.understood),
        "p50": percentile(v2v, 50),
        "p95": percentile(v2v, 95),
        "max": max(v2v) if v2v else None,
        "srv_p95": percentile([s["voice_to_voice"] for s in server], 95),
        "stt_p95": percentile([s["transcription"] for s in server], 95),
        "eot_p95": percentile([s["end_of_turn"] + s["turn_model"] for s in server], 95),
        "engine_failures": sum(1 for line in log.splitlines() if "Engine " in line and " failed" in line),
        "busy_refusals": log.count("Upgrade refused"),
        "cpu": cpu["server"],
        "gen_cpu": cpu["own"],
        "others": cpu["others"],
        "wall": cpu["wall"],
        "waited": waited,
        "load": load_line(),
        "playback": playback_gaps(results),
    }
    fig["ok"] = bool(v2v) and fig["p95"] <= args.limit and not fig["refused"] and not fig["failed"]
    return fig


def row(f: dict, limit: float) -> str:
    verdict = "ok" if f["ok"] else ("refused" if f["refused"] else "no turns" if not f["turns"] else f"p95 > {limit:g} s")
    return (f"{f['n']:>2} {f['opened']:>5} {f['turns']:>5} {f['unanswered']:>5} {ms(f['p50'], 8)} {ms(f['p95'], 8)} "
            f"{ms(f['max'], 6)} {ms(f['srv_p95'], 8)} {ms(f['eot_p95'], 8)} {ms(f['stt_p95'], 8)} {f['refused']:>4} "
            f"{f['engine_failures']:>4} {f['cpu']:>7.0f}% {f['gen_cpu']:>7.0f}% {f['others']:>6.0f}%  {verdict}; {f['load']}"
            + (f"  (waited {f['waited']:.0f} s for a quiet machine)" if f["waited"] > 1.5 else ""))


def gap_line(f: dict) -> str:
    g = f["playback"]
    return (f"   the caller's playback (frames played as they arrive): {g['gaps']} gaps in {g['replies']} replies, "
            f"{g['total'] * 1000:.0f} ms in all, longest {g['longest'] * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        steps = [int(x) for x in args.steps.split(",") if x.strip()]
        if not steps or min(steps) < 1 or max(steps) > 40:
            raise ValueError
    except ValueError:
        print("error: --steps: comma-separated call counts, 1..40", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    clips = turn_clips()
    print(f"questions: {len(clips)} clips (piper, espeak-ng, recorded) in {time.perf_counter() - t0:.1f} s "
          f"({min(c.speech_seconds for c in clips):.2f} to {max(c.speech_seconds for c in clips):.2f} s of speech)")
    print(f"machine: {os.cpu_count()} cores, {load_line()}; each call asks for {args.seconds:g} s, pause {args.pause:g} s"
          f" +- 0.25 s; framing {args.framing}; turn = {args.turn or '(shipped)'}; limit: client v2v p95 <= {args.limit:g} s"
          + "".join(f"; {o}" for o in args.option + args.daemon_option))
    figures: list[dict] = []
    options = dict(o.split("=", 1) for o in args.option if "=" in o)
    if args.turn:
        options["turn"] = args.turn
    daemon_options = dict(o.split("=", 1) for o in args.daemon_option if "=" in o)

    def edit(ini: str) -> str:
        return with_agent_options(with_agent_options(ini, **options), header="[upvoot]", **daemon_options)

    with managed_daemon(keys=max(steps), points=100000, edit=edit) as (daemon, keys):

        async def run(reactor: Any) -> None:
            print()
            print(HEADER)
            print(f"{'':2} {'':5} {'':5} {'':5} {'(client side, ms)':>24} {'(server records, ms)':>26} {'':9} "
                  f"{'(% of one core)':>25}", flush=True)
            for n in steps:
                f = await step(reactor, n, args, clips, daemon, keys)
                print(row(f, args.limit), flush=True)
                print(gap_line(f), flush=True)
                if not f["ok"] and f["others"] > args.disturbed:
                    # other processes took the CPU: once more, to be fair to the daemon
                    print(f"   (other processes used {f['others']:.0f} % of a core during that step: repeating it once)", flush=True)
                    f = await step(reactor, n, args, clips, daemon, keys)
                    print(row(f, args.limit), flush=True)
                    print(gap_line(f), flush=True)
                figures.append(f)
                if not f["ok"]:
                    break
                await task.deferLater(reactor, args.rest, lambda: None)

        react(run)
    passed = [f["n"] for f in figures if f["ok"]]
    print()
    print("columns: calls = opened; turns = questions answered (measured); unans = asked, no reply audio;")
    print("  srv p95 = the daemon's voice_to_voice; eot p95 = its end_of_turn + turn_model; stt p95 = its transcription;")
    print("  503 = calls refused; fail = engine failures in the daemon log; srv CPU = daemon utime+stime / wall;")
    print("  gen CPU = this load generator; others = every other process on the machine (it is shared).")
    wrong = sum(f["misunderstood"] for f in figures)
    if wrong:
        print(f"note: {wrong} replies did not answer the question asked (STT misheard, or an apology)")
    if passed:
        best = max(n for n in passed if all(f["ok"] for f in figures if f["n"] <= n))
        print(f"verdict: {best} simultaneous talking call{'s' if best > 1 else ''} with client voice-to-voice "
              f"p95 <= {args.limit:g} s on this {os.cpu_count()}-core machine")
        return 0
    print(f"verdict: not even {figures[0]['n']} call(s) within p95 <= {args.limit:g} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
