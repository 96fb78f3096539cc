"""Voice-to-voice latency of a real call, client side and server side.

    python bench/voice.py [--calls 2] [--turns 5]
    python bench/voice.py --url ws://127.0.0.1:8080/voice/KEY --config etc/upvoot.ini

Without --url it starts ``twistd -n upvoot`` with the shipped etc/upvoot.ini
on a free loopback port in a temporary directory (``tests.daemon``), makes a
key, and calls it. Each call is the Autobahn client of ``upvoot dial``
(``upvoot.dialer``) streaming 20 ms frames in real time; after the greeting
the caller asks ``--turns`` questions the demo agent's rules answer (spoken
by the shipped piper voice, 0.5 s of silence before, 0.3 s after), each
after the previous reply's ``audio_end`` and a ``--pause``.

Per turn:

client v2v   the moment the last speech sample of the question was sent
             (its frame's send time + its offset in the frame; "speech" ends
             at the last 5 ms block above -50 dBFS) -> the first binary frame
             after the reply's ``audio_start``.
server       the call record's ``metadata.latencies`` (``upvoot calls show ID
             --json``): endpointing (= end_of_turn, the silence that ends a
             turn), transcription, first token (brain), first audio (TTS to
             audio_start), voice_to_voice from the server's estimate of the
             speech end (endpointed - end_of_turn, i.e. its VAD's last voiced
             frame) to audio_start.
client - server  per turn: network, the pacer's first tick, the client's
             frame scheduling, and where the VAD places the end of speech
             (printed separately as "VAD tail").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    QuestionCaller,
    agent_text_at,
    call_record,
    cpu_seconds,
    managed_daemon,
    ms,
    pair_latencies,
    percentile,
    question_clips,
    react,
    run_calls,
)

STAGES = ("endpointing", "transcription", "first_token", "first_audio", "voice_to_voice")
APOLOGY = "Sorry, I had a problem there. Could you say that again?"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/voice.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="ws://127.0.0.1:PORT/voice/KEY of a running daemon (default: start one)")
    p.add_argument("--config", help="with --url: the daemon's ini, to read its call records")
    p.add_argument("--pid", type=int, help="with --url: the daemon's pid, to measure its CPU")
    p.add_argument("--calls", type=int, default=2, help="calls, one after the other (default 2)")
    p.add_argument("--turns", type=int, default=5, help="questions per call (default 5, at most 19)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between a reply's audio_end and the next question (default 1)")
    p.add_argument("--max-seconds", type=float, default=180.0, help="hard limit per call (default 180)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.url and not args.config:
        print("error: --url needs --config (to read the call records)", file=sys.stderr)
        return 2
    if not 1 <= args.turns <= 19 or not 1 <= args.calls <= 20:
        print("error: --turns must be 1..19 (max_turns is 20) and --calls 1..20", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    clips = question_clips()
    print(f"questions: {len(clips)} clips by piper in {time.perf_counter() - t0:.1f} s: "
          + "; ".join(f"{c.text!r} {c.speech_seconds:.2f} s" for c in clips))
    if args.url:
        key = args.url.rstrip("/").rsplit("/", 1)[-1]
        return measure(args, clips, args.url, Path(args.config), key, args.pid, None)
    with managed_daemon(keys=1) as (daemon, keys):
        return measure(args, clips, daemon.url(f"/voice/{keys[0]}"), daemon.ini, keys[0], daemon.proc.pid, daemon)


def measure(args: argparse.Namespace, clips: list, url: str, config: Path, key: str, pid: int | None, daemon: Any) -> int:
    sources = [QuestionCaller(clips, call_no=i, max_turns=args.turns, pause=args.pause, first=i * args.turns)
               for i in range(args.calls)]
    cpu0 = cpu_seconds(pid) if pid else None
    wall0 = time.monotonic()
    results = react(lambda reactor: run_calls(reactor, [url] * args.calls, sources, args.max_seconds, sequential=True))
    wall = time.monotonic() - wall0
    cpu = cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None

    pairs = []
    for src, res in zip(sources, results):
        for turn in src.turns:
            if turn.reply_text is None and turn.audio_end is not None:
                turn.reply_text = agent_text_at(res, turn.audio_end)
        status = (f"refused HTTP {res.refused}" if res.refused else res.error) if (res.refused or res.error) else \
            f"{len(src.turns)} questions, closed by {res.closed_by} ({res.hangup_reason or res.close_code}) after {res.duration:.1f} s"
        record = call_record(config, key, src.opened_wall) if src.opened_wall else None
        rid = record["call_id"] if record else "no record"
        print(f"call {src.call_no + 1}: {status}; record {rid}" + (f"; {src.note}" if src.note else ""))
        pairs += pair_latencies(src.turns, record, APOLOGY)

    print()
    print(f"{'call':>4} {'turn':>4}  {'question':34} {'ok':>3} {'client':>7} {'server':>7} {'diff':>6} "
          f"{'VADtail':>7} | {'endpt':>6} {'stt':>6} {'brain':>6} {'tts':>6}   (ms)")
    for turn, srv in pairs:
        srv = srv or {}
        v2v_s = srv.get("voice_to_voice")
        diff = None if v2v_s is None or turn.v2v is None else turn.v2v - v2v_s
        tail = None if turn.vad_end is None or turn.speech_end is None else turn.vad_end - turn.speech_end
        print(f"{turn.call + 1:>4} {turn.index + 1:>4}  {turn.clip.text[:34]:34} {'yes' if turn.understood else 'NO':>3} "
              f"{ms(turn.v2v)} {ms(v2v_s)} {ms(diff, 6)} {ms(tail)} | "
              + " ".join(ms(srv.get(k), 6) for k in STAGES[:4]))
    unanswered = [t for s in sources for t in s.turns if t.first_byte is None]
    if unanswered:
        print(f"unanswered questions: {len(unanswered)}")

    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"{name:40} {0:>3}       -       -"
        return f"{name:40} {len(values):>3} {ms(percentile(values, 50))} {ms(percentile(values, 95))}"

    with_srv = [(t, s) for t, s in pairs if s]
    print()
    print(f"{'voice-to-voice, per stage (ms)':40} {'n':>3} {'median':>7} {'p95':>7}")
    for k in STAGES[:4]:
        print(row(f"  server: {k}", [s[k] for _, s in with_srv]))
    print(row("  server: voice_to_voice", [s["voice_to_voice"] for _, s in with_srv]))
    print(row("  client: voice_to_voice (to 1st byte)", [t.v2v for t, _ in pairs if t.v2v is not None]))
    print(row("  client - server (network + pacing)", [t.v2v - s["voice_to_voice"] for t, s in with_srv if t.v2v is not None]))
    print(row("  of which VAD tail (speech end -> VAD)", [t.vad_end - t.speech_end for t, _ in pairs if t.vad_end and t.speech_end]))
    understood = sum(1 for t, _ in pairs if t.understood)
    print()
    print(f"turns: {len(pairs)} answered of {sum(len(s.turns) for s in sources)} asked, "
          f"{understood} answered with the right rule, {len(with_srv)} with a server split")
    if daemon is not None:
        logged = daemon.log_text().count("Turn latency ")
        print(f"daemon log: {logged} call.turn_latency events")
    if cpu is not None:
        print(f"server CPU: {cpu:.1f} s over {wall:.1f} s = {100 * cpu / wall:.0f} % of one core ({os.cpu_count()} cores)")
    ok = pairs and all(s for _, s in pairs) and not unanswered
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
