"""Voice to voice per caller turn, from the end of the caller's speech in the
audio the caller played, over the raw and the Exotel (8 kHz) framings.

    python bench/turns.py [--turn silence,smart] [--framings raw,exotel] [--turns 24]

For each turn policy (``--turn``: the demo agent's ``turn`` option; empty:
what etc/upvoot.ini says) it starts ``twistd -n upvoot`` with the shipped
etc/upvoot.ini (the demo agent; scripted brain, the shipped models) on a
free loopback port in a temporary directory (``tests.daemon``), one process
per policy. Per framing, ``--calls`` calls one after the other (each the
Autobahn client of ``upvoot dial``, ``upvoot.dial``, streaming 20 ms frames
in real time; Exotel at 8 kHz through its provider simulator) ask
``--turns`` questions between them, dealt from four voices: the shipped
piper voice, espeak-ng at 150 and at 200 words a minute (questions the
rules answer), and real recorded speech from ../shared/speech (answered by
the fallback line); each question after the previous reply has played and
``--pause``.

Per turn, client side: the end of the caller's speech is found by energy in
the audio the caller actually played (every frame it handed to the line,
band-limited to 8 kHz for Exotel; ``bench._turns.speech_threshold``), not
the end of the clip; voice to voice runs from there to the first agent audio
byte of the answer. Printed: p50/p95/max per framing and per voice; the
daemon's own split of the same turns from the call records (end_of_turn,
turn_model, transcription, brain_first_token, first_audio, voice_to_voice;
over Exotel voice_to_voice is when the caller's mark came back, and
voice_to_voice_sent when the audio left), the count of ``Turn latency`` log
lines and the per-stage means of ``upvoot_stage_latency_seconds`` on
/metrics; the machine's load average (os.getloadavg) with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import OtherLoad, call_record, managed_daemon, ms, percentile, react, run_calls, wait_quiet  # noqa: E402
from bench._turns import (  # noqa: E402
    FRAMINGS, PlayedCaller, interleave, load_line, server_split, stage_rows, turn_clips, voice_of, with_agent_options,
)
from upvoot.call.outcome import LATENCY_KEYS  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/turns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--turn", default="silence,smart",
                   help="turn policies to compare, comma-separated (the agent's turn option; default silence,smart;"
                        " '' = the shipped ini's)")
    p.add_argument("--framings", default="raw,exotel", help="framings, comma-separated: raw, exotel (default both)")
    p.add_argument("--turns", type=int, default=24, help="caller turns per framing (default 24, at least 20 for the figures)")
    p.add_argument("--calls", type=int, default=2, help="calls per framing, one after the other (default 2)")
    p.add_argument("--pause", type=float, default=0.8, help="seconds from a reply's end to the next question (default 0.8)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another [agent:demo] option for the daemon (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print every turn")
    p.add_argument("--json", metavar="FILE", help=argparse.SUPPRESS)  # one policy's figures, for the parent run
    return p


def pick(clips: list, n: int) -> list:
    """``n`` clips dealt round-robin over the voices."""
    groups: dict[str, list] = {}
    for clip in clips:
        groups.setdefault(voice_of(clip), []).append(clip)
    out: list = []
    while len(out) < n and any(groups.values()):
        for g in groups.values():
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    policies = [p.strip() for p in args.turn.split(",")] if args.turn else [""]
    framings = [f.strip() for f in args.framings.split(",") if f.strip()]
    if any(f not in FRAMINGS for f in framings) or not framings:
        print(f"error: --framings: {', '.join(FRAMINGS)}", file=sys.stderr)
        return 2
    if not 1 <= args.calls <= 10 or not args.calls <= args.turns <= 19 * args.calls:
        print("error: --calls 1..10 and --turns from --calls to 19 per call (max_turns is 20)", file=sys.stderr)
        return 2
    if len(policies) == 1:
        return one_policy(args, policies[0], framings)
    # one process per policy (the reactor runs once per process); then the comparison
    figures = {}
    for policy in policies:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--turn", policy, "--framings", ",".join(framings), "--turns",
                   str(args.turns), "--calls", str(args.calls), "--pause", str(args.pause), "--json", out.name]
            cmd += [a for o in args.option for a in ("--option", o)] + (["--verbose"] if args.verbose else [])
            print(f"==== turn = {policy or '(shipped)'} ====", flush=True)
            code = subprocess.call(cmd)
            text = Path(out.name).read_text()
            figures[policy] = json.loads(text) if text else None
            if code not in (0, 1):
                print(f"(turn = {policy}: exit {code})")
    print()
    print("==== comparison: client voice to voice from the played end of speech (ms) ====")
    print(f"{'turn':10} {'framing':8} {'n':>3} {'p50':>7} {'p95':>7} {'max':>7}  load at the time")
    for policy, fig in figures.items():
        for framing, f in (fig or {}).items():
            print(f"{policy or '(shipped)':10} {framing:8} {f['n']:>3} {ms(f['p50'])} {ms(f['p95'])} {ms(f['max'])}  {f['load']}")
    return 0 if all(figures.values()) else 1


def one_policy(args: argparse.Namespace, policy: str, framings: list[str]) -> int:
    options = dict(o.split("=", 1) for o in args.option)
    if policy:
        options["turn"] = policy
    t0 = time.perf_counter()
    clips = pick(turn_clips(), args.turns)
    voices = sorted({voice_of(c) for c in clips})
    print(f"turns: {len(clips)} per framing ({', '.join(f'{sum(voice_of(c) == v for c in clips)} {v}' for v in voices)}),"
          f" made in {time.perf_counter() - t0:.1f} s; agent options: {options or 'as shipped'}", flush=True)
    from tests.daemon import free_port

    admin = free_port()
    figures: dict[str, dict] = {}
    edit = (lambda ini: with_agent_options(ini, **options)) if options else None
    with managed_daemon(keys=1, points=100000, edit=edit, admin_listen=f"tcp:{admin}:interface=127.0.0.1") as (daemon, keys):
        runs: dict[str, list] = {}

        async def calls(reactor: Any) -> None:
            for framing in framings:
                runs[framing] = []
                for i, mine in enumerate(interleave(clips, args.calls)):
                    waited, others = wait_quiet(daemon.proc.pid)
                    src = PlayedCaller(mine, call_no=i, max_turns=len(mine), pause=args.pause, rate=FRAMINGS[framing])
                    load = OtherLoad(daemon.proc.pid)
                    load.start()
                    (res,) = await run_calls(reactor, [daemon.url(f"/voice/{keys[0]}")], [src], max_seconds=60 + 12 * len(mine),
                                             provider=framing, sample_rate=FRAMINGS[framing] if framing != "raw" else None)
                    runs[framing].append((src, res, load.stop(), load_line()))

        react(calls)
        for framing in framings:
            figures[framing] = report(framing, runs[framing], daemon, keys[0], args.verbose)
        print()
        logged = daemon.log_text().count("Turn latency ")
        print(f"daemon log: {logged} 'Turn latency' lines (event call.turn_latency)")
        print_metrics(admin)
    if args.json:
        Path(args.json).write_text(json.dumps(figures))
    return 0 if all(f["n"] >= min(20, args.turns) for f in figures.values()) else 1


def heard_at(record: dict | None, t: float) -> str | None:
    """What the daemon heard of the question asked at ``t`` (seconds since the
    call opened): the call record's first caller line from then on."""
    for entry in (record or {}).get("transcript", []):
        if entry.get("role") == "caller" and entry.get("t", 0.0) >= t - 0.05:
            return entry.get("text")
    return None


