"""Hearing the caller: turn-taking from per-frame VAD decisions (``Endpointer``),
the caller's audio cut into frames for it (``Ear``), and the partial
transcripts shown while the caller speaks (``Interims``).

The endpointer's rules: when the caller starts, keeps on,
and stops speaking. Sans-IO: feed it 20 ms frames, it returns events.

- Onset: two voiced frames in a row (40 ms). The agent pauses on onset, so a
  barge-in stops playback within a frame or two.
- Confirmation: voiced audio since onset reaches ``confirm_after``
  (the agent's ``barge_in_min``): the caller really is talking.
- End of turn: ``end_silence`` of unvoiced frames after speech. If the
  utterance held less than ``min_utterance`` of voiced audio it is
  *discarded* after ``discard_silence`` (default: ``end_silence``; a cough,
  a click, a short "mm-hm"), otherwise it *ends* and carries its audio, with
  ``pre_roll`` (``PRE_ROLL``, 500 ms) of audio from before the onset: the
  recognizer hears the first consonant, and the end-of-turn model and
  Whisper hear the line's quiet before the words, which they read better.
- Pause (only with ``pause`` set: ``turn = smart``): after ``pause`` of
  silence following at least ``min_utterance`` of voiced audio, *paused*
  (once per pause) with the audio so far: the turn may be over, the turn
  policy (``upvoot.call.turns``) asks the end-of-turn model and may end the
  turn at once (``end_now``) or sooner than ``end_silence`` (``end_after``).
  With ``quiet`` (shorter than ``pause``), *quieted* comes first, after
  ``quiet`` of silence, with the audio so far: the policy starts the final
  transcription then, so it is (nearly) done when the model answers.
  Speech again after a quiet or a pause (two voiced frames in a row; a lone
  voiced frame is a click) is *resumed*.
- ``max_utterance`` forces an end, so a caller (or a noisy line) can never
  hold the turn forever.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from upvoot.audio import FRAME_BYTES, FRAME_MS
from upvoot.engines.interfaces import EngineBusy

#: Audio kept from before the onset, joined to the utterance. Whisper tiny
#: reads the last word of a paused utterance better with more of the line's
#: quiet before the first ("the problem started [when]"), and the dangling
#: word is what holds the turn open: on bench/hesitant.py (51 hesitant clips,
#: turn = smart, each clip with 0.5 s of the line's noise before the words)
#: the cut-offs were 25.5 % with 200 ms, 23.5 % (300), 17.6 % (400), 11.8 %
#: (500) and 15.7 % (600), the waits after complete sentences p50 220-240 ms
#: and p95 580 ms throughout.
PRE_ROLL = 0.5
#: The pre-roll of an utterance begun over the agent: the audio before the
#: caller's first word may hold the agent's own voice (echo), whose words
#: would make a backchannel look like a barge-in (``upvoot.call.bargein``)
#: and join the caller's transcript.
OVERHEARD_PRE_ROLL = 0.2


@attrs.frozen
class Onset:
    pass


@attrs.frozen
class Confirmed:
    pass


@attrs.frozen
class Discarded:
    voiced: float
    silence: float = attrs.field(default=0.0, eq=False)  # seconds since the sound ended


@attrs.frozen
class Paused:
    pcm: bytes
    voiced: float


@attrs.frozen
class Quieted:
    pcm: bytes
    voiced: float


@attrs.frozen
class Resumed:
    pass


@attrs.frozen
class Ended:
    pcm: bytes
    voiced: float
    forced: bool = False
    silence: float = attrs.field(default=0.0, eq=False)  # seconds of trailing silence: the speech ended this long ago


class Endpointer:
    def __init__(
        self,
        end_silence: float,
        min_utterance: float,
        max_utterance: float,
        confirm_after: float,
        pre_roll: float = PRE_ROLL,
        pause: float = 0.0,
        discard_silence: float | None = None,
        quiet: float = 0.0,
    ) -> None:
        self._end_frames = max(1, round(end_silence * 1000 / FRAME_MS))
        self._until = self._end_frames  # this utterance's end (end_after lowers it)
        self._discard_frames = max(1, round((end_silence if discard_silence is None else discard_silence)
                                            * 1000 / FRAME_MS))
        self._pause_frames = round(pause * 1000 / FRAME_MS)
        # the quiet comes before the pause, or with it (then no Quieted of its own)
        self._quiet_frames = min(round(quiet * 1000 / FRAME_MS), self._pause_frames) or self._pause_frames
        self._quiet = False  # quieted (or paused): speech again is Resumed
        self._paused = False
        self._again = 0  # voiced frames in a row after a pause
        self._min_voiced = max(1, round(min_utterance * 1000 / FRAME_MS))
        self._max_frames = max(1, round(max_utterance * 1000 / FRAME_MS))
        self._confirm = max(1, round(confirm_after * 1000 / FRAME_MS))
        self._pre = collections.deque(maxlen=max(2, round(pre_roll * 1000 / FRAME_MS)))
        self.in_speech = False
        self._run = 0  # consecutive voiced frames while not in speech
        self._utterance = bytearray()
        self._lead = 0
        self._voiced = 0
        self._frames = 0
        self._silent = 0
        self._confirmed = False

    @property
    def utterance(self) -> bytes:
        """Audio of the utterance so far (for interim transcripts)."""
        return bytes(self._utterance)

    def trim_lead(self, before: float) -> None:
        """Keep at most ``before`` seconds of the audio from before the onset
        in the utterance in progress (``utterance`` and every event after)."""
        keep = min(self._lead, int(before * 1000 / FRAME_MS) * FRAME_BYTES)
        del self._utterance[: self._lead - keep]
        self._lead = keep

    @property
    def voiced_seconds(self) -> float:
        return self._voiced * FRAME_MS / 1000

    @property
    def quiet(self) -> bool:
        """Quieted or paused, and no speech since: the final transcription
        may be under way (interims need not decode the same audio)."""
        return self._quiet

    def feed(self, frame: bytes, voiced: bool) -> list[object]:
        assert len(frame) == FRAME_BYTES
        events: list[object] = []
        if not self.in_speech:
            self._pre.append(frame)
            self._run = self._run + 1 if voiced else 0
            if self._run >= 2:
                self.in_speech = True
                self._utterance = bytearray(b"".join(self._pre))
                self._lead = len(self._utterance) - self._run * FRAME_BYTES  # bytes from before the onset
                self._pre.clear()
                self._voiced = self._run
                self._frames = self._run
                self._silent = 0
                self._confirmed = False
                self._paused = self._quiet = False
                self._until = self._end_frames
                events.append(Onset())
                if self._voiced >= self._confirm:
                    self._confirmed = True
                    events.append(Confirmed())
            return events
        self._utterance += frame
        self._frames += 1
        if voiced:
            self._voiced += 1
            self._again += 1
            if not self._quiet:
                self._silent = 0
            elif self._again >= 2:
                self._paused = self._quiet = False
                self._silent = 0
                self._until = self._end_frames
                events.append(Resumed())
            else:
                self._silent += 1  # a lone voiced frame in a pause: a click
            if not self._confirmed and self._voiced >= self._confirm:
                self._confirmed = True
                events.append(Confirmed())
        else:
            self._again = 0
            self._silent += 1
        if (self._pause_frames and not self._quiet and self._silent == self._quiet_frames
                and self._voiced >= self._min_voiced):
            self._quiet = True
            if self._quiet_frames < self._pause_frames:
                events.append(Quieted(bytes(self._utterance), self.voiced_seconds))
        if self._quiet and not self._paused and self._silent == self._pause_frames:
            self._paused = True
            events.append(Paused(bytes(self._utterance), self.voiced_seconds))
        short = self._voiced < self._min_voiced
        if self._silent >= (self._discard_frames if short else self._until) or self._frames >= self._max_frames:
            events.append(self._close(forced=self._silent < (self._discard_frames if short else self._until)))
        return events

    def end_now(self) -> object | None:
        """End the utterance in progress here (the end-of-turn model says the
        caller has finished): its ``Ended`` (``Discarded`` if too short), or
        None when no utterance is in progress."""
        if not self.in_speech:
            return None
        return self._close(forced=False)

    def end_after(self, silence: float) -> object | None:
        """End the utterance in progress after ``silence`` instead of
        ``end_silence`` (never later): now if it has been silent that long
        (its event, as ``end_now``), else at that silence (None now)."""
        if not self.in_speech:
            return None
        self._until = min(self._until, max(1, round(silence * 1000 / FRAME_MS)))
        return self._close(forced=False) if self._silent >= self._until else None

    def hold(self) -> None:
        """Undo ``end_after``: the utterance in progress ends after
        ``end_silence`` again (a transcript that stops mid-sentence)."""
        self._until = self._end_frames

    def _close(self, forced: bool) -> object:
        voiced = self.voiced_seconds
        pcm = bytes(self._utterance)
        silence = self._silent * FRAME_MS / 1000
        self.reset()
        if self._voiced < self._min_voiced and not forced:
            return Discarded(voiced, silence)
        return Ended(pcm, voiced, forced, silence)

    def reset(self) -> None:
        self.in_speech = False
        self._run = 0
        self._utterance = bytearray()
        self._lead = 0
        self._pre.clear()
        self._paused = self._quiet = False
        self._again = 0
        self._until = self._end_frames


class Ear:
    """The caller's audio, any length, re-chunked into 20 ms frames for the
    VAD and the endpointer: ``hear(pcm)`` returns the endpointer's events."""

    def __init__(self, detector: Any, endpointer: Endpointer) -> None:
        self._detector = detector  # upvoot.engines.interfaces: a VAD's per-call detector
        self.endpointer = endpointer
        self._pending = bytearray()

    def hear(self, pcm: bytes) -> Iterator[object]:
        self._pending += pcm
        while len(self._pending) >= FRAME_BYTES:
            frame = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            yield from self.endpointer.feed(frame, self._detector.is_speech(frame))


