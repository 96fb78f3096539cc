"""Agent speech on its way to the caller's ear: pacing, the playout clock,
and the mark ledger.

- ``Playback``: one stretch of agent speech (a reply, a greeting, a closing
  line): the audio a producer queues for it, what was sent, and our estimate
  of what has *played* at the caller's end.
- ``Pacer``: the one shared 20 ms tick that sends every playback's audio.
- ``MarkLedger``: the call's playout marks (name -> playback, position) for
  lines that acknowledge playout.

Why pace at all: a provider plays audio at real time. Dumping a whole reply
at once means a barge-in cannot stop what is already in the provider's
buffer, and some platforms hang up on bursts. So agent audio leaves in 20 ms
frames, keeping at most ``lead`` seconds ahead of the caller's ear.

Why one shared tick: one ``LoopingCall`` at 20 ms serves every call in the
process (cheaper than a timer per call, and one place to measure reactor
lag). The tick only runs while some playback is active, so an idle process
(and a finished unit test) holds no delayed calls.

The playout clock: the caller's player starts at the first frame and plays
at real time; if we fall behind (synthesis slower than real time), it plays
silence and resumes when audio arrives. ``played`` is our estimate of the
byte position at the caller's ear; ``sent`` is what we have written. Where
the line acknowledges playout, a playback asks for a mark every
``line.mark_every`` bytes (whole provider chunks, counted from its start or
its resume, so each mark falls at a chunk's end) and at its end, and the
marks that come back
(``MarkLedger.acknowledged``) are the clock of what was heard; for the raw
protocol our estimate is the truth.

Barge-in over such a line: the provider plays what it holds until a
``clear``, so the call clears at once when it pauses (``cleared``), and if
it resumes, ``rewind`` first puts the audio sent but not acknowledged back
in front of what is still to send: the caller hears exactly what it had not
heard, in order, once.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from upvoot.timing import Lateness, PeakLateness
from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES


class Sentence:
    __slots__ = ("text", "start", "end")

    def __init__(self, text: str, start: int) -> None:
        self.text = text
        self.start = start
        self.end = start


class Playback:
    """One stretch of agent speech (a reply, a greeting, a closing line).

    Audio is appended by a producer (``add``), labelled with the sentence it
    speaks, and sent to ``line`` (anything with ``audio(pcm)``) by the pacer.
    ``finish`` says no more audio will come; ``on_played`` fires once
    everything sent has played at the caller's end.

    ``marks``: the call's ``MarkLedger`` when the line acknowledges playout
    (then its marks are the clock of what was heard), else None.
    ``on_sent(pcm, ahead)``: called with each frame as it is sent, ``ahead``
    being the seconds of audio queued at the caller's end before it (so the
    frame plays ``ahead`` seconds from now); the call records agent audio
    with it.
    """

    # bytes (100 ms) between playout marks where the line names no step
    # (``ILine.mark_every``: whole provider chunks, so the last mark
    # acknowledged after a clear is where the caller's ear stopped, and a
    # resume says nothing twice)
    MARK_EVERY = 3200
    MARK_GRACE = 1.5  # seconds past the estimate before a missing mark is given up on
    PRIME_BYTES = 1280  # heard audio kept to prime the line's resampler at a resume (40 ms)

    def __init__(
        self,
        line: Any,
        lead: float,
        on_played: Callable[[], None],
        *,
        marks: "MarkLedger | None" = None,
        on_sent: Callable[[bytes, float], None] | None = None,
        min_lead: float | None = None,
    ) -> None:
        """``lead``: seconds of audio kept ahead of the ear; with ``min_lead``,
        ``lead`` is the most, and the lead follows the pacer's recent
        lateness (``Pacer.lead``) down to ``min_lead``."""
        self._line = line
        self._marks = marks
        self._on_sent = on_sent
        self.acked = 0
        self._unacked = bytearray()  # audio sent and not yet acknowledged: bytes acked..sent
        self._heard_tail = bytearray()  # the last PRIME_BYTES acknowledged (heard)
        self.cleared = False  # the line was told to drop what it held (the pause's clear)
        self.on_first_ack: Callable[[float], None] | None = None
        self._last_mark = 0
        self._origin = 0  # where the line's chunk grid starts: 0, or the acknowledged byte of a resume
        self._estimate_done_at: float | None = None
        self._lead = (lead, lead if min_lead is None else min(lead, min_lead))  # (most, least): equal = fixed
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

    @property
    def acknowledged_by_line(self) -> bool:
        """The line's marks, not our estimate, say what was heard."""
        return self._marks is not None

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
        lead_bytes = max(FRAME_BYTES, int(self.pacer.lead(now, *self._lead) * BYTES_PER_SECOND) // 2 * 2)
        if not self.paused:
            while self._buffer and self.sent - self.played < lead_bytes:
                size = FRAME_BYTES
                due = self._next_mark() if self._marks is not None else 0
                if due > self.sent:
                    size = min(size, due - self.sent)  # a frame never straddles a mark
                frame = bytes(self._buffer[:size])
                del self._buffer[:size]
                self.sent += len(frame)
                if self._marks is not None:
                    self._unacked += frame
                self.started = True
                if self._on_sent is not None:
                    # counted in ``sent`` already: what is queued ahead of it plays first
                    self._on_sent(frame, max(0.0, (self.sent - len(frame) - self.played) / BYTES_PER_SECOND))
                self._line.audio(frame)
                if self._marks is not None and self.sent == due and self._buffer:
                    self._mark(last=False)
        if self._marks is not None and self.sent > self._last_mark and not self.cleared:
            if self.finished and not self._buffer:
                self._mark(last=True)
            elif self.sent >= self._next_mark():  # (a step that shrank meanwhile)
                self._mark(last=False)
        if self.finished and not self._buffer and not self.paused and self._played_all(now):
            self.done = True
            self._detach()
            self._on_played()

    def _next_mark(self) -> int:
        """The byte position of the next mark: the next whole step of the
        line's chunk grid after the last mark, counted from the origin."""
        step = max(2, int(getattr(self._line, "mark_every", self.MARK_EVERY)) // 2 * 2)
        base = max(self._last_mark, self._origin)
        return self._origin + ((base - self._origin) // step + 1) * step

    def _mark(self, last: bool) -> None:
        assert self._marks is not None
        self._last_mark = self.sent
        self._marks.mark(self, self.sent, last)

    def _played_all(self, now: float) -> bool:
        if self.played < self.sent:
            return False
        if self._marks is None or self.acked >= self.sent:
            return True
        # the line has not acknowledged everything yet: wait a little
        if self._estimate_done_at is None:
            self._estimate_done_at = now
        return now - self._estimate_done_at >= self.MARK_GRACE

    def acknowledge(self, position: int, now: float) -> None:
        """The line says audio up to byte ``position`` has played."""
        first = self.acked == 0 and position > 0
        if position > self.acked:
            heard = position - self.acked
            self._heard_tail += self._unacked[max(0, heard - self.PRIME_BYTES):heard]
            del self._heard_tail[: max(0, len(self._heard_tail) - self.PRIME_BYTES)]
            del self._unacked[:heard]
            self.acked = position
        if first and self.on_first_ack is not None:
            # when the caller started hearing it, by the line's clock
            self.on_first_ack(now - position / BYTES_PER_SECOND)
        self.pump(now)

    @property
    def heard(self) -> int:
        """Bytes the caller has heard: acknowledged ones where the line
        acknowledges, otherwise all sent (a raw client plays what it got)."""
        return self.acked if self._marks is not None else self.sent

    def pause(self) -> None:
        self.paused = True

    @property
    def unacknowledged(self) -> int:
        """Bytes sent that the line has not said were played (0 without marks)."""
        return len(self._unacked)

    def rewind(self) -> int:
        """After a clear: what was sent and not acknowledged goes back in
        front of the audio still to send, so it is sent again, in order;
        the clocks go back to the last acknowledged byte, and the line is
        primed with the heard audio just before it (``ILine.prime``).
        Returns the bytes to send again."""
        back = bytes(self._unacked)
        self._unacked.clear()
        if self._heard_tail:
            self._line.prime(bytes(self._heard_tail))  # the resent audio joins what was heard seamlessly
        self._buffer[:0] = back
        self.sent = self.acked
        self.played = min(self.played, float(self.acked))
        self._last_mark = min(self._last_mark, self.acked)
        self._origin = self.acked  # the line drops its partial chunk at a clear: its grid restarts here
        self._estimate_done_at = None
        self.cleared = False
        return len(back)

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
        audio heard, see ``heard``). Within a sentence the cut is
        proportional to its duration, to the word."""
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


class MarkLedger:
    """A call's playout marks: name -> (playback, byte position).

    A playback asks for a mark (``mark``); the ledger names it ``upvoot-N``,
    remembers where it stands and asks the line to send it
    (``ILine.mark``). When the far end acknowledges a name
    (``acknowledged``), that playback's clock moves to the position. Marks
    may never come back (a clear drops them), so the ledger is bounded: at
    ``MAX_PENDING`` it forgets the marks of finished playbacks, then the
    oldest ones.
    """

    MAX_PENDING = 256

    def __init__(self, line: Any, clock: Any) -> None:
        self._line = line
        self._clock = clock
        self._pending: dict[str, tuple[Playback, int]] = {}
        self._n = 0

    def __len__(self) -> int:
        return len(self._pending)

    def mark(self, playback: Playback, position: int, last: bool) -> str:
        """Send a mark for ``playback`` at byte ``position``; ``last``: its
        final one (the line must let any audio it holds back go now)."""
        self._n += 1
        name = f"upvoot-{self._n}"
        if len(self._pending) >= self.MAX_PENDING:
            for old in [k for k, (p, _) in self._pending.items() if p.done]:
                del self._pending[old]
            while len(self._pending) >= self.MAX_PENDING:
                del self._pending[next(iter(self._pending))]
        self._pending[name] = (playback, position)
        self._line.mark(name, last)
        return name

    def forget(self, playback: Playback, after: int) -> None:
        """Forget ``playback``'s marks beyond byte ``after``: their audio was
        cleared and is sent again under new marks (``Playback.rewind``)."""
        for name in [k for k, (p, pos) in self._pending.items() if p is playback and pos > after]:
            del self._pending[name]

    def acknowledged(self, name: str, cleared: bool) -> None:
        """The far end played (or, ``cleared``, dropped) audio up to ``name``;
        unknown names (forgotten, or not ours) are ignored."""
        entry = self._pending.pop(name, None)
        if entry is not None and not cleared:
            playback, position = entry
            playback.acknowledge(position, self._clock.seconds())


class Pacer:
    """The shared 20 ms tick for every active playback in the process."""

    _log = Logger()

    def __init__(self, clock, interval: float = 0.02, on_lag: Callable[[float], None] | None = None) -> None:
        self._clock = clock
        self.interval = interval
        self._playbacks: dict[Playback, None] = {}
        self._loop: LoopingCall | None = None
        self._lateness = Lateness(interval)
        self._peak = PeakLateness()
        self._on_lag = on_lag
        self.last_lag = 0.0

    def add(self, playback: Playback) -> None:
        playback.pacer = self
        self._playbacks[playback] = None
        playback.pump(self._clock.seconds())  # first frames leave at once, not a tick later
        if not playback.done and self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._lateness.start(self._clock.seconds())
            self._loop.start(self.interval, now=False)

    def remove(self, playback: Playback) -> None:
        self._playbacks.pop(playback, None)
        playback.pacer = None
        if not self._playbacks and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()
            self._lateness.stop()

    @property
    def active(self) -> int:
        return len(self._playbacks)

    def lead(self, now: float, most: float, least: float) -> float:
        """The lead that rides out this process's recent lateness: a tick,
        the worst recent lateness and a tick's margin, within least..most
        (the ear's buffer must outlast the wait for the next tick)."""
        return min(most, max(least, 2 * self.interval + self._peak.value(now)))

    def _tick(self) -> None:
        now = self._clock.seconds()
        self.last_lag = self._lateness.tick(now)
        self._peak.add(self.last_lag, now)
        if self._on_lag is not None:
            self._on_lag(self.last_lag)
        for playback in list(self._playbacks):
            try:
                playback.pump(now)
            except Exception:
                self._log.failure("Playback failed; dropping it", event="pacer.error")
                playback.stop()
