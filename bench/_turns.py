"""Shared pieces of bench/turns.py and bench/capacity.py: caller turns in
several voices, the end of the caller's speech found by energy in the audio
the caller actually played, and the daemon's per-stage split of each turn.

- ``turn_clips``: questions the demo agent's rules answer, spoken by the
  shipped piper voice and by espeak-ng at two rates, and real recorded
  speech from ``../shared/speech/clean`` (relative to the repository; the
  agent answers those with its fallback line), each with silence around it.
- ``PlayedCaller``: ``bench._common.QuestionCaller`` that keeps every 20 ms
  frame it handed to the line with its send time. ``played_end(turn)``
  finds the end of the turn's speech in that audio, after the framing's
  band limit (Exotel 8 kHz: resampled to 8 kHz first): the end of the last
  5 ms block above ``SPEECH_END_DBFS`` (or 10 dB above a recording's own
  background, ``speech_threshold``), as a time on the call's clock.
- ``with_agent_options``: an ini text with options of ``[agent:demo]`` set
  (the turn policy, ``turn = silence|smart``).
- ``server_split``: a call record's per-turn latencies with today's keys
  (``upvoot.call.outcome.read_latency``), paired with our turns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Sequence

import numpy as np

from bench._common import QUESTIONS, REPO, SPEECH_END_DBFS, Clip, QuestionCaller, TurnTiming, _loud_span, _vad_end
from bench._common import pair_latencies as _pair
from upvoot import audio
from upvoot.audio import FRAME_BYTES
from upvoot.call.outcome import LATENCY_KEYS, read_latency

SHARED_SPEECH = REPO.parent / "shared" / "speech"

#: More piper sentences the rules answer (the questions of bench._common come first).
MORE_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Are you open on Saturday morning?", "nine in the morning"),
    ("How do I find your office from the station?", "Station Road"),
    ("I would like to talk to a person.", "automated assistant"),
)
#: Recorded utterances used (ids of ../shared/speech/manifest.json): sentences and short phrases.
RECORDED = ("ps_goforward", "ps_librivox_0880", "ps_librivox_0930", "ps_cards_005", "ps_cards_002",
            "ps_digits_dhd_2934z", "alsa_front_left", "alsa_rear_right")
#: The framings measured, and the sample rate their caller audio is limited to.
FRAMINGS = {"raw": 16000, "exotel": 8000}

APOLOGY = "Sorry, I had a problem there. Could you say that again?"


# ---- the caller's audio ---------------------------------------------------------------------------


def clip_of(text: str, expect: str, speech: bytes, voice: str, before: float = 0.5, after: float = 0.3) -> Clip:
    lead = bytes(int(round(before / 0.02)) * FRAME_BYTES)
    tail = bytes(int(round(after / 0.02)) * FRAME_BYTES)
    pcm = lead + speech + tail
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    start, end = _loud_span(speech)
    clip = Clip(text, expect, pcm, len(lead) + start, len(lead) + end, _vad_end(pcm))
    VOICE_OF[id(clip)] = voice
    return clip


#: id(clip) -> "piper" | "espeak 150" | "recorded" (Clip is frozen and shared with bench._common)
VOICE_OF: dict[int, str] = {}


def voice_of(clip: Clip) -> str:
    return VOICE_OF.get(id(clip), "piper")


def espeak_speech(text: str, words_per_minute: int = 160, voice: str = "en-us") -> bytes:
    """``text`` spoken by espeak-ng, 16 kHz mono s16le."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.wav")
        subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", out, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return audio.read_wav(out)


def recorded_speech(ids: Sequence[str] = RECORDED) -> list[tuple[str, bytes]]:
    """(reference text, 16 kHz audio) of the recorded utterances found; [] without ../shared/speech."""
    manifest = SHARED_SPEECH / "manifest.json"
    if not manifest.exists():
        return []
    by_id = {u["id"]: u for u in json.loads(manifest.read_text())["utterances"]}
    wanted = [by_id[i] for i in ids if i in by_id] or list(by_id.values())[: len(ids)]
    return [(u["text"], audio.read_wav(str(SHARED_SPEECH / u["files"]["clean"]))) for u in wanted]


def turn_clips(espeak_rates: Sequence[int] = (150, 200)) -> list[Clip]:
    """Piper questions, espeak-ng questions at each rate, recorded speech (in that order)."""
    from tests.daemon import synthesize

    questions = QUESTIONS + MORE_QUESTIONS
    clips = [clip_of(text, expect, synthesize(text), "piper") for text, expect in questions]
    if shutil.which("espeak-ng") or shutil.which("espeak"):
        for rate in espeak_rates:
            clips += [clip_of(text, expect, espeak_speech(text, rate), f"espeak {rate}") for text, expect in questions]
    clips += [clip_of(text, "", pcm, "recorded") for text, pcm in recorded_speech()]
    return clips


def interleave(clips: Sequence[Clip], calls: int) -> list[list[Clip]]:
    """``clips`` dealt to ``calls`` calls in turn, so each call hears every voice."""
    return [list(clips[i::calls]) for i in range(calls)]


