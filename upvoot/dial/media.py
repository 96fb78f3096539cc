"""The dialer's audio: what the caller says, and how it hears the agent.

Caller side: an ``AudioSource`` decides each 20 ms frame the caller sends;
``PlayThenSilence`` is the one ``upvoot dial --play FILE.wav`` uses (bench/
brings its own, e.g. a caller that asks questions and barges in).

Agent side: an ``AgentRecorder`` places the agent's audio on the call's
timeline as a phone would play it (``--record``); ``FrameConcatenation``
just joins the frames (``--record-raw``). A provider simulator keeps its own
``ProviderBuffer``: the agent audio the provider holds for the caller's ear,
and the marks waiting for it to play.

These are the *caller's* ears and mouth. The daemon's own pacing of agent
audio (``upvoot.call.playout``: ``Pacer``, ``Playback``) is another thing,
on the other side of the socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from upvoot.audio import FRAME_BYTES, FRAME_MS, RATE

if TYPE_CHECKING:
    from upvoot.dial.engine import Call

FRAME_SECONDS = FRAME_MS / 1000.0
SILENT_FRAME = b"\x00" * FRAME_BYTES

#: How far behind the arrival of the first frame of a burst the recording
#: starts playing it: a small jitter buffer, as a phone has, so that a frame
#: a few milliseconds late inside a burst is not heard as a click of silence.
JITTER_DELAY = 0.04


# ---- what the caller says ------------------------------------------------------------------


class AudioSource(Protocol):
    """Decides the caller's next 20 ms frame. ``call`` exposes the agent's
    state (``agent_speaking``, ``result.bursts`` ...); ``t`` is seconds since the open."""

    def frame(self, call: "Call", t: float) -> bytes: ...


class PlayThenSilence:
    """Silence, then ``pcm`` once ``delay`` has passed (and, if asked, once
    the greeting's ``audio_end`` has arrived), then silence again."""

    def __init__(self, pcm: bytes = b"", delay: float = 0.0, after_greeting: bool = False) -> None:
        self._pcm = pcm
        self._delay = delay
        self._after_greeting = after_greeting
        self._pos: int | None = None
        #: when the first frame of ``pcm`` was sent (seconds since the open)
        self.started_at: float | None = None

    def frame(self, call: "Call", t: float) -> bytes:
        if self._pos is None:
            if not self._pcm or t < self._delay:
                return SILENT_FRAME
            if self._after_greeting and not any(b.end is not None for b in call.result.bursts):
                return SILENT_FRAME
            self._pos = 0
            self.started_at = t
        chunk = self._pcm[self._pos : self._pos + FRAME_BYTES]
        self._pos += FRAME_BYTES
        return chunk.ljust(FRAME_BYTES, b"\x00") if chunk else SILENT_FRAME


# ---- what the caller hears -------------------------------------------------------------------


class Recorder(Protocol):
    """Agent audio as it arrives (``add``), a clear (``cut``), the track (``finish``)."""

    def add(self, t: float, pcm: bytes) -> None: ...

    def cut(self, t: float) -> None: ...

    def finish(self, t: float) -> bytes: ...


class AgentRecorder:
    """The agent's audio placed on the call's timeline, as a phone plays it.

    A frame plays as soon as it arrives, or after the audio queued before it
    (the server sends with a small lead). When the queue has run dry (the gap
    between two bursts, or a frame later than the jitter buffer), silence
    fills the gap and playing resumes ``delay`` seconds after the arrival.
    The result is one PCM track whose silences match what the caller heard.
    """

    def __init__(self, delay: float = JITTER_DELAY) -> None:
        self._delay = delay
        self._pcm = bytearray()
        self._odd = b""

    def add(self, t: float, pcm: bytes) -> None:
        pcm = self._odd + pcm
        self._odd = pcm[len(pcm) - len(pcm) % 2 :]
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        arrival = _byte_offset(t)
        if len(self._pcm) < arrival:
            self._pad_to(_byte_offset(t + self._delay))
        self._pcm += pcm

    def cut(self, t: float) -> None:
        """A clear at ``t``: what had not played by then never will."""
        offset = _byte_offset(t + self._delay)
        if len(self._pcm) > offset:
            del self._pcm[offset:]

    def finish(self, t: float) -> bytes:
        """The track up to ``t`` (the hang-up), or to its last sample if later."""
        self._pad_to(_byte_offset(t))
        return bytes(self._pcm)

    def _pad_to(self, offset: int) -> None:
        if len(self._pcm) < offset:
            self._pcm += bytes(offset - len(self._pcm))


class FrameConcatenation:
    """The agent's frames joined end to end, without their timing (``--record-raw``)."""

    def __init__(self) -> None:
        self._pcm = bytearray()

    def add(self, t: float, pcm: bytes) -> None:
        self._pcm += pcm

    def cut(self, t: float) -> None:
        pass

    def finish(self, t: float) -> bytes:
        return bytes(self._pcm[: len(self._pcm) - len(self._pcm) % 2])


def _byte_offset(t: float) -> int:
    return max(0, int(round(t * RATE))) * 2


# ---- the provider's playback buffer ------------------------------------------------------


class ProviderBuffer:
    """The agent audio a provider holds for the caller's ear, on a timeline,
    and the marks waiting for it to play (the far end's view, not the call's
    ``upvoot.call.playout``)."""

    def __init__(self, finish_playing_chunk: bool) -> None:
        self.finish_playing_chunk = finish_playing_chunk
        self.segments: list[tuple[float, float]] = []  # (start, end) of each chunk
        self.play_end = 0.0
        self.marks: list[tuple[float, str]] = []  # (due, name), due times non-decreasing

    def add(self, now: float, seconds: float) -> float:
        """Queue ``seconds`` of audio arriving at ``now``; returns when it starts."""
        start = max(self.play_end, now)
        self.play_end = start + seconds
        self.segments.append((start, self.play_end))
        self.segments = [s for s in self.segments if s[1] > now]
        return start

    def mark(self, now: float, name: str) -> None:
        self.marks.append((max(self.play_end, now), name))

    def due(self, now: float) -> list[str]:
        names = [name for t, name in self.marks if t <= now]
        self.marks = [(t, name) for t, name in self.marks if t > now]
        return names

    def next_due(self) -> float | None:
        return self.marks[0][0] if self.marks else None

    def queued(self, now: float) -> float:
        return max(0.0, self.play_end - now)

    def clear(self, now: float) -> tuple[float, list[str]]:
        """Drop what has not played; returns (seconds dropped, marks still
        waiting for audio that no longer exists)."""
        cut = now
        if self.finish_playing_chunk:
            cut = next((end for start, end in self.segments if start <= now < end), now)
        dropped = max(0.0, self.play_end - cut)
        self.play_end = min(self.play_end, cut)
        self.segments = [(s, min(e, cut)) for s, e in self.segments if s < cut]
        orphans = [name for t, name in self.marks if t > cut]
        self.marks = [(t, name) for t, name in self.marks if t <= cut]
        return dropped, orphans
