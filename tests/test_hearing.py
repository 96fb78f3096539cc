"""The endpointer, the ear and the interim decoder, frame by frame on task.Clock."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from upvoot.audio import FRAME_BYTES
from upvoot.call.hearing import Confirmed, Discarded, Ear, Ended, Endpointer, Interims, Onset
from upvoot.engines.interfaces import EngineBusy

FRAME = bytes(FRAME_BYTES)


def endpointer(end_silence=0.2, min_utterance=0.1, max_utterance=1.0, confirm_after=0.1) -> Endpointer:
    return Endpointer(end_silence, min_utterance, max_utterance, confirm_after)


def feed(ep: Endpointer, pattern: str) -> list[tuple[int, object]]:
    """Feed one frame per character ('x' voiced, '.' not); (frame index, event) for every event."""
    out = []
    for i, c in enumerate(pattern):
        out.extend((i, e) for e in ep.feed(FRAME, c == "x"))
    return out


def test_onset_after_two_voiced_frames_in_a_row():
    ep = endpointer()
    assert feed(ep, "x.x.x.") == []  # single voiced frames are clicks
    assert not ep.in_speech
    assert feed(ep, "xx") == [(1, Onset())]
    assert ep.in_speech


def test_confirmed_once_voiced_audio_reaches_barge_in_min():
    ep = endpointer(confirm_after=0.1)  # five frames
    events = feed(ep, "xx.xxx" + "x" * 5)
    assert events == [(1, Onset()), (5, Confirmed())], "two at onset, then three more voiced; silence does not count"
    short = endpointer(confirm_after=0.04)
    assert [e for _, e in feed(short, "xx")] == [Onset(), Confirmed()]


def test_a_short_sound_is_discarded_at_the_end_of_its_silence():
    ep = endpointer(end_silence=0.2, min_utterance=0.1)
    events = feed(ep, "xxx" + "." * 10)
    assert [i for i, _ in events] == [1, 12]
    (_, discarded) = events[1]
    assert discarded == Discarded(voiced=0.06)
    assert not ep.in_speech


def test_the_turn_ends_after_end_of_turn_silence_with_its_pre_roll():
    ep = endpointer(end_silence=0.2, min_utterance=0.1)
    events = feed(ep, "....." + "x" * 10 + "." * 9)
    assert events == [(6, Onset()), (9, Confirmed())], "nine silent frames are not yet the end"
    (ended,) = ep.feed(FRAME, False)
    assert isinstance(ended, Ended) and not ended.forced
    assert ended.voiced == 0.2
    # the five frames before the onset (pre-roll), the speech, the silence that ended it
    assert len(ended.pcm) == (5 + 10 + 10) * FRAME_BYTES
    assert not ep.in_speech


def test_speech_resets_the_end_of_turn_silence():
    ep = endpointer(end_silence=0.2)
    events = feed(ep, "xxxxxx" + "." * 9 + "x" + "." * 9)
    assert [type(e) for _, e in events] == [Onset, Confirmed]
    assert ep.in_speech


def test_an_utterance_of_min_utterance_is_not_discarded():
    ep = endpointer(min_utterance=0.1, confirm_after=0.5)
    events = feed(ep, "xxxxx" + "." * 10)
    assert isinstance(events[-1][1], Ended)
    assert events[-1][1].voiced == 0.1


def test_max_utterance_forces_the_end():
    ep = endpointer(max_utterance=1.0)  # 50 frames from the onset
    events = feed(ep, "x" * 49)
    assert not any(isinstance(e, Ended) for _, e in events)
    (ended,) = ep.feed(FRAME, True)
    assert isinstance(ended, Ended) and ended.forced
    assert ended.voiced == 1.0
    assert feed(ep, "xx") == [(1, Onset())], "the caller still speaking starts a new utterance"


def test_reset_forgets_the_utterance():
    ep = endpointer()
    feed(ep, "xxxx")
    ep.reset()
    assert not ep.in_speech and ep.utterance == b""
    assert feed(ep, "x") == []


class Detector:
    """Voiced when a frame's first byte is non-zero; remembers what it was asked."""

    def __init__(self):
        self.frames: list[bytes] = []

    def is_speech(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return frame[0] != 0


def test_the_ear_cuts_any_length_into_frames():
    detector = Detector()
    ear = Ear(detector, endpointer())
    voiced = b"\x01" * FRAME_BYTES
    assert list(ear.hear(voiced[:100])) == []
    assert detector.frames == []
    assert list(ear.hear(voiced[100:] + voiced[:50])) == []  # one whole frame so far
    assert detector.frames == [voiced]
    assert list(ear.hear(voiced[50:] + voiced)) == [Onset()]
    assert len(detector.frames) == 3 and all(len(f) == FRAME_BYTES for f in detector.frames)


class STT:
    def __init__(self):
        self.asked: list[tuple[int, bool]] = []
        self.pending: list[defer.Deferred] = []

    def transcribe(self, pcm: bytes, final: bool) -> defer.Deferred:
        self.asked.append((len(pcm), final))
        d = defer.Deferred()
        self.pending.append(d)
        return d


def interims(clock, stt, ep, interval=0.4):
    shown: list[str] = []
    failed: list[BaseException] = []
    return Interims(clock, interval, stt, ep, shown.append, failed.append), shown, failed


def test_interims_every_interval_one_at_a_time_each_new_text_once():
    clock, stt, ep = Clock(), STT(), endpointer(max_utterance=10.0)
    data, shown, failed = interims(clock, stt, ep)
    feed(ep, "x" * 10)  # 0.2 s voiced: too little for a first decode
    clock.advance(0.4)
    assert stt.asked == []
    feed(ep, "x" * 10)
    clock.advance(0.4)
    assert stt.asked == [(len(ep.utterance), False)], "the utterance so far, as an interim"
    clock.advance(0.4)
    assert len(stt.asked) == 1, "one decode at a time"
    stt.pending[0].callback(" what are ")
    assert shown == ["what are"]
    clock.advance(0.4)
    stt.pending[1].callback("what are")
    assert shown == ["what are"], "the same text is not shown twice"
    clock.advance(0.4)
    stt.pending[2].errback(EngineBusy())
    clock.advance(0.4)
    stt.pending[3].errback(RuntimeError("down"))
    assert [str(e) for e in failed] == ["down"], "a busy engine is not a failure"
    data.cancel()
    assert clock.getDelayedCalls() == []


def test_cancel_stops_the_decoder_and_its_decode():
    clock, stt, ep = Clock(), STT(), endpointer(max_utterance=10.0)
    data, shown, failed = interims(clock, stt, ep)
    feed(ep, "x" * 20)
    clock.advance(0.4)
    (pending,) = stt.pending
    data.cancel()
    assert pending.called, "the decode in flight is cancelled"
    assert clock.getDelayedCalls() == []
    assert shown == [] and failed == []


def test_no_interims_when_the_interval_is_zero():
    clock, stt, ep = Clock(), STT(), endpointer()
    data, shown, failed = interims(clock, stt, ep, interval=0.0)
    assert clock.getDelayedCalls() == []
    data.cancel()


def test_the_pre_roll_and_its_trim_over_the_agent():
    from upvoot.call.hearing import OVERHEARD_PRE_ROLL, PRE_ROLL, Endpointer

    def started() -> tuple:
        ep = Endpointer(0.6, 0.25, 20.0, 0.3)
        quiet = [bytes([i, 0]) * (FRAME_BYTES // 2) for i in range(1, 41)]  # 40 distinct silent frames
        for frame in quiet:
            ep.feed(frame, False)
        for _ in range(15):  # 300 ms: an utterance, not a click
            ep.feed(voiced, True)
        return ep, quiet

    voiced = b"\x10\x20" * (FRAME_BYTES // 2)
    ep, quiet = started()
    lead = round(PRE_ROLL * 50) - 2  # the deque holds the two onset frames too
    assert ep.utterance == b"".join(quiet[-lead:]) + voiced * 15
    ep.trim_lead(OVERHEARD_PRE_ROLL)
    kept = round(OVERHEARD_PRE_ROLL * 50)
    assert ep.utterance == b"".join(quiet[-kept:]) + voiced * 15
    ep.trim_lead(10.0)  # never adds back
    assert ep.utterance == b"".join(quiet[-kept:]) + voiced * 15
    events = [e for _ in range(40) for e in ep.feed(FRAME, False)]
    ended = [e for e in events if isinstance(e, Ended)]
    assert len(ended) == 1 and ended[0].pcm.startswith(b"".join(quiet[-kept:]) + voiced * 15)
    ep2, _ = started()
    ep2.trim_lead(0.0)
    assert ep2.utterance == voiced * 15
