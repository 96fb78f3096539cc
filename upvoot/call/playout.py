"""Real-time pacing of agent audio, and the playout clock of what was heard.

Why pace at all: a provider plays audio at real time. Dumping a whole reply
at once means a barge-in cannot stop what is already in the provider's
buffer, and some platforms hang up on bursts. So agent audio leaves in 20 ms
frames, keeping at most ``lead`` seconds ahead of the caller's ear.

Why one shared tick: one ``LoopingCall`` at 20 ms serves every call in the
process (cheaper than a timer per call, and one place to measure reactor
lag). The tick only runs while some playback is active, so an idle process
(and a finished unit test) holds no delayed calls.

The playout model: the caller's player starts at the first frame and plays
at real time; if we fall behind (synthesis slower than real time), it
plays silence and resumes when audio arrives. ``played`` is our estimate of
the byte position at the caller's ear; ``sent`` is what we have written.
For providers that acknowledge playback with marks the call can use those
instead; for the raw protocol this clock is the truth.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES


class AudioSink(Protocol):
    def audio(self, pcm: bytes) -> None: ...


class Sentence:
    __slots__ = ("text", "start", "end")

    def __init__(self, text: str, start: int) -> None:
        self.text = text
        self.start = start
        self.end = start


class Playback:
    """One stretch of agent speech (a reply, a greeting, a closing line).

    Audio is appended by a producer (``add``), labelled with the sentence it
    speaks, and sent by the pacer. ``finish`` says no more audio will come;
    ``on_played`` fires once everything sent has played at the caller's end.
    """

    MARK_EVERY = 6400  # bytes (200 ms) between playout marks
    MARK_GRACE = 1.5  # seconds past the estimate before a missing mark is given up on

    def __init__(self, sink: AudioSink, lead: float, on_played: Callable[[], None]) -> None:
        self._sink = sink
        # providers that acknowledge playback: their marks are the clock
        self.marks = bool(getattr(sink, "marks_playout", False))
        self.acked = 0
        self.on_first_ack: Callable[[float], None] | None = None
        self._last_mark = 0
        self._estimate_done_at: float | None = None
        lead = max(lead, float(getattr(sink, "min_lead", 0.0)))  # a provider's minimum chunk (Exotel)
        self._lead_bytes = max(FRAME_BYTES, int(lead * BYTES_PER_SECOND) // 2 * 2)
        self._on_played = on_played
        self._buffer = bytearray()
        self._sentences: list[Sentence] = []
        self.queued = 0  # bytes ever added
        self.sent = 0
        self.played = 0.0
        self.paused = False
        self.finished = False
        self.done = False
        self.started = False
        self._last: float | None = None
        self.pacer: "Pacer | None" = None

    # producer side ---------------------------------------------------------
    def add(self, pcm: bytes, text: str | None = None) -> None:
        """Queue audio; ``text`` starts a new sentence label for it."""
        if self.done:
            return
        if text is not None or not self._sentences:
            self._sentences.append(Sentence(text or "", self.queued))
        self._buffer += pcm[: len(pcm) // 2 * 2]
        self.queued += len(pcm) // 2 * 2
        self._sentences[-1].end = self.queued

    def finish(self) -> None:
        self.finished = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # pacer side --------------------------------------------------------------
    def pump(self, now: float) -> None:
        """Advance the playout clock to ``now`` and send what the lead allows.
        Does nothing until the pacer has taken the playback (audio_start first)."""
        if self.done or self.pacer is None:
            return
        if self._last is not None and self.started:
            self.played = min(float(self.sent), self.played + (now - self._last) * BYTES_PER_SECOND)
        self._last = now
        if not self.paused:
            while self._buffer and self.sent - self.played < self._lead_bytes:
                frame = bytes(self._buffer[:FRAME_BYTES])
                del self._buffer[:FRAME_BYTES]
                self.sent += len(frame)
                self.started = True
                self._sink.audio(frame)
        if self.marks and self.sent > self._last_mark and (
            self.sent - self._last_mark >= self.MARK_EVERY or (self.finished and not self._buffer)
        ):
            self._last_mark = self.sent
            self._sink.mark(self, self.sent)
        if self.finished and not self._buffer and not self.paused and self._played_all(now):
            self.done = True
            self._detach()
            self._on_played()

    def _played_all(self, now: float) -> bool:
        if self.played < self.sent:
            return False
        if not self.marks or self.acked >= self.sent:
            return True
        # the provider has not acknowledged everything yet: wait a little
        if self._estimate_done_at is None:
            self._estimate_done_at = now
        return now - self._estimate_done_at >= self.MARK_GRACE

    def acknowledge(self, position: int, now: float) -> None:
        """The provider says audio up to byte ``position`` has played."""
        first = self.acked == 0 and position > 0
        self.acked = max(self.acked, position)
        if first and self.on_first_ack is not None:
            # when the caller started hearing it, by the provider's clock
            self.on_first_ack(now - position / BYTES_PER_SECOND)
        self.pump(now)

    @property
    def heard(self) -> int:
        """Bytes the caller has heard: acknowledged ones where the provider
        acknowledges, otherwise all sent (a raw client plays what it got)."""
        return self.acked if self.marks else self.sent

    def pause(self) -> None:
        self.paused = True

    def resume(self, now: float) -> None:
        self.paused = False
        self._last = now  # the pause is not playout time
        self.pump(now)

    def stop(self) -> None:
        """Drop everything not yet sent; nothing more fires."""
        self.done = True
        self._buffer.clear()
        self._detach()

    def _detach(self) -> None:
        if self.pacer is not None:
            self.pacer.remove(self)

    # what the caller heard ------------------------------------------------
    def heard_text(self, heard_bytes: int | None = None) -> str:
        """The words the caller heard, cut at ``heard_bytes`` (default: all
        audio sent, which for a raw client will all be played). Within a
        sentence the cut is proportional to its duration, to the word."""
        heard = self.heard if heard_bytes is None else heard_bytes
        words: list[str] = []
        for s in self._sentences:
            if not s.text:
                continue
            if s.end <= heard:
                words.extend(s.text.split())
            elif s.start < heard:
                parts = s.text.split()
                frac = (heard - s.start) / max(1, s.end - s.start)
                words.extend(parts[: int(len(parts) * frac)])
                break
            else:
                break
        return " ".join(words)

    def full_text(self) -> str:
        return " ".join(s.text for s in self._sentences if s.text)


class Pacer:
    """The shared 20 ms tick for every active playback in the process."""

    _log = Logger()

    def __init__(self, clock, interval: float = 0.02, on_lag: Callable[[float], None] | None = None) -> None:
        self._clock = clock
        self.interval = interval
        self._playbacks: dict[Playback, None] = {}
        self._loop: LoopingCall | None = None
        self._expected: float | None = None
        self._on_lag = on_lag
        self.last_lag = 0.0

    def add(self, playback: Playback) -> None:
        playback.pacer = self
        self._playbacks[playback] = None
        playback.pump(self._clock.seconds())  # first frames leave at once, not a tick later
        if not playback.done and self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._expected = self._clock.seconds() + self.interval
            self._loop.start(self.interval, now=False)

    def remove(self, playback: Playback) -> None:
        self._playbacks.pop(playback, None)
        playback.pacer = None
        if not self._playbacks and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    @property
    def active(self) -> int:
        return len(self._playbacks)

    def _tick(self) -> None:
        now = self._clock.seconds()
        if self._expected is not None:
            self.last_lag = max(0.0, now - self._expected)
            if self._on_lag is not None:
                self._on_lag(self.last_lag)
        self._expected = now + self.interval
        for playback in list(self._playbacks):
            try:
                playback.pump(now)
            except Exception:
                self._log.failure("Playback failed; dropping it", event="pacer.error")
                playback.stop()
