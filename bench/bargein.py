"""Barge-in at the caller's ear against the real daemon, over three framings:
raw (UpVoot's 16 kHz binary), Exotel at 16 kHz and Exotel at 8 kHz.

    python bench/bargein.py [--n 10] [--framings raw,exotel-16k,exotel-8k] [--verbose]

It starts one ``twistd -n upvoot`` with the shipped etc/upvoot.ini plus the
``story`` agent of tests/test_bargein_daemon.py (scripted brain whose
fallback is a long story; shipped models) on a free loopback port in a
temporary directory (``tests.daemon``). Per framing, one uninterrupted
reference call, then ``--n`` calls one after the other, each the provider's
side over a real socket (``ProviderCall`` of tests/test_providers_daemon.py
around ``upvoot.dial.make_sim``: caller audio in real time, agent audio
played in real time on the provider's buffer, marks echoed once played, and
on Exotel's ``clear`` the playing chunk finishes). Every call: the greeting,
"Tell me a story please." (piper), 1.5 to 3 s into the story (0.37 s later
each call, modulo 1.5 s, so the cough meets the reply's chunks at other
phases) a cough (``upvoot.testing.speech(0.12)``: loud enough for the
energy VAD, shorter than barge_in_min and min_utterance, so a false alarm),
then the story to its end. Every wait has a timeout; a failed call is
counted and skipped.

Measured per barge-in, client side, from t0 = when the cough's first frame
was handed to the line: the first caller media message holding a loud
sample of it, as sent on the socket (at 8 kHz that is after the
simulator's own 16 -> 8 kHz stream resampler, which holds back up to a
message: t0 is not when ``play`` was called):

- clear     (Exotel) t0 -> the server's ``clear`` received.
- ear       t0 -> the caller stops hearing agent audio. Exotel: the end of
            the chunk that was playing when the clear arrived (it is let
            finish; without one playing, the end of the last chunk heard).
            Raw (no clear: the client plays frames back to back as they
            arrive): the end, played out, of the last agent frame received
            before the pause.
- onset     t0 -> the caller's speech onset as the daemon saw it
            (``caller_start`` in the call record's metadata.timeline, put on
            the client's clock by the record's started_at wall time).
- onset->ear  the same ear moment from the daemon's onset (the requirement:
            the ear is quiet <= 100 ms after speech onset).
- lossless  the false alarm resumes from the last acknowledged mark: what
            the caller heard (on the wire: the provider's payload bytes, so
            8 kHz is compared at 8 kHz, before the simulator's resampling)
            must equal the reference call's reply: every sample, in order,
            once (only trailing zero padding may differ). Raw and 16 kHz are
            compared bit for bit; 8 kHz within +-4 LSB, since two
            uninterrupted 8 kHz calls already differ by up to 2 LSB (the
            daemon's soxr stream resampler; the resent audio is resampled
            again, after a prime with the heard audio before it). Calls where it did not are
            counted, with where they first differ and by how much the rest
            is shifted (audio doubled/inserted or lost).

Printed: p50/p95/max per framing over the barge-ins, the lossless count,
the daemon's own clear/resume records, and the machine's load average
(os.getloadavg) with the figures (the machine may be shared: figures are
indicative under load). With ``--verbose`` every call's line; a call that
failed or was not lossless is printed anyway. Exit code 0 when every call
ran and every false alarm was lossless, 1 otherwise, 2 for bad arguments.

Caveats that shape the figures: Exotel sends caller audio in ~100 ms media
messages (the simulator does too), so the daemon's onset detection waits
for the first message holding the cough (t0 is when that message was sent;
on a real line the caller spoke its first sample up to 100 ms earlier); at
8 kHz the daemon's own 8 -> 16 kHz stream resampler (soxr) may hold a
message back until the next one arrives, adding up to 100 ms more. At
8 kHz Exotel's minimum outbound chunk (3200 bytes) is 200 ms of audio, so
the playing chunk finishing after a clear can take up to 200 ms there (at
16 kHz 3200 bytes is 100 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench._common import call_record, ms, percentile  # noqa: E402
from bench._turns import load_line  # noqa: E402
from tests.daemon import Daemon, shipped_ini, synthesize  # noqa: E402
from tests.test_bargein_daemon import AGENTS  # noqa: E402  (the story agent)
from tests.test_providers_daemon import ProviderCall  # noqa: E402
from upvoot.dial import AgentAudio, Cleared, make_sim  # noqa: E402
from upvoot.framing.convert import bytes_per_sample  # noqa: E402
from upvoot.testing import speech  # noqa: E402

#: name -> (provider, sample rate)
FRAMINGS: dict[str, tuple[str, int | None]] = {
    "raw": ("raw", None),
    "exotel-16k": ("exotel", 16000),
    "exotel-8k": ("exotel", 8000),
}

#: seconds from the story's first audio to the cough: COUGH_AFTER + (0.37 s * call) mod COUGH_SPREAD
COUGH_AFTER, COUGH_SPREAD = 1.5, 1.5
#: the heard audio may differ from the reference by this much per sample (LSB):
#: at 8 kHz two uninterrupted calls differ by up to 2 LSB (the daemon's soxr stream resampler)
TOLERANCE = {"exotel-8k": 4}
#: a gap between agent frames longer than this (raw) is the pause
RAW_GAP = 0.2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/bargein.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="barge-ins (calls) per framing (default 10)")
    p.add_argument("--framings", default=",".join(FRAMINGS), help=f"comma-separated: {', '.join(FRAMINGS)} (default all)")
    p.add_argument("--verbose", action="store_true", help="print every call")
    p.add_argument("--daemon-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an [upvoot] option for the daemon (repeatable), e.g. playout_lead=60ms")
    return p


# ---- one call -----------------------------------------------------------------------------------


class TappedCall:
    """A ``ProviderCall`` whose simulator also keeps each agent payload as
    sent on the wire, and the time the cough's first frame left."""

    def __init__(self, daemon: Daemon, key: str, framing: str) -> None:
        provider, rate = FRAMINGS[framing]
        self.sim = make_sim(provider, sample_rate=rate)
        self.rate = self.sim.rate
        self.width = bytes_per_sample(self.sim.codec)
        self.payloads: dict[int, bytes] = {}  # id(AgentAudio) -> payload
        self.armed = False  # set just before the cough is played
        self.t0: float | None = None
        agent_media, caller_media = self.sim._agent_media, self.sim._media

        def tap_agent(payload: bytes, now: float) -> list:
            evs = agent_media(payload, now)
            for e in evs:
                self.payloads[id(e)] = payload
            return evs

        def tap_caller(payload: bytes, chunk: int, timestamp: int) -> Any:
            # the first caller media message holding a sample of the cough (on the
            # wire, after the simulator's own resampling at 8 kHz); the writer
            # sends it right after this returns
            if self.armed and self.t0 is None and loud(payload, self.sim.codec):
                self.t0 = self.call.now()
            return caller_media(payload, chunk, timestamp)

        self.sim._agent_media = tap_agent  # instance attributes: the sim calls self._agent_media / self._media
        self.sim._media = tap_caller
        self.call = ProviderCall(self.sim.url(daemon.url(f"/voice/{key}")), self.sim)
        self.opened_wall = time.time() - self.call.now()

    def payload_seconds(self, e: AgentAudio) -> float:
        return len(self.payloads[id(e)]) / self.width / self.rate


