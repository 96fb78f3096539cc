"""Word error of Whisper's short-window decode against the padded one.

On the same clips, decodes each twice: ``padded`` (faster-whisper's own
30 s window, what UpVoot did before) and ``short`` (a window of the clip's
length with its guards, falling back to the padded decode when a guard
fails: what the engine now does). Clips:

- ``piper`` / ``espeak``: phone-call sentences and short answers ("Yes.",
  "No, thanks.") by the shipped piper voice at three rates and by espeak-ng
  at two, with 0.5 s before and 0.3 s after (what the endpointer hands over);
- each of those again in phone band (``*-phone``: 8 kHz, G.711 mu-law
  encode and decode, back to 16 kHz the way the daemon brings an 8 kHz
  caller in, ``upvoot.framing.convert.Decoder``, whose upsampler is
  ``upvoot.audio.LowLagResampler``); with ``--soxr-phone`` also
  ``*-phone-soxr``, the same mu-law audio brought back with soxr HQ (what
  the decoder used before), to compare the two filters on the same clips;
- ``../shared/speech``: real recorded speech, ``clean``, ``phone`` and
  ``phone_noisy`` as shipped there.

Prints, per group: clips, words, WER of each decode, the fallback rate and
its reasons, and decode time p50/p95 of each; then the cost of interim
decodes (prefixes of the clean clips every 0.4 s, as a growing utterance
is re-decoded) the short way and the padded way. ``--sweep`` also tries
other short-window settings (pad, minimum window, no-repeat n-gram size),
with the padded decode as fallback, to show why the defaults are what they
are.

Run: python bench/wer.py [--sweep] [--no-interims] [--soxr-phone] [--before SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from upvoot._env import set_offline_environment  # noqa: E402

set_offline_environment()


from upvoot import audio  # noqa: E402
from upvoot.call.hearing import PRE_ROLL  # noqa: E402
from upvoot.engines import espeak, piper, whisper, whisper_window  # noqa: E402
from upvoot.engines.interfaces import EngineContext  # noqa: E402
from upvoot.framing.g711 import ulaw_decode, ulaw_encode  # noqa: E402
from upvoot.framing.convert import Decoder  # noqa: E402

SPEECH = REPO.parent / "shared" / "speech"

SENTENCES = (
    "What time do you open tomorrow?",
    "I would like to book a table for four people on Friday evening, please.",
    "Can you tell me where the nearest station is?",
    "My order has not arrived yet and I am getting worried about it.",
    "Could I speak to someone about my bill?",
    "I need to change my appointment to next Tuesday afternoon.",
    "Is the pharmacy on the high street still open?",
    "Please send me the details by email.",
    "Yes.",
    "No, thanks.",
    "Okay.",
    "Thank you very much.",
    "Goodbye.",
)
PIPER_RATES = ("0.8", "1.0", "1.25")  # length_scale: fast, normal, slow
ESPEAK_RATES = ("150", "210")  # words per minute

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SAME = {"mr": "mister", "mrs": "missus", "dr": "doctor", "ok": "okay", "st": "street"}


def _number(digits: str) -> list[str]:
    n = int(digits)
    if len(digits) > 2 or digits.startswith("0") and len(digits) > 1:
        return [_ONES[int(d)] for d in digits]  # phone numbers, "2934": digit by digit
    if n < 20:
        return [_ONES[n]]
    return [_TENS[n // 10 - 2]] + ([_ONES[n % 10]] if n % 10 else [])


def normalize(text: str) -> list[str]:
    """Lower-case words, punctuation dropped, numbers spelled out."""
    out: list[str] = []
    for w in re.findall(r"[a-z0-9']+", text.lower().replace("-", " ")):
        w = w.strip("'")
        if w.isdigit():
            out += _number(w)
        elif w:
            out.append(_SAME.get(w, w))
    return out


def edits(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def phone_band(pcm: bytes, soxr: bool = False) -> bytes:
    """8 kHz, G.711 mu-law encode and decode, back to 16 kHz: by the
    daemon's own inbound decoder, or (``soxr``) by soxr HQ."""
    wire = ulaw_encode(audio.resample(pcm, audio.RATE, 8000))
    if soxr:
        return audio.resample(ulaw_decode(wire).astype("<i2").tobytes(), 8000, audio.RATE)
    decoder = Decoder("mulaw", 8000)
    return decoder.feed(bytes(wire)) + decoder.flush()


def framed(pcm: bytes, seed: int, before: float = PRE_ROLL) -> bytes:
    """``before`` (the endpointer's pre-roll, ``PRE_ROLL``: 0.5 s) and 0.3 s after, in a faint line noise."""
    return audio.noise(before, -65, seed=seed) + pcm + audio.noise(0.3, -65, seed=seed + 1)


