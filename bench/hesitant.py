"""Turn policies on hesitant and complete sentences: cut-offs and waits.

Builds a set of caller utterances:

- *hesitant*: a sentence with a 400-900 ms pause spliced in where it is
  clearly unfinished ("I'd like to book a table for ... four people."). The
  whole sentence is spoken, then cut at the word boundary (found by Whisper's
  word timestamps, at the quietest 20 ms between the two words, moved back
  until the prefix and 300 ms of noise are transcribed as exactly the words
  before the pause: no onset of the next word is left in it; a sentence
  where no such cut is found is left out, and counted), so the words
  before the pause keep the intonation of a sentence going on;
- *complete*: the same sentences whole, and a few short complete ones.

Voices: the shipped piper voice at three speaking rates, espeak-ng at three
rates, and the real recorded speech of ../shared/speech (clean/ and phone/:
a pause spliced in where the sentence is clearly unfinished, and every
utterance whole). Light noise (-60 dBFS; for a recording, its own quietest
level) fills every silence, as a phone line would.

Each turn policy runs over every clip through the real endpointer and turn
policy (``upvoot.call.turns.TurnTaker``, the energy VAD of the shipped demo
agent) and, for ``smart``, the real smart-turn model: the audio is fed frame
by frame on a task.Clock, and each model answer arrives on that clock after
the wall time its inference really took on this machine (so the waits
include the model's cost under the machine's load). Printed: the cut-offs
(the turn ended inside the pause of an unfinished sentence, or before the
end of a complete one) per policy in %, and the wait from the end of a
complete sentence's speech (energy) to the end of the turn, p50/p95.

    .venv/bin/python bench/hesitant.py [--vad energy|silero|webrtc] [--no-real]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from upvoot._env import set_offline_environment  # noqa: E402

set_offline_environment()

import attrs  # noqa: E402
import numpy as np  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from upvoot import audio  # noqa: E402
from upvoot.audio import FRAME_BYTES  # noqa: E402
from upvoot.call.hearing import Ear, Ended  # noqa: E402
from upvoot.call.turns import TurnTaker  # noqa: E402
from upvoot.daemon.workers import SynchronousPool  # noqa: E402
from upvoot.engines import get_factory  # noqa: E402
from upvoot.engines.interfaces import EngineContext  # noqa: E402

SPEECH = REPO.parent / "shared" / "speech"
RATE = 16000
PAUSES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: (the words before the pause, the rest): unfinished at the cut.
HESITANT = (
    ("I'd like to book a table for", "four people tonight."),
    ("My account number is", "seven three nine two."),
    ("Can you tell me the opening hours of", "the shop on Station Road?"),
    ("I was wondering if", "you could help me with my bill."),
    ("The problem started when", "I changed my password."),
    ("I need to speak to someone about", "my last invoice."),
    ("Could you send the documents to", "my new address?"),
    ("We are looking for a flight from Boston to", "Chicago on Friday."),
)
COMPLETE = ("What are your opening hours?", "Yes, that's right.", "No thank you, goodbye.",
            "Where are you located?")
#: Real recordings: how many words come before the pause (only where the cut is clearly unfinished).
REAL_CUTS = {
    "go forward ten meters": 2, "ten of clubs": 2, "seven of clubs": 2, "four queen of clubs": 3,
    "eight of spades four of clubs seven of hearts": 5, "he was not an ill disposed young man": 4,
    "unless to be rather cold hearted and rather selfish is to be ill disposed": 7,
    "he might even have been made amiable himself": 5,
    "had he married a more a amiable woman he might have been made still more respectable than he was": 11,
    "and mister john dashwood had then leisure to consider how much there might be prudently in his power "
    "to do for them": 6,
}


@attrs.frozen
class Clip:
    name: str
    pcm: bytes  # 16 kHz, with lead-in and 3.5 s of trailing noise
    speech_end: float  # seconds: the end of the last word (energy)
    pause: tuple[float, float] | None  # the spliced pause (start, end) of a hesitant clip


def noise(seconds: float, dbfs: float, seed: int, n: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE)) if n is None else n
    return (rng.standard_normal(n) * (10 ** (dbfs / 20)) * 32768).astype(np.float32)


def floor_dbfs(x: np.ndarray) -> float:
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) / 32768 + 1e-9
    return float(20 * np.log10(np.percentile(rms, 10)))


def speech_end(x: np.ndarray) -> float:
    """The end of the last 20 ms frame within 35 dB of the loudest."""
    frames = x[: len(x) // 320 * 320].reshape(-1, 320).astype(np.float64)
    level = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-9)
    loud = np.nonzero(level > level.max() - 35)[0]
    return (loud[-1] + 1) * 0.02


def cut_point(x: np.ndarray, words: list, k: int) -> int | None:
    """The sample between word k-1 and word k where the audio is quietest."""
    if k >= len(words):
        return None
    a, b = words[k - 1].end, words[k].start
    lo, hi = int((min(a, b) - 0.06) * RATE), int((max(a, b) + 0.06) * RATE)
    lo, hi = max(lo, 0), min(hi, len(x) - 320)
    if hi <= lo:
        return int(a * RATE)
    energy = [float((x[i:i + 320].astype(np.float64) ** 2).mean()) for i in range(lo, hi, 40)]
    return lo + 40 * int(np.argmin(energy)) + 160


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def checked_cut(x: np.ndarray, words: list, k: int, before: str, transcribe, floor_dbfs: float,
                seed: int) -> int | None:
    """A cut after word k-1 whose prefix holds exactly the words before the
    pause: Whisper's word times are off by tens of milliseconds, and a cut
    that keeps the onset of the next word ("for f|our", "to Ch|icago")
    makes a clip that is not what it claims (the prefix is heard as "...
    for four.", "... to Sh-"). From the quietest point, the cut moves back
    in 20 ms steps (up to 300 ms, never into word k-1) until the prefix,
    followed by 300 ms of the clip's noise (what the end-of-turn decision
    hears), is transcribed as exactly the words before the pause (a
    trailing "..." or "-" allowed); None when no such cut is found (the
    clip is left out, and counted)."""
    cut = cut_point(x, words, k)
    if cut is None:
        return None
    want = _words(before)
    floor = int(words[k - 1].start * RATE) if words[k - 1].start is not None else 0
    tail = noise(0.3, floor_dbfs, seed)
    for step in range(16):
        at = cut - step * 320
        if at <= floor:
            break
        heard = _words(transcribe(np.concatenate([x[:at], tail])))
        if len(heard) == len(want) and heard[-1] == want[-1]:
            return at
    return None


def assemble(name: str, x: np.ndarray, floor: float, seed: int, cut: int | None = None, pause: float = 0.0) -> Clip:
    lead = noise(0.5, floor, seed)
    if cut is not None:
        gap = noise(pause, floor, seed + 1)
        body = np.concatenate([x[:cut], gap, x[cut:]])
    else:
        body = x
    tail = noise(3.5, floor, seed + 2)
    out = np.concatenate([lead, body + noise(0, floor, seed + 3, n=len(body)), tail])
    pcm = np.clip(out, -32768, 32767).astype("<i2").tobytes()
    spans = (0.5 + cut / RATE, 0.5 + cut / RATE + pause) if cut is not None else None
    return Clip(name, pcm, 0.5 + speech_end(body), spans)


def build_set(real: bool) -> tuple[list[Clip], dict]:
    from faster_whisper import WhisperModel

    from upvoot.engines.whisper import bundled_model_path

    whisper = WhisperModel(bundled_model_path(), device="cpu", compute_type="int8", cpu_threads=2)

    def words_of(x: np.ndarray) -> list:
        segments, _ = whisper.transcribe(x / 32768.0, language="en", beam_size=1, word_timestamps=True,
                                         condition_on_previous_text=False, vad_filter=False)
        return [w for s in segments for w in (s.words or [])]

    def text_of(x: np.ndarray) -> str:
        segments, _ = whisper.transcribe(x / 32768.0, language="en", beam_size=1, condition_on_previous_text=False,
                                         without_timestamps=True, vad_filter=False)
        return " ".join(s.text for s in segments)

    ctx = EngineContext(pool=SynchronousPool(), clock=None)
    voices = []
    piper = get_factory("tts", "piper")
    for scale in ("0.85", "1.0", "1.25"):
        tts = piper.build(piper.parse_options({"length_scale": scale, "noise_scale": "0.5", "noise_w_scale": "0.6"},
                                              "."), ctx)
        voices.append((f"piper{scale}", tts.synthesize_sync))
    espeak = get_factory("tts", "espeak")
    for rate in ("140", "175", "220"):
        tts = espeak.build(espeak.parse_options({"rate": rate}, "."), ctx)
        voices.append((f"espeak{rate}", tts.synthesize_sync))
    clips: list[Clip] = []
    skipped = 0
    seed = 0
    for voice, say in voices:
        for first, rest in HESITANT:
            seed += 10
            x = audio.to_int16(say(f"{first} {rest}")).astype(np.float32)
            clips.append(assemble(f"{voice}: {first} {rest}", x, -60.0, seed))
            cut = checked_cut(x, words_of(x), len(first.split()), first, text_of, -60.0, seed + 7)
            if cut is None:
                skipped += 1
                continue
            pause = PAUSES[seed // 10 % len(PAUSES)]
            clips.append(assemble(f"{voice}: {first} ... {rest}", x, -60.0, seed + 5, cut, pause))
        for text in COMPLETE:
            seed += 10
            x = audio.to_int16(say(text)).astype(np.float32)
            clips.append(assemble(f"{voice}: {text}", x, -60.0, seed))
    if real and SPEECH.is_dir():
        manifest = json.loads((SPEECH / "manifest.json").read_text())
        for utt in manifest["utterances"]:
            for condition in ("clean", "phone"):
                files = utt["files"]
                rel = files.get(condition) if isinstance(files, dict) else None
                path = SPEECH / rel if rel else SPEECH / condition / f"{utt['id']}.wav"
                if not path.is_file():
                    continue
                seed += 10
                x = audio.to_int16(audio.read_wav(str(path))).astype(np.float32)
                floor = max(floor_dbfs(x), -70.0)
                clips.append(assemble(f"real/{condition}: {utt['text']}", x, floor, seed))
                k = REAL_CUTS.get(utt["text"])
                if k is None:
                    continue
                cut = checked_cut(x, words_of(x), k, " ".join(utt["text"].split()[:k]), text_of, floor, seed + 7)
                if cut is None:
                    skipped += 1
                    continue
                pause = PAUSES[seed // 10 % len(PAUSES)]
                words = utt["text"].split()
                clips.append(assemble(f"real/{condition}: {' '.join(words[:k])} ... {' '.join(words[k:])}", x, floor,
                                      seed + 5, cut, pause))
    return clips, {"skipped": skipped}


class TimedPool:
    """Runs the model inline, and answers on the clock after the wall time it took."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []

    def run(self, fn, *args, interim: bool = False, urgent: bool = False) -> defer.Deferred:
        t = time.perf_counter()
        result = fn(*args)
        took = time.perf_counter() - t
        self.times.append(took)
        d = defer.Deferred()
        self.clock.callLater(took, d.callback, result)
        return d