def loud(payload: bytes, codec: str) -> bool:
    """A sample of the cough (-15 dBFS) in this caller payload (s16le; a
    resampler's rounding leaves +-1 in silence)."""
    if codec != "s16le":
        return any(payload)
    x = np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2")
    return bool(len(x)) and int(np.abs(x.astype(np.int32)).max()) > 1000


def ear(tc_: TappedCall, story: list[tuple[float, AgentAudio]], clears: list[float]) -> list[tuple[float, AgentAudio]]:
    """The chunks the caller heard (in play order): each plays at
    ``plays_at``; a clear at ``tc`` lets the chunk playing finish and drops
    the chunks received before it that would play after it."""
    heard = []
    for t, e in story:
        later = [tc for tc in clears if t < tc]
        if later and e.plays_at >= cut_at(tc_, story, later[0]) - 1e-6:
            continue
        heard.append((e.plays_at, e))
    return sorted(heard, key=lambda x: x[0])


def cut_at(tc_: TappedCall, story: list[tuple[float, AgentAudio]], tc: float) -> float:
    """When the caller stops hearing agent audio after a clear at ``tc``: the
    end of the chunk playing then, or of the last one played before it."""
    ends = [e.plays_at + tc_.payload_seconds(e) for t, e in story if t < tc and e.plays_at <= tc]
    if not ends:
        return tc
    playing = [x for x in ends if x > tc]
    return playing[0] if playing else max(ends)


