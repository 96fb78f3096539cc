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
  *discarded* (a cough, a click, a short "mm-hm"), otherwise it *ends* and
  carries its audio, with ``pre_roll`` of audio from before the onset so the
  recognizer hears the first consonant.
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


@attrs.frozen
class Onset:
    pass


@attrs.frozen
class Confirmed:
    pass


@attrs.frozen
class Discarded:
    voiced: float


@attrs.frozen
class Ended:
    pcm: bytes
    voiced: float
    forced: bool = False


class Endpointer:
    def __init__(
        self,
        end_silence: float,
        min_utterance: float,
        max_utterance: float,
        confirm_after: float,
        pre_roll: float = 0.2,
    ) -> None:
        self._end_frames = max(1, round(end_silence * 1000 / FRAME_MS))
        self._min_voiced = max(1, round(min_utterance * 1000 / FRAME_MS))
        self._max_frames = max(1, round(max_utterance * 1000 / FRAME_MS))
        self._confirm = max(1, round(confirm_after * 1000 / FRAME_MS))
        self._pre = collections.deque(maxlen=max(2, round(pre_roll * 1000 / FRAME_MS)))
        self.in_speech = False
        self._run = 0  # consecutive voiced frames while not in speech
        self._utterance = bytearray()
        self._voiced = 0
        self._frames = 0
        self._silent = 0
        self._confirmed = False

    @property
    def utterance(self) -> bytes:
        """Audio of the utterance so far (for interim transcripts)."""
        return bytes(self._utterance)

    @property
    def voiced_seconds(self) -> float:
        return self._voiced * FRAME_MS / 1000

    def feed(self, frame: bytes, voiced: bool) -> list[object]:
        assert len(frame) == FRAME_BYTES
        events: list[object] = []
        if not self.in_speech:
            self._pre.append(frame)
            self._run = self._run + 1 if voiced else 0
            if self._run >= 2:
                self.in_speech = True
                self._utterance = bytearray(b"".join(self._pre))
                self._pre.clear()
                self._voiced = self._run
                self._frames = self._run
                self._silent = 0
                self._confirmed = False
                events.append(Onset())
                if self._voiced >= self._confirm:
                    self._confirmed = True
                    events.append(Confirmed())
            return events
        self._utterance += frame
        self._frames += 1
        if voiced:
            self._voiced += 1
            self._silent = 0
            if not self._confirmed and self._voiced >= self._confirm:
                self._confirmed = True
                events.append(Confirmed())
        else:
            self._silent += 1
        if self._silent >= self._end_frames or self._frames >= self._max_frames:
            forced = self._silent < self._end_frames
            events.append(self._close(forced))
        return events

    def _close(self, forced: bool) -> object:
        voiced = self.voiced_seconds
        pcm = bytes(self._utterance)
        self.in_speech = False
        self._run = 0
        self._utterance = bytearray()
        if self._voiced < self._min_voiced and not forced:
            return Discarded(voiced)
        return Ended(pcm, voiced, forced)

    def reset(self) -> None:
        self.in_speech = False
        self._run = 0
        self._utterance = bytearray()
        self._pre.clear()


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
        if self._inflight is not None or self._endpointer.voiced_seconds < self.MIN_VOICED:
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