class TimedSTT:
    """The agent's speech-to-text (the shipped whisper engine) on a ``TimedPool``."""

    def __init__(self, pool: TimedPool) -> None:
        self.pool = pool
        factory = get_factory("stt", "whisper")
        self.engine = factory.build(factory.parse_options({}, "."), EngineContext(pool=pool, clock=None))

    def transcribe(self, pcm: bytes, final: bool) -> defer.Deferred:
        return self.engine.transcribe(pcm, final)

    def took(self, pcm: bytes) -> float:
        t = time.perf_counter()
        self.engine.transcribe_sync(pcm)
        return time.perf_counter() - t


class Probe:
    """What the model and the speech-to-text answered during one clip (for
    ``--verbose``): wraps either, passing every call through."""

    def __init__(self, inner, method: str) -> None:
        self.inner, self.method, self.seen = inner, method, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _call(self, *args):
        d = getattr(self.inner, self.method)(*args)

        def keep(result):
            self.seen.append(result)
            return result

        return d.addCallback(keep)

    def predict(self, pcm: bytes):
        return self._call(pcm)

    def transcribe(self, pcm: bytes, final: bool):
        return self._call(pcm, final) if final else self.inner.transcribe(pcm, final)  # finals only

    def said(self) -> str:
        """The answers, oldest first: probabilities as 0.00, transcripts quoted."""
        return ", ".join(f"{x:.2f}" if isinstance(x, float) else repr(getattr(x, "text", x)) for x in self.seen)


