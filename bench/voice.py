"""Voice-to-voice latency of a real call, client side and server side.

    python bench/voice.py [--calls 2] [--turns 5]
    python bench/voice.py --url ws://127.0.0.1:8080/voice/KEY --config etc/upvoot.ini

Without --url it starts ``twistd -n upvoot`` with the shipped etc/upvoot.ini
on a free loopback port in a temporary directory (``tests.daemon``), makes a
key, and calls it. Each call is the Autobahn client of ``upvoot dial``
(``upvoot.dial``) streaming 20 ms frames in real time; after the greeting
the caller asks ``--turns`` questions the demo agent's rules answer (spoken
by the shipped piper voice, 0.5 s of silence before, 0.3 s after), each
after the previous reply's ``audio_end`` and a ``--pause``.

Per turn:

client v2v   the moment the last speech sample of the question was sent
             (its frame's send time + its offset in the frame; "speech" ends
             at the last 5 ms block above -50 dBFS) -> the first binary frame
             after the reply's ``audio_start``.
server       the call record's ``metadata.latencies`` (``upvoot calls show ID
             --json``; ``upvoot.call.outcome.split``): end_of_turn (the short
             silence waited), turn_model (the end-of-turn model's decision),
             transcription, brain_first_token, first_audio (TTS to
             audio_start), voice_to_voice from the server's speech end (its
             VAD's last voiced frame) to audio_start.
client - server  per turn. The server's clock starts at the arrival of the
             last frame its VAD called voiced, a few tens of ms before the
             real end of speech ("offset": the VAD's tail threshold plus one
             frame); client - server + offset is what the network, the
             pacer's first 20 ms tick and the client's frame timing add.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from upvoot.dial import FRAME_SECONDS  # noqa: E402

from bench._common import (  # noqa: E402
    OtherLoad,
    QuestionCaller,
    agent_text_at,
    call_record,
    managed_daemon,
    ms,
    pair_latencies,
    percentile,
    question_clips,
    react,
    run_calls,
    wait_quiet,
    write_clips_wav,
)

from upvoot.call.outcome import LATENCY_KEYS as STAGES, read_latency  # noqa: E402
APOLOGY = "Sorry, I had a problem there. Could you say that again?"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/voice.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="ws://127.0.0.1:PORT/voice/KEY of a running daemon (default: start one)")
    p.add_argument("--config", help="with --url: the daemon's ini, to read its call records")
    p.add_argument("--pid", type=int, help="with --url: the daemon's pid, to measure its CPU")
    p.add_argument("--calls", type=int, default=2, help="calls, one after the other (default 2)")
    p.add_argument("--turns", type=int, default=5, help="questions per call (default 5, at most 19)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between a reply's audio_end and the next question (default 1)")
    p.add_argument("--save-wav", metavar="FILE.wav", help="also write the question clips, back to back, to FILE.wav")
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
    if args.save_wav:
        write_clips_wav(Path(args.save_wav), clips)
    if args.url:
        key = args.url.rstrip("/").rsplit("/", 1)[-1]
        return measure(args, clips, args.url, Path(args.config), key, args.pid, None)
    with managed_daemon(keys=1) as (daemon, keys):
        return measure(args, clips, daemon.url(f"/voice/{keys[0]}"), daemon.ini, keys[0], daemon.proc.pid, daemon)


def measure(args: argparse.Namespace, clips: list, url: str, config: Path, key: str, pid: int | None, daemon: Any) -> int:
    sources = [QuestionCaller(clips, call_no=i, max_turns=args.turns, pause=args.pause, first=i * args.turns)
               for i in range(args.calls)]
    loads: list[dict] = []

    async def calls(reactor: Any) -> list:
        results = []
        for src in sources:  # one call after the other, each on a quiet machine if we can
            waited, others = wait_quiet(pid)
            if waited > 1.5:
                print(f"(waited {waited:.0f} s for other processes to calm down: {others:.0f} % of a core)", flush=True)
            load = OtherLoad(pid)
            load.start()
            results += await run_calls(reactor, [url], [src], args.max_seconds)
            loads.append(load.stop())
        return results

    results = react(calls)

    pairs = []
    for src, res in zip(sources, results):
        for turn in src.turns:
            if turn.reply_text is None and turn.audio_end is not None:
                turn.reply_text = agent_text_at(res, turn.audio_end)
        status = (f"refused HTTP {res.refused}" if res.refused else res.error) if (res.refused or res.error) else \
            f"{len(src.turns)} questions, closed by {res.closed_by} ({res.hangup_reason or res.close_code}) after {res.duration:.1f} s"
        record = call_record(config, key, src.opened_wall) if src.opened_wall else None
        rid = record["call_id"] if record else "no record"
        load = loads[src.call_no]
        print(f"call {src.call_no + 1}: {status}; record {rid}; CPU % of one core: daemon {load['server']:.0f},"
              f" this client {load['own']:.0f}, other processes {load['others']:.0f}" + (f"; {src.note}" if src.note else ""))
        pairs += [(t, read_latency(s) if s else None) for t, s in pair_latencies(src.turns, record, APOLOGY)]

    print()
    print(f"{'call':>4} {'turn':>4}  {'question':34} {'ok':>3} {'client':>7} {'server':>7} {'diff':>6} {'offset':>6} "
          f"{'net+pace':>8} | {'eot':>6} {'model':>6} {'stt':>6} {'brain':>6} {'tts':>6}   (ms)")
    for turn, srv in pairs:
        srv = srv or {}
        v2v_s = srv.get("voice_to_voice")
        diff = None if v2v_s is None or turn.v2v is None else turn.v2v - v2v_s
        off = offset(turn)
        net = None if diff is None or off is None else diff + off
        print(f"{turn.call + 1:>4} {turn.index + 1:>4}  {turn.clip.text[:34]:34} {'yes' if turn.understood else 'NO':>3} "
              f"{ms(turn.v2v)} {ms(v2v_s)} {ms(diff, 6)} {ms(off, 6)} {ms(net, 8)} | "
              + " ".join(ms(srv.get(k), 6) for k in STAGES[:5]))
    unanswered = [t for s in sources for t in s.turns if t.first_byte is None]
    if unanswered:
        print(f"unanswered questions: {len(unanswered)}")

    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"{name:48} {0:>3}       -       -"
        return f"{name:48} {len(values):>3} {ms(percentile(values, 50))} {ms(percentile(values, 95))}"

    with_srv = [(t, s) for t, s in pairs if s and t.v2v is not None]
    print()
    print(f"{'voice-to-voice by stage (ms)':48} {'n':>3} {'median':>7} {'p95':>7}")
    for k in STAGES[:5]:
        print(row(f"server: {k}", [s[k] for _, s in with_srv if k in s]))
    print(row("server: voice_to_voice (VAD end -> audio_start)", [s["voice_to_voice"] for _, s in with_srv]))
    print(row("client: voice_to_voice (speech end -> 1st byte)", [t.v2v for t, _ in pairs if t.v2v is not None]))
    print(row("client - server", [t.v2v - s["voice_to_voice"] for t, s in with_srv]))
    print(row("  offset: speech end - server's speech end", [offset(t) for t, _ in with_srv if offset(t) is not None]))
    print(row("  network + pacing (client - server + offset)",
              [t.v2v - s["voice_to_voice"] + offset(t) for t, s in with_srv if offset(t) is not None]))
    understood = sum(1 for t, _ in pairs if t.understood)
    print()
    print(f"turns: {len(pairs)} answered of {sum(len(s.turns) for s in sources)} asked, "
          f"{understood} answered with the right rule, {len(with_srv)} with a server split")
    if daemon is not None:
        logged = daemon.log_text().count("Turn latency ")
        print(f"daemon log: {logged} call.turn_latency events")
    wall = sum(x["wall"] for x in loads)
    print(f"CPU over {wall:.1f} s of calls, % of one core ({os.cpu_count()} cores): "
          + (f"daemon {sum(x['server'] * x['wall'] for x in loads) / wall:.0f}, " if pid else "daemon not measured (--pid), ")
          + f"this client {sum(x['own'] * x['wall'] for x in loads) / wall:.0f}, "
          f"other processes {sum(x['others'] * x['wall'] for x in loads) / wall:.0f}")
    ok = pairs and all(s for _, s in pairs) and not unanswered
    return 0 if ok else 1


def offset(turn: Any) -> float | None:
    """How much earlier than the real end of speech the server starts its
    clock: it counts from the arrival of the last frame its VAD called voiced
    (endpointed - end_of_turn), which we sent one frame before ``vad_end``."""
    if turn.vad_end is None or turn.speech_end is None:
        return None
    return turn.speech_end - (turn.vad_end - FRAME_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