def synthetic_clips(ctx, soxr_phone: bool = False, before: float = PRE_ROLL) -> list[tuple[str, str, str, bytes]]:
    """(group, name, reference, pcm) for piper and espeak, clean and phone."""
    voices = []
    for rate in PIPER_RATES:
        tts = piper.factory.build(piper.factory.parse_options({"length_scale": rate}, "."), ctx)
        voices.append(("piper", f"piper@{rate}", tts))
    if shutil.which("espeak-ng"):
        for rate in ESPEAK_RATES:
            tts = espeak.factory.build(espeak.factory.parse_options({"rate": rate}, "."), ctx)
            voices.append(("espeak", f"espeak@{rate}", tts))
    else:
        print("espeak-ng is not installed: no espeak clips")
    clips = []
    for group, voice, tts in voices:
        for i, text in enumerate(SENTENCES):
            pcm = framed(tts.synthesize_sync(text), seed=i, before=before)
            clips.append((group, f"{voice}:{i}", text, pcm))
            clips.append((group + "-phone", f"{voice}:{i}", text, phone_band(pcm)))
            if soxr_phone:
                clips.append((group + "-phone-soxr", f"{voice}:{i}", text, phone_band(pcm, soxr=True)))
    return clips


def shared_clips() -> list[tuple[str, str, str, bytes]]:
    manifest = SPEECH / "manifest.json"
    if not manifest.exists():
        print(f"no {manifest}: no recorded speech")
        return []
    clips = []
    for u in json.loads(manifest.read_text())["utterances"]:
        for condition, rel in u["files"].items():
            clips.append((f"real-{condition}", u["id"], u["text"], audio.read_wav(str(SPEECH / rel))))
    return clips


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run(stt, clips) -> list[dict]:
    rows = []
    for i, (group, name, ref, pcm) in enumerate(clips):
        if i % 20 == 0:
            print(f"  decoding clip {i + 1}/{len(clips)}", file=sys.stderr, flush=True)
        t_pad, padded = timed(stt.padded_sync, pcm)
        t_short, dec = timed(stt.decode_sync, pcm)
        rows.append(dict(group=group, name=name, ref=ref, pcm=pcm, padded=padded, t_padded=t_pad,
                         short=dec.text, path=dec.path, reason=dec.reason, t_short=t_short))
    return rows


def wer_of(rows, key) -> tuple[int, int]:
    errs = sum(edits(normalize(r["ref"]), normalize(r[key])) for r in rows)
    return errs, sum(len(normalize(r["ref"])) for r in rows)