# ---- the caller, and where its speech really ended ------------------------------------------------------


#: A recording's background counts as a noise floor only when quieter than this.
FLOOR_MAX_DBFS = -45.0


def speech_threshold(db: np.ndarray) -> float:
    """The level (dBFS) above which a 5 ms block of ``db`` is speech:
    ``SPEECH_END_DBFS``, or 10 dB above the recording's own background where
    that is louder: the quieter of its first and last 50 ms of sound (not
    digital silence), counted when quieter than ``FLOOR_MAX_DBFS`` (louder
    edges are the voice itself: synthetic voices start and stop on speech)."""
    sound = np.nonzero(db > -90.0)[0]
    if len(sound) < 20:
        return SPEECH_END_DBFS
    floor = min(float(np.median(db[sound[0]:sound[0] + 10])), float(np.median(db[sound[-1] - 9:sound[-1] + 1])))
    return SPEECH_END_DBFS if floor > FLOOR_MAX_DBFS else max(SPEECH_END_DBFS, floor + 10.0)


def last_loud_sample(pcm: bytes, rate: int) -> int | None:
    """Index (at 16 kHz) just past the last 5 ms block of ``pcm`` (16 kHz)
    above ``speech_threshold`` once band-limited to ``rate``; None if all quiet."""
    if rate != audio.RATE:
        pcm = audio.resample(pcm, audio.RATE, rate)
    window = rate // 200
    x = audio.to_int16(pcm).astype(np.float64)
    n = len(x) // window
    if not n:
        return None
    power = np.mean(x[: n * window].reshape(n, window) ** 2, axis=1)
    db = 10 * np.log10(power / 32768.0**2 + 1e-12)
    loud = np.nonzero(db > speech_threshold(db))[0]
    if not len(loud):
        return None
    return int(round((int(loud[-1]) + 1) * window * audio.RATE / rate))


class PlayedCaller(QuestionCaller):
    """A ``QuestionCaller`` that keeps what it played: (send time, frame)."""

    def __init__(self, *args: Any, rate: int = audio.RATE, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rate = rate  # the framing's band (Exotel 8 kHz)
        self.played: list[tuple[float, bytes]] = []

    def frame(self, call: Any, t: float) -> bytes:
        chunk = super().frame(call, t)
        self.played.append((t, chunk))
        return chunk

    def played_end(self, turn: TurnTiming) -> float | None:
        """The end of the turn's speech in the audio played from the turn's
        first frame to the reply's first byte (band-limited to ``rate``)."""
        until = turn.first_byte if turn.first_byte is not None else float("inf")
        frames = [(t, f) for t, f in self.played if turn.asked_at <= t < until]
        if not frames:
            return None
        end = last_loud_sample(b"".join(f for _, f in frames), self.rate)
        if end is None:
            return None
        samples_per_frame = FRAME_BYTES // 2
        index = min(len(frames) - 1, max(0, end - 1) // samples_per_frame)
        t, _ = frames[index]
        return t + (end - index * samples_per_frame) / audio.RATE

    def v2v(self, turn: TurnTiming) -> float | None:
        """Voice to voice: the played end of speech -> the first byte of the reply."""
        end = self.played_end(turn)
        if end is None or turn.first_byte is None:
            return None
        return turn.first_byte - end


# ---- the daemon side ------------------------------------------------------------------------------------


def with_agent_options(ini: str, agent: str = "demo", header: str | None = None, **options: str) -> str:
    """``ini`` with options of ``[agent:NAME]`` (or of the section ``header``,
    e.g. ``[upvoot]``) set: an existing line (and its continuation lines)
    replaced, a missing one added under the header."""
    header = header or f"[agent:{agent}]"
    out: list[str] = []
    section, skipping = None, False
    pending = dict(options)
    for line in ini.splitlines():
        if line.startswith("["):
            section = line.strip()
            skipping = False
            out.append(line)
            if section == header:
                out += [f"{k} = {v}" for k, v in pending.items()]
                pending.clear()
            continue
        if skipping and line[:1] in (" ", "\t") and line.strip():
            continue
        skipping = False
        key = line.split("=", 1)[0].strip()
        if section == header and key in options and not line.startswith((";", " ", "#")):
            skipping = True  # the value was put under the header
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def server_split(turns: Sequence[TurnTiming], record: dict | None) -> list[tuple[TurnTiming, dict | None]]:
    """Our answered turns, each with the daemon's split of it (today's keys)."""
    return [(t, read_latency(s) if s else None) for t, s in _pair(turns, record, APOLOGY)]


def stage_rows(splits: Sequence[dict], percentile: Any, ms: Any) -> list[str]:
    """One line per stage of the daemon's split: n, median, p95 (ms)."""
    rows = []
    for key in LATENCY_KEYS + ("voice_to_voice_sent",):
        values = [s[key] for s in splits if s.get(key) is not None]
        if values:
            rows.append(f"    {key:22} {len(values):>3} {ms(percentile(values, 50))} {ms(percentile(values, 95))}")
    return rows


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"