def report(framing: str, runs: list, daemon: Any, key: str, verbose: bool) -> dict:
    pairs, loads = [], []
    for src, res, cpu, load in runs:
        record = call_record(daemon.ini, key, src.opened_wall) if src.opened_wall else None
        status = res.error or (f"refused {res.refused}" if res.refused else f"{len(src.turns)} turns in {res.duration:.0f} s"
                                                                           f" (opened {res.opened}, closed by {res.closed_by} {res.close_code} {res.close_reason})")
        print(f"[{framing}] call {src.call_no + 1}: {status}, record {record['call_id'] if record else 'missing'};"
              f" CPU % of a core: daemon {cpu['server']:.0f}, client {cpu['own']:.0f}, others {cpu['others']:.0f}; {load}")
        if not src.turns:
            print("    the daemon's log:\n" + "\n".join("    " + line for line in daemon.log_text().splitlines()[-8:]))
        pairs += [(src, t, s, heard_at(record, t.asked_at)) for t, s in server_split(src.turns, record)]
        loads.append(load)
    v2v = [(t, src.v2v(t)) for src, t, _, _ in pairs if src.v2v(t) is not None]
    values = [v for _, v in v2v]
    if verbose:
        for src, t, s, heard in pairs:
            s = s or {}
            print(f"  {voice_of(t.clip):10} {t.clip.text[:30]:30} client {ms(src.v2v(t))} (clip end {ms(t.v2v)})  daemon "
                  + " ".join(f"{k[:5]} {ms(s.get(k), 5)}" for k in LATENCY_KEYS) + f"  heard {heard!r}")
    print()
    print(f"[{framing}] voice to voice, client side (played end of speech -> first agent byte), ms: "
          f"{'n':>3} {'p50':>7} {'p95':>7} {'max':>7}")
    print(f"    {'all turns':40} {len(values):>3} {ms(percentile(values, 50))} {ms(percentile(values, 95))}"
          f" {ms(max(values) if values else None)}")
    for voice in sorted({voice_of(t.clip) for t, _ in v2v}):
        mine = [v for t, v in v2v if voice_of(t.clip) == voice]
        print(f"    {voice:40} {len(mine):>3} {ms(percentile(mine, 50))} {ms(percentile(mine, 95))} {ms(max(mine))}")
    unanswered = sum(1 for src, _, _, _ in runs for t in src.turns if t.first_byte is None)
    if unanswered:
        print(f"    unanswered turns: {unanswered}")
    splits = [s for _, _, s, _ in pairs if s]
    print(f"[{framing}] the daemon's split of the same turns (call records), ms: {'n':>3} {'p50':>7} {'p95':>7}")
    for line in stage_rows(splits, percentile, ms):
        print(line)
    print(f"[{framing}] machine: {loads[-1] if loads else load_line()}")
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": max(values) if values else None, "load": loads[-1] if loads else load_line(),
            "split": {k: percentile([s[k] for s in splits if k in s], 50) for k in LATENCY_KEYS}}


def print_metrics(admin_port: int) -> None:
    """Per-stage mean of upvoot_stage_latency_seconds on the admin /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        print(f"/metrics: {e}")
        return
    sums, counts = {}, {}
    for family in text_string_to_metric_families(text):
        if family.name == "upvoot_stage_latency_seconds":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    sums[s.labels["stage"]] = s.value
                elif s.name.endswith("_count"):
                    counts[s.labels["stage"]] = s.value
    print("/metrics upvoot_stage_latency_seconds, mean per stage over all framings (ms): "
          + ", ".join(f"{k} {1000 * sums[k] / counts[k]:.0f} (n {counts[k]:.0f})" for k in LATENCY_KEYS if counts.get(k)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
