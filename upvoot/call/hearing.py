"""Turn-taking from per-frame VAD decisions: when the caller starts, keeps on,
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

import attrs

from upvoot.audio import FRAME_BYTES, FRAME_MS


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