def report(rows) -> None:
    groups = sorted({r["group"] for r in rows}, key=lambda g: [r["group"] for r in rows].index(g))
    print(f"\n{'group':<18}{'clips':>6}{'words':>6}  {'WER padded':>10}  {'WER short':>9}  "
          f"{'wide':>5} {'fallback':>8}  {'padded p50/p95':>15}  {'short p50/p95':>15}")
    for g in groups + ["all"]:
        sel = [r for r in rows if g in ("all", r["group"])]
        ep, n = wer_of(sel, "padded")
        es, _ = wer_of(sel, "short")
        fb = sum(r["path"] == "fallback" for r in sel)
        wide = sum(r["path"] == "wide" for r in sel)
        tp = [r["t_padded"] for r in sel]
        ts = [r["t_short"] for r in sel]
        print(f"{g:<18}{len(sel):>6}{n:>6}  {100 * ep / n:>9.1f}%  {100 * es / n:>8.1f}%  "
              f"{100 * wide / len(sel):>4.0f}% {100 * fb / len(sel):>7.0f}%  "
              f"{pct(tp, 50) * 1000:>6.0f}/{pct(tp, 95) * 1000:>4.0f} ms  "
              f"{pct(ts, 50) * 1000:>6.0f}/{pct(ts, 95) * 1000:>4.0f} ms")
    reasons: dict[str, int] = {}
    for r in rows:
        if r["reason"]:
            key = f"{r['path']}:{r['reason']}"  # wide: the 15 s window passed; fallback: padded
            reasons[key] = reasons.get(key, 0) + 1
    print("short window failures (then):", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none")
    short_only = [r for r in rows if r["path"] == "short"]
    tso = [r["t_short"] for r in short_only]
    print(f"short windows kept: {len(short_only)}/{len(rows)}, their decode time p50 {pct(tso, 50) * 1000:.0f} ms, "
          f"p95 {pct(tso, 95) * 1000:.0f} ms")
    diffs = [r for r in rows if normalize(r["padded"]) != normalize(r["short"])]
    print(f"\nclips where the two differ ({len(diffs)}):")
    for r in diffs:
        print(f"  {r['group']:<14} {r['name']:<22} ref {r['ref']!r}\n{'':<40}padded {r['padded']!r}\n"
              f"{'':<40}short  {r['short']!r} ({r['path']}{', ' + r['reason'] if r['reason'] else ''})")


def interims(stt, rows, step: float = 0.4, padded_samples: int = 24) -> None:
    """Prefixes of the clean clips, as a growing utterance is re-decoded."""
    prefixes = []
    for r in rows:
        if r["group"] in ("piper", "espeak", "real-clean"):
            pcm = r["pcm"]
            n = int(step * audio.BYTES_PER_SECOND)
            prefixes += [pcm[:k] for k in range(2 * n, len(pcm), n)]
    t_short, paths, t_pad = [], [], []
    every = max(1, len(prefixes) // padded_samples)
    for i, p in enumerate(prefixes):
        t, dec = timed(stt.decode_sync, p)
        t_short.append(t)
        paths.append(dec.path)
        if i % every == 0:  # interleaved, so both see the same machine load
            t_pad.append(timed(stt.padded_sync, p)[0])
    fb = paths.count("fallback")
    print(f"\ninterim decodes ({len(prefixes)} prefixes, 0.8 s and up, every {step} s of the clean clips):")
    print(f"  short (fallback included): p50 {pct(t_short, 50) * 1000:.0f} ms, p95 {pct(t_short, 95) * 1000:.0f} ms, "
          f"fallback {100 * fb / len(prefixes):.0f}%")
    print(f"  padded ({len(t_pad)} of them): p50 {pct(t_pad, 50) * 1000:.0f} ms, p95 {pct(t_pad, 95) * 1000:.0f} ms")


def sweep(stt, rows) -> None:
    """Other short-window settings, the padded text as fallback (already known)."""
    model = stt.model
    print(f"\n{'pad':>5} {'min window':>10} {'no-repeat':>9}  {'WER':>6}  {'fallback':>8}  {'short p50/p95':>14}")
    for pad, min_window, no_repeat in ((0.5, 0.0, 0), (1.0, 0.0, 0), (0.5, 3.0, 0), (0.5, 5.0, 0),
                                       (0.5, 8.0, 0), (0.5, 10.0, 0), (0.5, 10.0, 3), (0.5, 10.0, 5)):
        dec = whisper_window.ShortWindowDecoder(model, "en", stt.settings.beam_size, min_window=min_window,
                                                pad=pad, no_repeat_ngram_size=no_repeat)
        errs = words = fb = 0
        times = []
        for r in rows:
            t, res = timed(dec.decode, audio.to_float32(r["pcm"]))
            times.append(t)
            text = r["padded"] if res.bad else res.text
            fb += res.bad is not None
            ref = normalize(r["ref"])
            errs += edits(ref, normalize(text))
            words += len(ref)
        print(f"{pad:>5} {min_window:>10} {no_repeat:>9}  {100 * errs / words:>5.1f}%  {100 * fb / len(rows):>7.0f}%  "
              f"{pct(times, 50) * 1000:>6.0f}/{pct(times, 95) * 1000:>4.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also try other short-window settings")
    parser.add_argument("--no-interims", action="store_true")
    parser.add_argument("--soxr-phone", action="store_true",
                        help="also the phone-band clips brought back to 16 kHz by soxr HQ instead of the daemon's decoder")
    parser.add_argument("--before", type=float, default=PRE_ROLL, metavar="SECONDS",
                        help=f"line noise before each synthetic clip (default {PRE_ROLL}, the endpointer's pre-roll)")
    args = parser.parse_args()
    ctx = EngineContext(pool=None, clock=None)  # the *_sync methods need no pool
    stt = whisper.factory.build(whisper.factory.parse_options({}, "."), ctx)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    s = stt.settings
    print(f"whisper tiny.en {s.compute_type}, beam {s.beam_size}, cpu_threads {s.cpu_threads}; short window: "
          f"clip + {whisper_window.PAD_SECONDS} s, at least {whisper_window.MIN_WINDOW_SECONDS} s, "
          f"no-repeat {whisper_window.NO_REPEAT_NGRAM_SIZE}, cap {whisper_window.TOKENS_PER_SECOND}/s + "
          f"{whisper_window.TOKENS_EXTRA} tokens")
    clips = synthetic_clips(ctx, args.soxr_phone, args.before) + shared_clips()
    stt.padded_sync(clips[0][3])  # warm up
    stt.decode_sync(clips[0][3])
    rows = run(stt, clips)
    report(rows)
    if not args.no_interims:
        interims(stt, rows)
    if args.sweep:
        sweep(stt, rows)
    print(f"\nuptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