@attrs.frozen
class Policy:
    name: str
    turn: str
    end_of_turn: float = 0.6
    turn_pause: float = 0.2
    turn_transcribe_after: float = 0.1
    turn_max_pause: float = 2.5
    turn_unfinished_pause: float = 0.7
    min_utterance: float = 0.25
    max_utterance: float = 20.0
    barge_in_min: float = 0.3


def run(policy: Policy, clip: Clip, vad, model, pool: TimedPool, stt: TimedSTT) -> tuple:
    """When (seconds into the clip) the policy ended the first turn, and
    when its transcript was known (the reply could begin)."""
    clock = pool.clock = stt.pool.clock = Clock()
    ended: list[float] = []
    ready: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, Ended):
            spec, _ = turns.ended()
            now = clock.seconds()
            ended.append(now)
            if spec is None:  # transcribed from here
                ready.append(now + stt.took(event.pcm))
                return
            for _ in range(1000):
                if spec.settled:
                    break
                clock.advance(0.01)
            ready.append(max(now, spec.transcribed_at or now))
        elif type(event).__name__ in ("Quieted", "Paused", "Resumed"):
            turns.heard(event)
        elif type(event).__name__ == "Discarded":
            turns.cancel()

    model, stt_probe = (Probe(model, "predict") if model is not None else None), Probe(stt, "transcribe")
    run.last = (model, stt_probe)
    turns = TurnTaker(clock, policy, model if policy.turn == "smart" else None, stt_probe, on_event)
    ear = Ear(vad.new_detector(), turns.endpointer)
    for i in range(len(clip.pcm) // FRAME_BYTES):
        for event in ear.hear(clip.pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]):
            on_event(event)
        clock.advance(0.02)
        if ended:
            return ended[0], ready[0]
    return None, None