def story_call(daemon: Daemon, key: str, framing: str, cough: bool, cough_after: float = 1.5) -> dict:
    """One call: greeting, the story asked for, a cough over it (or not),
    the story to its end. Returns what the figures need (or ``error``)."""
    out: dict[str, Any] = {"framing": framing, "cough": cough}
    c = TappedCall(daemon, key, framing)
    call = c.call
    t_story = None
    try:
        call.wait_quiet(0.0, quiet=0.8, timeout=30)  # the greeting
        call.play(synthesize("Tell me a story please."))
        t_story, _ = call.wait(AgentAudio, after=call.now(), timeout=30)  # the reply, once the caller is done
        if cough:
            call.pause(cough_after)
            out["cough_after"] = cough_after
            c.armed = True
            sent = call.now()
            call.play(speech(0.12))
            deadline = time.monotonic() + 1.0
            while c.t0 is None and time.monotonic() < deadline:  # a resampler may hold it a message or two
                time.sleep(0.01)
            if c.t0 is None:
                raise AssertionError("the cough's first frame was not seen leaving")
            out["t0"] = c.t0
            out["t0_lag"] = c.t0 - sent  # play() -> the first message with the cough on the wire
            if FRAMINGS[framing][0] != "raw":
                out["t_clear"], _ = call.wait(Cleared, after=c.t0 - 0.01, timeout=5)
        call.wait_quiet(t_story, quiet=2.0, timeout=60)
        call.stop()
        call.wait_closed(timeout=20)
    except AssertionError as e:
        out["error"] = str(e)[:300]
    finally:
        call.close()
    out["violations"] = list(c.sim.violations)
    story = call.of(AgentAudio, t_story - 0.01) if t_story is not None else []
    clears = [t for t, _ in call.of(Cleared, t_story)] if t_story is not None else []
    out["clears"] = len(clears)
    heard = ear(c, story, clears)
    out["wire"] = b"".join(c.payloads[id(e)] for _, e in heard)
    out["heard_seconds"] = sum(c.payload_seconds(e) for _, e in heard)
    out["rate"], out["width"] = c.rate, c.width
    if cough and "t0" in out:
        t0 = out["t0"]
        if clears:
            first = [tc for tc in clears if tc >= t0 - 0.01]
            if first:
                out["t_ear"] = cut_at(c, story, first[0])
        elif FRAMINGS[framing][0] == "raw":
            arrivals = [(t, e) for t, e in story]
            for (t1, e1), (t2, _) in zip(arrivals, arrivals[1:]):
                if t2 - t1 > RAW_GAP and t2 > t0:
                    out["t_ear"] = e1.plays_at + c.payload_seconds(e1)
                    break
    record = call_record(daemon.ini, key, c.opened_wall, wait=20)
    out["record"] = record
    if record is not None and cough and "t0" in out:
        offset = record["started_at"] - c.opened_wall  # daemon's t -> client's t
        timeline = (record.get("metadata") or {}).get("timeline") or []
        onsets = [e["t"] + offset for e in timeline if e["kind"] == "caller_start" and e["t"] + offset >= out["t0"] - 0.05]
        if onsets:
            out["t_onset"] = onsets[0]
        d_clears = [e for e in timeline if e["kind"] == "clear" and e["t"] + offset >= out["t0"] - 0.05]
        if d_clears:
            out["t_clear_sent"] = d_clears[0]["t"] + offset
            out["unheard"] = d_clears[0].get("unheard")
        resumes = [e for e in timeline if e["kind"] == "resume" and e["t"] + offset >= out["t0"] - 0.05]
        if resumes:
            out["t_resume"] = resumes[0]["t"] + offset
            out["resent"] = resumes[0].get("resent")
    return out


# ---- figures ----------------------------------------------------------------------------------