class Interims:
    """State data of ``hearing``: partial transcripts of the utterance in
    progress, decoded every ``interval`` seconds, one decode at a time, each
    new text handed to ``show`` (``ILine.interim``). ``cancel`` when the
    state is left."""

    MIN_VOICED = 0.3  # seconds of voiced audio before the first decode

    def __init__(self, clock: Any, interval: float, stt: Any, endpointer: Endpointer,
                 show: Callable[[str], None], failed: Callable[[BaseException], None]) -> None:
        self._clock = clock
        self._interval = interval
        self._stt = stt
        self._endpointer = endpointer
        self._show = show
        self._failed = failed
        self._timer = clock.callLater(interval, self._tick) if interval else None
        self._inflight: defer.Deferred | None = None
        self._last = ""

    def _tick(self) -> None:
        self._timer = self._clock.callLater(self._interval, self._tick)
        if (self._inflight is not None or self._endpointer.voiced_seconds < self.MIN_VOICED
                or self._endpointer.quiet):  # the final transcription is (or soon is) under way
            return
        d = self._inflight = self._stt.transcribe(self._endpointer.utterance, False)
        d.addCallbacks(self._got, self._lost)

    def _got(self, text: str) -> None:
        self._inflight = None
        text = (text or "").strip()
        if text and text != self._last:
            self._last = text
            self._show(text)

    def _lost(self, failure: Failure) -> None:
        self._inflight = None
        if not failure.check(defer.CancelledError, EngineBusy):
            self._failed(failure.value)

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._inflight is not None:
            self._inflight.cancel()
