"""The playout clock (pacing, pause, what was played) and the mark ledger, on task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES
from upvoot.call.playout import MarkLedger, Pacer, Playback

STEP = 0.02


class Line:
    """What a playback and the ledger use of an ILine: audio and marks."""

    def __init__(self):
        self.sent = 0
        self.marks: list[tuple[str, bool]] = []

    def audio(self, pcm: bytes) -> None:
        assert len(pcm) == FRAME_BYTES
        self.sent += len(pcm)

    def mark(self, name: str, last: bool) -> None:
        self.marks.append((name, last))


def seconds(n: float) -> bytes:
    return bytes(int(n * BYTES_PER_SECOND))


class World:
    def __init__(self, lead=0.1, marks=False, on_sent=None, min_lead=None):
        self.clock = Clock()
        self.clock.advance(50.0)
        self.line = Line()
        self.pacer = Pacer(self.clock)
        self.ledger = MarkLedger(self.line, self.clock) if marks else None
        self.played: list[float] = []
        self.playback = Playback(self.line, lead, lambda: self.played.append(self.clock.seconds()),
                                 marks=self.ledger, on_sent=on_sent, min_lead=min_lead)

    def run(self, seconds: float) -> None:
        for _ in range(int(round(seconds / STEP))):
            self.clock.advance(STEP)


def test_audio_leaves_at_once_up_to_the_lead_then_at_real_time():
    w = World(lead=0.1)
    w.playback.add(seconds(2.0), "hello")
    w.pacer.add(w.playback)
    assert w.line.sent == int(0.1 * BYTES_PER_SECOND), "the lead leaves at once"
    w.run(0.5)
    assert w.playback.played == pytest.approx(0.5 * BYTES_PER_SECOND)
    ahead = w.line.sent - w.playback.played
    assert 0.1 * BYTES_PER_SECOND <= ahead <= 0.1 * BYTES_PER_SECOND + FRAME_BYTES, "then real time, a lead ahead of the ear"
    w.playback.stop()
    assert w.clock.getDelayedCalls() == [], "no tick while nothing plays"


def test_peak_lateness_rises_at_once_and_halves_every_half_life():
    from upvoot.timing import PeakLateness

    peak = PeakLateness(half_life=5.0)
    assert peak.value(10.0) == 0.0
    peak.add(0.08, 10.0)
    assert peak.value(10.0) == pytest.approx(0.08)
    assert peak.value(15.0) == pytest.approx(0.04)
    peak.add(0.01, 15.0)  # not as late as what is left of the peak
    assert peak.value(20.0) == pytest.approx(0.02)
    peak.add(0.05, 20.0)
    assert peak.value(20.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        PeakLateness(half_life=0)


def test_a_floor_lets_the_lead_follow_the_pacers_recent_lateness():
    """With min_lead the lead is a tick, the worst recent tick lateness and a
    tick's margin, within min_lead..lead: a calm pacer keeps the floor, a
    stall raises the lead at once, and a calm spell brings it back."""
    w = World(lead=0.1, min_lead=0.06)
    w.playback.add(seconds(30.0), "hello")
    w.pacer.add(w.playback)
    assert w.line.sent == int(0.06 * BYTES_PER_SECOND), "a calm process: the floor leaves at once"
    w.run(1.0)
    assert w.line.sent - w.playback.played <= 0.06 * BYTES_PER_SECOND + FRAME_BYTES
    w.clock.advance(STEP + 0.05)  # one tick 50 ms late
    assert w.pacer.lead(w.clock.seconds(), 0.1, 0.06) == pytest.approx(0.09)
    assert w.line.sent - w.playback.played >= 0.09 * BYTES_PER_SECOND - FRAME_BYTES, "the lead rose with the stall"
    w.clock.advance(STEP + 0.2)  # a 200 ms stall: never past lead
    assert w.pacer.lead(w.clock.seconds(), 0.1, 0.06) == 0.1
    w.run(30.0)  # calm again: the peak decays, the lead is back at the floor
    assert w.pacer.lead(w.clock.seconds(), 0.1, 0.06) == 0.06
    assert w.line.sent - w.playback.played <= 0.06 * BYTES_PER_SECOND + FRAME_BYTES


def test_without_a_floor_the_lead_is_fixed_whatever_the_lateness():
    w = World(lead=0.1)
    w.playback.add(seconds(5.0), "hello")
    w.pacer.add(w.playback)
    w.run(0.5)
    w.clock.advance(STEP + 0.2)
    w.run(0.5)
    ahead = w.line.sent - w.playback.played
    assert 0.1 * BYTES_PER_SECOND <= ahead <= 0.1 * BYTES_PER_SECOND + FRAME_BYTES


def test_a_lead_below_a_frame_still_sends_a_frame():
    w = World(lead=0.0)
    w.playback.add(seconds(0.1))
    w.pacer.add(w.playback)
    assert w.line.sent == FRAME_BYTES


def test_played_fires_once_when_everything_sent_has_played():
    w = World(lead=0.1)
    w.playback.add(seconds(0.5))
    w.pacer.add(w.playback)
    w.run(0.4)
    w.playback.finish()
    w.run(0.08)
    assert w.played == []
    w.run(0.04)
    assert w.played == [pytest.approx(50.5)], "at the end of the audio's real time"
    w.run(1.0)
    assert len(w.played) == 1 and w.playback.done
    assert w.clock.getDelayedCalls() == []


def test_pause_sends_nothing_and_resume_does_not_count_the_pause_as_playout():
    w = World(lead=0.1)
    w.playback.add(seconds(2.0))
    w.pacer.add(w.playback)
    w.run(0.3)
    w.playback.pause()
    sent = w.line.sent
    w.run(1.0)
    assert w.line.sent == sent, "nothing sent while paused"
    assert w.playback.played == sent, "the caller's buffer played out meanwhile"
    w.playback.resume(w.clock.seconds())
    assert w.line.sent == sent + int(0.1 * BYTES_PER_SECOND), "a lead's worth leaves at once"
    w.run(0.2)
    assert w.playback.played == pytest.approx(sent + 0.2 * BYTES_PER_SECOND)


def test_falling_behind_plays_silence_not_time_owed():
    w = World(lead=0.1)
    w.playback.add(seconds(0.1))
    w.pacer.add(w.playback)
    w.run(1.0)  # synthesis is late: the ear has played all 100 ms, then silence
    assert w.playback.played == w.line.sent == int(0.1 * BYTES_PER_SECOND)
    w.playback.add(seconds(1.0))
    w.run(0.02)
    assert w.line.sent == int(0.2 * BYTES_PER_SECOND), "new audio leaves a lead ahead of now, no catching up"
    w.playback.stop()


def test_each_frame_is_told_when_it_plays():
    told: list[float] = []
    w = World(lead=0.1, on_sent=lambda pcm, ahead: told.append(round(ahead, 4)))
    w.playback.add(seconds(1.0))
    w.pacer.add(w.playback)
    assert told == [0.0, 0.02, 0.04, 0.06, 0.08], "the first burst plays one frame after another"
    w.run(0.5)
    assert all(0.08 - 1e-6 <= t <= 0.1 + 1e-6 for t in told[5:]), "then each frame plays about a lead after now"
    w.playback.stop()


def test_heard_text_is_cut_by_the_audio_heard():
    w = World(lead=0.1)
    w.playback.add(seconds(1.0), "one two three four")
    w.playback.add(seconds(1.0), "five six")
    assert w.playback.heard_text(int(0.5 * BYTES_PER_SECOND)) == "one two"
    assert w.playback.heard_text(int(1.5 * BYTES_PER_SECOND)) == "one two three four five"
    assert w.playback.full_text() == "one two three four five six"


# ================================================================ marks


def test_marks_every_100ms_and_the_last_one_says_so():
    w = World(lead=0.1, marks=True)
    w.playback.add(seconds(0.26))
    w.pacer.add(w.playback)
    w.playback.finish()
    w.run(0.4)
    positions = [w.ledger._pending[name][1] for name, _ in w.line.marks]
    assert [name for name, _ in w.line.marks] == ["upvoot-1", "upvoot-2", "upvoot-3"]
    assert positions == [3200, 6400, 8320]
    assert [last for _, last in w.line.marks] == [False, False, True]


def test_an_acknowledged_mark_moves_the_clock_of_what_was_heard():
    w = World(lead=0.1, marks=True)
    w.playback.add(seconds(0.5), "one two three four five")
    w.pacer.add(w.playback)
    w.run(0.3)
    assert w.playback.heard == 0, "where the line acknowledges, only marks say what was heard"
    (first, _), (second, _) = w.line.marks[1:3]  # at 200 and 300 ms
    w.ledger.acknowledged(first, cleared=False)
    assert w.playback.acked == 6400
    assert w.playback.heard_text() == "one two"
    w.ledger.acknowledged(second, cleared=True)  # dropped by a clear: not heard
    assert w.playback.acked == 6400
    w.ledger.acknowledged(first, cleared=False)  # once only
    w.ledger.acknowledged("someone-else", cleared=False)
    assert w.playback.acked == 6400
    w.playback.stop()


def test_the_first_acknowledgement_says_when_the_caller_started_hearing():
    w = World(lead=0.1, marks=True)
    started: list[float] = []
    w.playback.on_first_ack = started.append
    w.playback.add(seconds(0.5))
    w.pacer.add(w.playback)
    w.run(0.3)
    w.ledger.acknowledged(w.line.marks[1][0], cleared=False)  # 200 ms of audio, heard by 50.3
    assert started == [pytest.approx(50.1)]
    w.playback.stop()


def test_a_playback_waits_for_its_last_mark_then_gives_up_after_the_grace():
    w = World(lead=0.1, marks=True)
    w.playback.add(seconds(0.2))
    w.playback.finish()
    w.pacer.add(w.playback)
    w.run(0.3)
    assert w.played == [], "played by our estimate, not yet acknowledged"
    w.ledger.acknowledged(w.line.marks[-1][0], cleared=False)
    assert w.played == [pytest.approx(50.3)]

    lost = World(lead=0.1, marks=True)
    lost.playback.add(seconds(0.2))
    lost.playback.finish()
    lost.pacer.add(lost.playback)
    lost.run(0.2 + Playback.MARK_GRACE - 0.04)
    assert lost.played == []
    lost.run(0.1)
    assert len(lost.played) == 1, "a mark that never comes back delays the end by MARK_GRACE at most"


def test_the_ledger_is_bounded_forgetting_finished_playbacks_first():
    clock, line = Clock(), Line()
    ledger = MarkLedger(line, clock)
    done = Playback(line, 0.1, lambda: None)
    live = Playback(line, 0.1, lambda: None)
    for i in range(MarkLedger.MAX_PENDING):
        ledger.mark(done if i % 2 else live, i, False)
    assert len(ledger) == MarkLedger.MAX_PENDING
    done.stop()
    ledger.mark(live, 1000, True)
    assert len(ledger) == MarkLedger.MAX_PENDING // 2 + 1, "the finished playback's marks went first"
    for i in range(MarkLedger.MAX_PENDING):
        ledger.mark(live, 2000 + i, False)
    assert len(ledger) == MarkLedger.MAX_PENDING
    ledger.acknowledged("upvoot-1", cleared=False)  # the oldest was forgotten: ignored
    assert live.acked == 0
    newest = f"upvoot-{2 * MarkLedger.MAX_PENDING + 1}"
    assert line.marks[-1] == (newest, False)
    ledger.acknowledged(newest, cleared=False)
    assert live.acked == 2000 + MarkLedger.MAX_PENDING - 1