def samples(wire: bytes, tol: int = 0) -> np.ndarray:
    """The wire's s16le samples. Compared exactly (``tol`` 0), without the
    trailing zero padding; compared within ``tol`` (8 kHz), whole: the
    reply's quiet tail is a few LSB of noise that two resampled streams
    round differently, so no trim finds the same end in both, and the same
    number of samples makes the same padded chunks (a sample lost or said
    twice still shows, as a shift of what follows)."""
    if tol == 0:
        wire = wire.rstrip(b"\0")
    return np.frombuffer(wire[: len(wire) // 2 * 2], dtype="<i2").astype(np.int32)


def same(heard: np.ndarray, ref: np.ndarray, tol: int) -> bool:
    """Every sample, in order, once (only trailing zero padding may differ)."""
    return len(heard) == len(ref) and (len(ref) == 0 or int(np.abs(heard - ref).max()) <= tol)


def diff_note(heard: np.ndarray, ref: np.ndarray, rate: int, tol: int) -> str:
    """Where the heard audio departs from the reference, and whether what
    follows is the reference shifted (audio doubled or inserted: heard
    longer; lost: shorter)."""
    n = min(len(heard), len(ref))
    bad = np.nonzero(np.abs(heard[:n] - ref[:n]) > tol)[0]
    seam = int(bad[0]) if len(bad) else n
    note = f"heard {len(heard) / rate:.3f} s vs reference {len(ref) / rate:.3f} s; first difference at {seam / rate:.3f} s"
    if len(bad):
        places = np.split(bad, np.flatnonzero(np.diff(bad) > rate // 200) + 1)  # 5 ms apart: another place
        note += "; differing at " + ", ".join(
            f"{c[0] / rate:.3f} s ({len(c)} samples over {1000 * (c[-1] - c[0] + 1) / rate:.1f} ms, "
            f"up to {int(np.abs(heard[c] - ref[c]).max())} LSB)" for c in places[:6])
    skip, width, most = rate // 2, rate // 2, rate // 2  # look 0.5 s past the seam, 0.5 s of it, lags up to 0.5 s
    if seam + skip + width > len(ref):
        return note
    window = ref[seam + skip: seam + skip + width]
    best = None
    for lag in range(-most, most + 1):
        a = seam + skip + lag
        if a < 0 or a + width > len(heard):
            continue
        d = int(np.abs(heard[a: a + width] - window).max())
        if best is None or d < best[1]:
            best = (lag, d)
    if best is None or best[1] > tol:
        return note + "; what follows matches the reference at no shift within 0.5 s"
    lag = best[0]
    if lag == 0:
        return note + "; what follows is the reference, unshifted"
    what = "extra audio heard (doubled or inserted)" if lag > 0 else "audio lost"
    note += f"; after it the reply is the reference shifted by {lag} samples ({1000 * lag / rate:+.0f} ms: {what})"
    if lag > 0:
        before, extra = ref[max(0, seam - lag): seam], heard[seam: seam + lag]
        peak = int(np.abs(before).max()) if len(before) else 0
        if peak <= 64:
            note += f"; the reply is near-silent just before the seam (peak {peak}): doubling and padding cannot be told apart"
        elif len(before) == len(extra) and extra.std() > 0 and float(np.corrcoef(before, extra)[0, 1]) > 0.9:
            d = int(np.abs(before - extra).max())
            note += (f"; the extra samples repeat the {1000 * lag / rate:.0f} ms just before the seam (doubled;"
                     f" within {d} LSB of a peak {peak})")
        else:
            note += "; the extra samples are not a repeat of the audio just before them"
    return note


def run_framing(daemon: Daemon, key: str, framing: str, n: int, verbose: bool) -> dict:
    print(f"[{framing}] reference call (no cough) ...", flush=True)
    ref = story_call(daemon, key, framing, cough=False)
    if "error" in ref or not ref["wire"]:
        print(f"[{framing}] reference call failed: {ref.get('error')}")
        return {"framing": framing, "error": "no reference"}
    tol = TOLERANCE.get(framing, 0)
    reference = samples(ref["wire"], tol)
    print(f"[{framing}] reference: {ref['heard_seconds']:.2f} s of reply, {ref['clears']} clears"
          f"{', violations ' + str(ref['violations']) if ref['violations'] else ''}", flush=True)
    rows = []
    for i in range(n):
        # the cough lands at another point of the reply each call (another phase of its chunks)
        r = story_call(daemon, key, framing, cough=True, cough_after=COUGH_AFTER + (i * 0.37) % COUGH_SPREAD)
        r["lossless"] = same(samples(r["wire"], tol), reference, tol) if "error" not in r else None
        if r["lossless"] is False:
            r["diff"] = diff_note(samples(r["wire"], tol), reference, r["rate"], tol)
        rec = r.get("record") or {}
        r["barge_ins"], r["resumed"] = rec.get("barge_ins"), rec.get("barge_ins_resumed")
        rows.append(r)
        if verbose or "error" in r or r["lossless"] is False:
            print(f"[{framing}] call {i + 1}: " + call_line(r), flush=True)
    return {"framing": framing, "rows": rows, "load": load_line()}


def since(r: dict, a: str, b: str) -> float | None:
    return r[b] - r[a] if a in r and b in r else None


def call_line(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    parts = [f"clear {ms(since(r, 't0', 't_clear'), 4)}", f"ear {ms(since(r, 't0', 't_ear'), 4)}",
             f"onset {ms(since(r, 't0', 't_onset'), 4)}", f"onset->ear {ms(since(r, 't_onset', 't_ear'), 4)}",
             f"clears {r['clears']}", f"unheard {r.get('unheard')}", f"resent {r.get('resent')}",
             f"barge_ins {r['barge_ins']} resumed {r['resumed']}",
             "lossless" if r["lossless"] else f"NOT LOSSLESS ({r.get('diff')})"]
    if r["violations"]:
        parts.append(f"violations {r['violations'][:3]}")
    return ", ".join(parts)


MEASURES = [
    ("t0 -> clear received", "t0", "t_clear"),
    ("t0 -> ear quiet", "t0", "t_ear"),
    ("t0 -> daemon onset", "t0", "t_onset"),
    ("daemon onset -> clear sent", "t_onset", "t_clear_sent"),
    ("daemon onset -> ear quiet", "t_onset", "t_ear"),
]


def report(results: list[dict], n: int) -> None:
    print()
    print("barge-in at the caller's ear, ms (t0 = the cough's first frame handed to the line)")
    print(f"{'framing':11} {'measure':30} {'n':>3} {'p50':>7} {'p95':>7} {'max':>7}")
    for res in results:
        if "error" in res:
            print(f"{res['framing']:11} {res['error']}")
            continue
        rows = [r for r in res["rows"] if "error" not in r]
        for label, a, b in MEASURES:
            values = [v for v in (since(r, a, b) for r in rows) if v is not None]
            if not values:
                continue
            print(f"{res['framing']:11} {label:30} {len(values):>3} {ms(percentile(values, 50))} "
                  f"{ms(percentile(values, 95))} {ms(max(values))}")
        failed = len(res["rows"]) - len(rows)
        lossy = [r for r in rows if r["lossless"] is False]
        ears = [since(r, "t_onset", "t_ear") for r in rows]
        within = sum(1 for v in ears if v is not None and v <= 0.100)
        print(f"{res['framing']:11} ear quiet <= 100 ms after the daemon's onset: {within}/{len(rows)};"
              f" false alarm lossless (heard == reference): {len(rows) - len(lossy)}/{len(rows)}"
              f"{f' (NOT: {len(lossy)})' if lossy else ''}{f'; {failed} calls failed' if failed else ''};"
              f" resumed {sum(1 for r in rows if r['resumed'])}/{len(rows)}, barge-ins {sum(r['barge_ins'] or 0 for r in rows)}")
        print(f"{res['framing']:11} {res['load']}")
    print(f"\nmachine now: {load_line()}; {n} barge-ins per framing requested")


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    framings = [f.strip() for f in args.framings.split(",") if f.strip()]
    if not framings or any(f not in FRAMINGS for f in framings) or not 1 <= args.n <= 100:
        print(f"error: --framings from {', '.join(FRAMINGS)}; --n 1..100", file=sys.stderr)
        return 2
    print(f"machine: {load_line()}" + "".join(f"; {o}" for o in args.daemon_option), flush=True)
    options = dict(o.split("=", 1) for o in args.daemon_option if "=" in o)
    results = []
    with tempfile.TemporaryDirectory(prefix="upvoot-bench-") as tmp:
        daemon = Daemon(Path(tmp), shipped_ini(**{"max_calls": "4", **options}) + AGENTS)
        try:
            t0 = time.monotonic()
            daemon.start(timeout=240)  # every agent's replies are synthesized at start
            print(f"daemon: pid {daemon.proc.pid}, ws://127.0.0.1:{daemon.port}, ready in {time.monotonic() - t0:.1f} s "
                  f"(shipped etc/upvoot.ini + the story agent, state in {tmp})", flush=True)
            key = daemon.key(agent="story", account="bench-bargein", points=100000)
            synthesize("Tell me a story please.")  # load the voice before the first call
            for framing in framings:
                try:
                    results.append(run_framing(daemon, key, framing, args.n, args.verbose))
                except Exception:  # noqa: BLE001 - report and go on with the next framing
                    traceback.print_exc()
                    results.append({"framing": framing, "error": "crashed"})
        finally:
            daemon.stop()
    report(results, args.n)
    ok = all("error" not in r and all("error" not in x and x["lossless"] for x in r["rows"]) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