def said(probes: tuple) -> str:
    model, stt = probes
    parts = ([f"model {model.said()}"] if model is not None and model.seen else []) + (
        [f"heard {stt.said()}"] if stt.seen else [])
    return f": {'; '.join(parts)}" if parts else ""


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vad", default="energy", choices=("energy", "silero", "webrtc"))
    parser.add_argument("--no-real", action="store_true", help="leave out ../shared/speech")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--only", help="only the clips whose name starts with this (piper, espeak, real)")
    parser.add_argument("--cache", help="keep the built set in this file (pickle) and reuse it")
    parser.add_argument("--transcribe-after", type=float, default=0.1, metavar="SECONDS",
                        help="smart's turn_transcribe_after (default 0.1; 0.2 = with the model, at turn_pause)")
    parser.add_argument("--unfinished-pause", default="0.7", metavar="SECONDS[,SECONDS...]",
                        help="smart's turn_unfinished_pause: the silence that ends a turn the model says is not "
                             "finished (default 0.7; several, comma-separated: one smart policy each)")
    args = parser.parse_args()
    import pickle

    from upvoot.engines import smartturn

    t0 = time.perf_counter()
    if args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as f:
            clips, info = pickle.load(f)
    else:
        clips, info = build_set(real=not args.no_real)
        if args.cache:
            with open(args.cache, "wb") as f:
                pickle.dump((clips, info), f)
    if args.only:
        clips = [c for c in clips if c.name.startswith(args.only)]
    hesitant = [c for c in clips if c.pause is not None]
    complete = [c for c in clips if c.pause is None]
    print(f"set: {len(hesitant)} hesitant, {len(complete)} complete clips ({info['skipped']} cuts not found), "
          f"built in {time.perf_counter() - t0:.0f}s")
    clock = Clock()
    vad_factory = get_factory("vad", args.vad)
    vad = vad_factory.build(vad_factory.parse_options({}, "."), EngineContext(pool=SynchronousPool(), clock=clock))
    policies = (Policy("silence 600ms", "silence"),
                *(Policy(f"smart 0.2s/2.5s (transcribed from {args.transcribe_after:g}s, unfinished {float(u):g}s)",
                         "smart", turn_transcribe_after=args.transcribe_after, turn_unfinished_pause=float(u))
                  for u in args.unfinished_pause.split(",")))
    for policy in policies:
        pool, stt_pool = TimedPool(clock), TimedPool(clock)
        model = smartturn.load(EngineContext(pool=pool, clock=clock))
        stt = TimedSTT(stt_pool)
        cut, waits, late, cut_complete, heard, maxed = [], [], [], [], [], 0
        for clip in hesitant:
            end, _ = run(policy, clip, vad, model, pool, stt)
            early = end is not None and end < clip.pause[1] + 0.04
            cut.append(early)
            if args.verbose and early:
                print(f"  cut off: {clip.name} (ended {end:.2f}s, pause {clip.pause[0]:.2f}-{clip.pause[1]:.2f}s)"
                      f"{said(run.last)}")
            if not early and end is not None:
                late.append(end - clip.speech_end)
        for clip in complete:
            end, known = run(policy, clip, vad, model, pool, stt)
            early = end is not None and end < clip.speech_end - 0.1
            cut_complete.append(early)
            if args.verbose and early:
                print(f"  early: {clip.name} (ended {end:.2f}s, speech to {clip.speech_end:.2f}s){said(run.last)}")
            if not early and end is not None:
                waits.append(end - clip.speech_end)
                if args.verbose and end - clip.speech_end > 1.0:
                    print(f"  waited {end - clip.speech_end:.2f}s: {clip.name}")
                heard.append(known - clip.speech_end)
                maxed += end - clip.speech_end > policy.turn_max_pause - 0.1 and policy.turn == "smart"
        inference = f", model {percentile(pool.times, 50) * 1000:.0f} ms p50" if pool.times else ""
        print(f"{policy.name:16s} cut-offs: hesitant {100 * sum(cut) / len(cut):5.1f}% ({sum(cut)}/{len(cut)}), "
              f"complete ended early {100 * sum(cut_complete) / len(cut_complete):4.1f}%; "
              f"wait after complete sentences p50 {percentile(waits, 50) * 1000:.0f} ms, "
              f"p95 {percentile(waits, 95) * 1000:.0f} ms (after hesitant ones p50 {percentile(late, 50) * 1000:.0f} ms)"
              f"{inference}")
        print(f"{'':16s} complete sentences: transcript known p50 {percentile(heard, 50) * 1000:.0f} ms, "
              f"p95 {percentile(heard, 95) * 1000:.0f} ms after the end of speech (the reply can begin); "
              f"{maxed} of {len(waits)} waited the maximum pause")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")


if __name__ == "__main__":
    main()
