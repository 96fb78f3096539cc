"""A call seen from outside: the ICallHandle, its ILine and ICallRecorder, its one outcome."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES
from upvoot.call import CallOutcome, EndReason, ICallHandle, ICallRecorder, ILine, Pacer, new_call, state_of
from upvoot.call.inputs import INPUT_NAMES
from upvoot.call.machine import STATES, TRANSITIONS
from upvoot.call.playout import Playback
from upvoot.testing import QueueSTT, RecordingOutput, WORD_SECONDS, agent_config, make_agent, quiet, speech

STEP = 0.02


@implementer(ICallRecorder)
class Recorder:
    relpath = "recordings/call.wav"

    def __init__(self):
        self.caller_at: list[tuple[float, int]] = []
        self.agent_at: list[tuple[float, int]] = []
        self.stopped: list[float] = []

    def caller(self, t: float, pcm: bytes) -> None:
        self.caller_at.append((t, len(pcm)))

    def agent(self, t: float, pcm: bytes) -> None:
        self.agent_at.append((t, len(pcm)))

    def stop(self, duration: float) -> None:
        self.stopped.append(duration)


class Call:
    def __init__(self, config=None, stt=None, line=None, recorder=None):
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.line = line or RecordingOutput()
        self.outcomes: list[CallOutcome] = []
        self.agent = make_agent(config or agent_config(), stt=stt)
        self.handle = new_call(self.agent, self.line, self.clock, Pacer(self.clock), self.outcomes.append,
                               call_id="c" * 32, recorder=recorder)

    @property
    def state(self) -> str:
        return state_of(self.handle)

    def wait(self, seconds: float, audio: bytes | None = None) -> None:
        pcm = audio if audio is not None else quiet(seconds)
        for i in range(int(round(seconds / STEP))):
            self.handle.caller_audio(pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
            self.clock.advance(STEP)

    def until(self, state: str, limit: float = 30.0) -> None:
        waited = 0.0
        while self.state != state and waited < limit:
            self.wait(STEP)
            waited += STEP
        assert self.state == state, f"still {self.state} after {limit}s"


def test_the_handle_and_the_lines_provide_their_interfaces():
    call = Call(recorder=Recorder())
    assert verifyObject(ICallHandle, call.handle)
    assert call.handle.call_id == "c" * 32
    assert verifyObject(ILine, call.line)
    assert verifyObject(ILine, RecordingOutput(acknowledges_playout=True, min_lead=0.2))
    assert verifyObject(ICallRecorder, Recorder())


def test_every_state_declares_every_input():
    names = [s.name for s in STATES]
    assert len(INPUT_NAMES) == 24 and "hangup" in INPUT_NAMES
    assert set(TRANSITIONS) == set(itertools.product(names, INPUT_NAMES))
    assert set(TRANSITIONS.values()) == set(names)
    assert all(TRANSITIONS[("ended", name)] == "ended" for name in INPUT_NAMES), "ended is final"


def test_the_outcome_comes_once_and_carries_no_points():
    call = Call()
    call.handle.start()
    call.until("listening")
    call.wait(2.0)
    call.handle.hangup()
    call.handle.hangup()
    call.handle.end_requested()
    call.handle.shutdown()
    (outcome,) = call.outcomes
    assert isinstance(outcome, CallOutcome)
    assert outcome.end_reason is EndReason.HANGUP
    assert outcome.call_id == "c" * 32 and outcome.agent == "test"
    assert outcome.started_at == 1000.0, "the start is the injected clock's time"
    assert outcome.duration == pytest.approx(3 * WORD_SECONDS + 2.0, abs=0.05)
    assert outcome.ended_at == pytest.approx(outcome.started_at + outcome.duration, abs=1e-3)
    assert outcome.transcript[0]["text"] == "Hello there caller"
    assert not hasattr(outcome, "points_charged")


def test_nothing_happens_to_a_call_that_has_ended():
    call = Call()
    call.handle.start()
    call.until("listening")
    call.handle.end_requested()
    call.until("ended")
    events = list(call.line.events)
    call.handle.hangup()
    call.handle.caller_audio(speech(0.5))
    call.handle.caller_dtmf("1")
    call.handle.playout_acknowledged("upvoot-1", False)
    call.handle.start()
    assert call.state == "ended" and call.line.events == events
    assert len(call.outcomes) == 1 and call.outcomes[0].end_reason is EndReason.END_CALL
    assert call.clock.getDelayedCalls() == []


def test_no_input_is_fired_inside_a_transition():
    """Facts the core learns during a transition (a reply ready at once, a
    playback done) wait until that transition has returned."""
    call = Call(stt=QueueSTT(["hours", "bye"]))
    machine = call.handle._machine
    depth = [0, 0]  # now, most ever

    class Watch:
        def __getattr__(self, name):
            fire = getattr(machine, name)

            def watched(*args):
                depth[0] += 1
                depth[1] = max(depth)
                try:
                    fire(*args)
                finally:
                    depth[0] -= 1

            return watched

    call.handle._machine = Watch()
    call.handle.start()
    call.until("listening")
    call.wait(0.8, speech(0.8))
    call.until("speaking", limit=2.0)  # the scripted brain and tone TTS answer within the transition
    call.until("listening")
    call.handle.caller_dtmf("1")
    call.until("listening")
    call.wait(0.8, speech(0.8))
    call.until("ended")
    assert call.outcomes[0].end_reason is EndReason.AGENT
    assert depth == [0, 1]


def test_the_recorder_gets_both_sides_where_they_are_heard_and_is_stopped_once():
    recorder = Recorder()
    call = Call(recorder=recorder)
    call.handle.start()
    call.wait(0.1)
    call.handle.hangup()
    call.handle.hangup()
    # the greeting's first burst is sent at t=0 but plays frame after frame
    starts = [t for t, _ in recorder.agent_at]
    assert starts[:5] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert all(n == FRAME_BYTES for _, n in recorder.agent_at)
    assert [t for t, _ in recorder.caller_at] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert recorder.stopped == [pytest.approx(0.1)]


def test_a_line_that_acknowledges_playout_gets_marks_and_its_acks_are_the_clock():
    line = RecordingOutput(acknowledges_playout=True)
    call = Call(line=line)
    call.handle.start()
    call.wait(3 * WORD_SECONDS + 0.1)
    marks = [e for e in line.events if e[0] == "mark"]
    assert marks[-1][2] is True and not any(last for _, _, last in marks[:-1]), "the last mark says so"
    assert [m[1] for m in marks] == [f"upvoot-{i}" for i in range(1, len(marks) + 1)]
    assert call.state == "speaking", "played by our estimate, but not acknowledged"
    for _, name, _ in marks:
        call.handle.playout_acknowledged(name, False)
    assert call.state == "listening"
    assert line.transcripts()[-1] == ("agent", "Hello there caller")


def test_a_line_without_acks_gets_no_marks_and_its_min_lead_is_kept():
    line = RecordingOutput(min_lead=0.5)
    call = Call(line=line)
    call.handle.start()
    assert line.audio_bytes == int(0.5 * BYTES_PER_SECOND), "a provider's minimum chunk leaves at once"
    call.until("listening")
    assert not any(e[0] == "mark" for e in line.events)
    call.handle.hangup()


def test_playbacks_need_only_audio_from_their_line():
    sent: list[int] = []

    class Audio:
        def audio(self, pcm: bytes) -> None:
            sent.append(len(pcm))

    clock = Clock()
    playback = Playback(Audio(), 0.1, lambda: None)
    playback.add(bytes(6400))
    Pacer(clock).add(playback)
    assert sum(sent) == 3200
    playback.stop()
