"""The turn policy (``turn = smart | silence``) on a task.Clock: the end-of-turn
model's decision, the maximum pause, and the speculative work begun at the
pause (upvoot.call.turns, upvoot.call.speculation); the endpointer's pauses;
the worker pool's urgent slot."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES
from upvoot.call import Pacer, new_call, state_of
from upvoot.call.hearing import Ended, Endpointer, Onset, Paused, Quieted, Resumed
from upvoot.call.turns import unfinished
from upvoot.daemon.workers import WorkerPool
from upvoot.engines.interfaces import EngineBusy, IEndOfTurn, ILanguageModel, ISpeechToText, ReplyText
from upvoot.testing import RecordingOutput, agent_config, make_agent, quiet, speech

STEP = 0.02


@implementer(IEndOfTurn)
class Model:
    """Says ``probability`` ``delay`` seconds after it is asked (on the clock);
    ``fail``: it fails instead."""

    def __init__(self, clock, probability: float, delay: float = 0.07, fail: BaseException | None = None) -> None:
        self.clock, self.probability, self.delay, self.fail = clock, probability, delay, fail
        self.asked: list[int] = []
        self.cancelled = 0

    def predict(self, pcm: bytes) -> defer.Deferred:
        self.asked.append(len(pcm))
        if self.fail is not None:
            return defer.fail(self.fail)
        d = defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        call = self.clock.callLater(self.delay, lambda: d.called or d.callback(self.probability))
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d


@implementer(ISpeechToText)
class STT:
    """Finals answer ``text`` after ``delay`` on the clock; interims are skipped (busy)."""

    def __init__(self, clock, text: str = "what are your opening hours", delay: float = 0.15) -> None:
        self.clock, self.text, self.delay = clock, text, delay
        self.finals: list[defer.Deferred] = []
        self.cancelled = 0

    def transcribe(self, pcm: bytes, final: bool) -> defer.Deferred:
        if not final:
            return defer.fail(EngineBusy("interims off"))
        d = defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.finals.append(d)
        call = self.clock.callLater(self.delay, lambda: d.called or d.callback(self.text))
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d


@implementer(ILanguageModel)
class StreamingBrain:
    """A language model's shape: its reply streams after ``delay`` on the clock."""

    def __init__(self, clock, delay: float = 0.3, text: str = "We are open nine to five.") -> None:
        self.clock, self.delay, self.text = clock, delay, text
        self.asked: list[tuple] = []
        self.cancelled = 0

    async def reply(self, system_prompt, history):
        self.asked.append(tuple(history))
        d = defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        call = self.clock.callLater(self.delay, lambda: d.called or d.callback(None))
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        await d
        for word in self.text.split():
            yield ReplyText(word + " ")


class Harness:
    def __init__(self, probability: float = 0.9, turn: str = "smart", brain=None, fail=None, model_delay=0.07,
                 stt_delay=0.15, turn_transcribe_after=0.1, turn_unfinished_pause=0.6):
        """``brain``: clock -> the agent's brain (default: the scripted one)."""
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.out = RecordingOutput()
        cfg = agent_config(turn=turn, turn_pause=0.2, turn_max_pause=2.5, interim_interval=0.0,
                           turn_transcribe_after=turn_transcribe_after, turn_unfinished_pause=turn_unfinished_pause)
        self.stt = STT(self.clock, delay=stt_delay)
        self.agent = make_agent(cfg, stt=self.stt)
        self.model = self.agent.turn_model = Model(self.clock, probability, model_delay, fail)
        if brain is not None:
            self.agent.brain = self.brain = brain(self.clock)
        self.outcomes = []
        self.call = new_call(self.agent, self.out, self.clock, Pacer(self.clock), self.outcomes.append)
        self.call.start()
        self.until("listening")

    @property
    def state(self) -> str:
        return state_of(self.call)

    def wait(self, seconds: float, audio: bytes | None = None) -> None:
        pcm = audio if audio is not None else quiet(seconds)
        for i in range(int(round(seconds / STEP))):
            self.call.caller_audio(pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES])
            self.clock.advance(STEP)

    def say(self, seconds: float) -> None:
        self.wait(seconds, speech(seconds))

    def until(self, state: str, limit: float = 10.0) -> float:
        t = 0.0
        while self.state != state and t < limit:
            self.wait(STEP)
            t += STEP
        assert self.state == state, f"still {self.state} after {limit}s"
        return t

    def waited(self) -> float:
        """The first turn's wait from the end of speech to the end of the turn."""
        self.until("speaking")
        lat = self.call.report.latencies[0]
        return lat["end_of_turn"] + lat["turn_model"]

    def caller_turns(self) -> list[str]:
        return [text for role, text in self.out.transcripts() if role == "caller"]


# ---- the policy in a call ----------------------------------------------------------------------


def test_complete_ends_the_turn_at_the_short_silence_and_keeps_the_speculative_transcript():
    h = Harness(probability=0.9, stt_delay=0.03)
    h.say(1.0)
    assert h.state == "hearing"
    # 0.2 s of silence, then the model's 70 ms (the transcript came in 30 ms): not 600 ms
    assert h.waited() == pytest.approx(0.2 + 0.07, abs=0.03)
    assert len(h.model.asked) == 1
    assert len(h.stt.finals) == 1, "the transcription begun at the pause is the turn's: no second one"
    assert h.caller_turns() == ["what are your opening hours"]
    (lat,) = h.call.report.latencies
    assert lat["end_of_turn"] == pytest.approx(0.2, abs=0.03)
    assert lat["turn_model"] == pytest.approx(0.07, abs=0.03)
    assert lat["transcription"] == 0, "transcribed in parallel with the model"
    kinds = [e["kind"] for e in h.call.report.timeline]
    assert kinds.index("caller_start") < kinds.index("caller_end")


def test_finished_waits_for_the_transcript_it_needs_anyway():
    h = Harness(probability=0.9, stt_delay=0.3)
    h.say(1.0)
    # the transcription started at 100 ms of silence and took 300 ms; the model said finished at 270 ms
    assert h.waited() == pytest.approx(0.1 + 0.3, abs=0.03)
    (lat,) = h.call.report.latencies
    assert lat["transcription"] == 0 and lat["turn_model"] == pytest.approx(0.2, abs=0.03)


def test_the_final_transcription_starts_at_the_quiet_before_the_model_is_asked():
    h = Harness(probability=0.9, stt_delay=0.3)
    h.say(1.0)
    h.wait(0.12)
    assert len(h.stt.finals) == 1 and h.model.asked == [], "transcribing from 100 ms of silence, not asked yet"
    h.wait(0.1)
    assert len(h.model.asked) == 1 and len(h.stt.finals) == 1, "the pause asks the model; no second transcription"
    h.until("speaking", limit=1.0)
    assert h.caller_turns() == ["what are your opening hours"] and len(h.stt.finals) == 1


def test_speech_resuming_after_the_quiet_cancels_the_early_transcription_and_asks_nothing():
    h = Harness(probability=0.9, stt_delay=0.3)
    h.say(1.0)
    h.wait(0.14)
    h.say(0.3)  # the caller goes on before turn_pause
    assert h.stt.cancelled == 1 and h.model.asked == []
    assert h.call.core.turns.speculation is None
    h.until("speaking", limit=2.0)
    assert len(h.stt.finals) == 2 and len(h.model.asked) == 1


def test_transcribe_after_equal_to_the_pause_starts_both_together():
    h = Harness(probability=0.9, stt_delay=0.15, turn_transcribe_after=0.2)
    h.say(1.0)
    h.wait(0.16)
    assert h.stt.finals == [] and h.model.asked == []
    assert h.waited() == pytest.approx(0.2 + 0.15, abs=0.03)


def test_a_transcript_that_stops_on_a_dangling_word_is_unfinished_whatever_the_model_says():
    h = Harness(probability=0.9, stt_delay=0.05)
    h.stt.text = "I'd like to book a table for"
    h.say(1.0)
    h.wait(1.5)
    assert h.state == "hearing", "not cut off"
    h.stt.text = "I'd like to book a table for four people"
    h.say(0.5)
    assert h.waited() == pytest.approx(0.2 + 0.07, abs=0.03)
    assert h.caller_turns() == ["I'd like to book a table for four people"]


@pytest.mark.parametrize("text, dangles", [
    ("I'd like to book a table for", True), ("My account number is", True), ("I was wondering if,", True),
    ("so um", True), ("and then...", True), ("I need to speak to someone about", True), ("What are your opening hours?", False), ("Thank you.", False),
    ("I'd like to book a table for four.", False), ("", False), ("Go on", False), ("Than he was.", False),
])
def test_unfinished(text, dangles):
    assert unfinished(text) is dangles


def test_unfinished_by_the_model_alone_ends_at_the_fixed_silence():
    h = Harness(probability=0.1, stt_delay=0.05)
    h.say(1.0)
    assert h.waited() == pytest.approx(0.6, abs=0.03), "never later than turn = silence would end it"
    assert len(h.stt.finals) == 1, "the speculative transcript is the turn's"
    assert h.caller_turns() == ["what are your opening hours"]


def test_unfinished_by_the_model_waits_turn_unfinished_pause():
    h = Harness(probability=0.1, stt_delay=0.05, turn_unfinished_pause=1.2)
    h.say(1.0)
    h.wait(1.0)
    assert h.state == "hearing", "held past end_of_turn"
    assert h.waited() == pytest.approx(1.2, abs=0.03)
    assert h.caller_turns() == ["what are your opening hours"]


def test_a_caller_going_on_within_turn_unfinished_pause_is_one_turn():
    h = Harness(probability=0.1, stt_delay=0.05, turn_unfinished_pause=1.2)
    h.say(1.0)
    h.wait(0.9)  # a pause that end_of_turn (600 ms) would have cut
    h.stt.text = "what are your opening hours on Saturday"
    h.say(0.6)
    h.until("speaking")
    assert h.caller_turns() == ["what are your opening hours on Saturday"]


def test_turn_unfinished_pause_leaves_short_utterances_and_a_finished_model_alone():
    short = Harness(probability=0.1, stt_delay=0.05, turn_unfinished_pause=1.2)
    short.say(0.5)  # the model is not asked: end_of_turn decides
    assert short.waited() == pytest.approx(0.6, abs=0.03)
    done = Harness(probability=0.9, stt_delay=0.05, turn_unfinished_pause=1.2)
    done.say(1.0)
    assert done.waited() == pytest.approx(0.2 + 0.07, abs=0.03)


def test_a_short_utterance_is_left_to_the_fixed_silence_without_asking_the_model():
    h = Harness(probability=0.9, stt_delay=0.05)
    h.say(0.5)  # "Yes," (and perhaps "that's right" after a comma's pause): under MIN_VOICED
    assert h.waited() == pytest.approx(0.6, abs=0.03)
    assert h.model.asked == [] and len(h.stt.finals) == 1, "transcribed at the pause all the same"


def test_silence_ends_a_turn_only_once_its_transcript_is_there():
    """A transcription slower than end_of_turn: the turn ends when it comes
    (the reply waits for it anyway), not at 600 ms."""
    h = Harness(probability=0.9, stt_delay=0.9)
    h.say(0.5)  # under MIN_VOICED: silence decides
    h.wait(0.7)
    assert h.state == "hearing", "600 ms passed, the transcript is not there yet"
    assert h.waited() == pytest.approx(0.1 + 0.9, abs=0.05)
    assert len(h.stt.finals) == 1 and h.caller_turns() == ["what are your opening hours"]


def test_a_slow_transcript_that_dangles_holds_the_turn():
    h = Harness(probability=0.1, stt_delay=0.9)
    h.stt.text = "my account number is"
    h.say(1.0)
    h.wait(1.5)
    assert h.state == "hearing", "held: the late transcript dangles"
    h.stt.text = "my account number is seven three nine two"
    h.say(0.6)
    h.until("speaking")
    assert h.caller_turns() == ["my account number is seven three nine two"]


def test_a_caller_going_on_before_the_slow_transcript_is_one_turn():
    h = Harness(probability=0.1, stt_delay=0.9)
    h.say(1.0)
    h.wait(0.8)  # past end_of_turn, the transcript still under way
    h.stt.text = "what are your opening hours on Saturday"
    h.say(0.6)
    h.until("speaking")
    assert h.caller_turns() == ["what are your opening hours on Saturday"]


def test_a_short_utterance_that_dangles_is_held():
    h = Harness(probability=0.9, stt_delay=0.05)
    h.stt.text = "um"
    h.say(0.5)
    h.wait(1.5)
    assert h.state == "hearing" and h.model.asked == []


@pytest.mark.parametrize("stt_delay", [0.05, 0.3], ids=["transcript-first", "model-first"])
def test_a_dangling_transcript_holds_the_turn_and_speech_resuming_is_one_turn(stt_delay):
    h = Harness(probability=0.1, stt_delay=stt_delay)
    h.stt.text = "I'd like to book a table for"
    h.say(0.8)
    h.wait(1.5)  # past the pause and past the fixed 600 ms: the words go on, still listening
    assert h.state == "hearing" and len(h.model.asked) == 1
    h.stt.text = "I'd like to book a table for four people"
    h.say(0.6)  # "... four people"
    h.wait(0.2)
    assert len(h.model.asked) == 2, "asked again at the next pause"
    assert len(h.stt.finals) == 2, "the first transcript was dropped: the whole utterance is transcribed again"
    assert h.state == "hearing"
    h.until("speaking", limit=3.0)
    assert h.caller_turns() == ["I'd like to book a table for four people"], "one turn, not two"


def test_the_maximum_pause_ends_an_unfinished_turn_anyway():
    h = Harness(probability=0.1, stt_delay=0.05)
    h.stt.text = "My account number is"
    h.say(1.0)
    assert h.waited() == pytest.approx(2.5, abs=0.03)
    (lat,) = h.call.report.latencies
    assert lat["end_of_turn"] == pytest.approx(2.5, abs=0.03) and lat["turn_model"] == 0
    assert lat["transcription"] == 0, "transcribed at the pause, long before the turn ended"
    assert len(h.stt.finals) == 1


def test_a_model_that_cannot_answer_leaves_it_to_the_fixed_silence():
    h = Harness(fail=EngineBusy("busy"))
    h.say(1.0)
    assert h.waited() == pytest.approx(0.6, abs=0.03)


def test_the_silence_policy_never_asks_the_model():
    h = Harness(turn="silence")
    h.say(1.0)
    assert h.until("thinking") == pytest.approx(0.6, abs=0.03)
    h.until("speaking")
    assert h.model.asked == [] and len(h.stt.finals) == 1


def test_a_cough_is_discarded_as_before_and_the_model_is_not_asked():
    h = Harness(probability=0.9)
    h.say(0.1)
    h.wait(1.0)
    assert h.state == "listening" and h.model.asked == []


def test_speech_resuming_cancels_the_speculative_transcription_and_brain_request():
    h = Harness(probability=0.1, brain=lambda clock: StreamingBrain(clock, delay=1.0), stt_delay=0.05)
    brain = h.brain
    h.say(1.0)
    h.wait(0.4)  # pause at 0.2 s: model (unfinished) and transcription (50 ms); then the brain is asked
    assert len(brain.asked) == 1
    assert brain.asked[0][-1].role == "caller" and brain.asked[0][-1].text == "what are your opening hours"
    assert h.state == "hearing"
    h.say(0.5)  # the caller goes on
    assert brain.cancelled == 1, "the speculative brain request is cancelled"
    h.stt.delay = 1.0
    h.wait(0.2)
    assert len(h.stt.finals) == 2, "a new pause, a new speculation"
    # before the speculation's transcript: speech again cancels the transcription too
    h.say(0.3)
    assert h.stt.cancelled == 1
    h.until("speaking", limit=4.0)
    assert h.caller_turns() == ["what are your opening hours"]


def test_a_speculative_brain_reply_is_spoken_only_once_the_turn_has_ended():
    h = Harness(probability=0.1, brain=lambda clock: StreamingBrain(clock, delay=0.5), stt_delay=0.05)
    h.stt.text = "I'd like to book a table for"  # held open to the maximum pause
    brain = h.brain
    h.say(1.0)
    before = len(h.out.events)
    h.wait(2.0)  # the brain has answered (at ~0.75 s), the turn has not ended: nothing is said
    assert len(brain.asked) == 1 and h.state == "hearing"
    assert "audio_start" not in h.out.kinds()[before:] and h.caller_turns() == []
    h.until("speaking", limit=1.0)
    assert len(brain.asked) == 1, "the speculative request is the reply: the brain is not asked twice"
    (lat,) = h.call.report.latencies
    assert lat["brain_first_token"] == 0 and lat["transcription"] == 0
    assert lat["voice_to_voice"] == pytest.approx(lat["end_of_turn"] + lat["first_audio"], abs=1e-3)
    h.until("listening")
    assert h.out.transcripts()[-1] == ("agent", "We are open nine to five.")


def test_the_scripted_brain_is_never_asked_early():
    h = Harness(probability=0.1, stt_delay=0.05)
    h.say(1.0)
    h.wait(0.4)  # transcribed, the model said unfinished: the turn ends at 0.6 s
    assert h.call.core.turns.speculation is not None and h.call.core.turns.speculation.reply is None


def test_hanging_up_during_a_pause_drops_all_speculative_work():
    h = Harness(probability=0.1, stt_delay=1.0)
    h.say(1.0)
    h.wait(0.3)
    h.call.hangup()
    assert h.stt.cancelled == 1 and h.outcomes
    assert h.clock.getDelayedCalls() == []


# ---- the endpointer's pauses -------------------------------------------------------------------


def frames(ep: Endpointer, pattern: str) -> list[tuple[int, object]]:
    out = []
    for i, c in enumerate(pattern):
        for event in ep.feed(b"\0" * FRAME_BYTES, c == "x"):
            out.append((i, event))
    return out


def smart_endpointer() -> Endpointer:
    return Endpointer(2.5, 0.25, 20.0, 0.3, pause=0.2, discard_silence=0.6)


def test_the_endpointer_pauses_once_and_resumes_on_two_voiced_frames():
    ep = smart_endpointer()
    events = frames(ep, "x" * 20 + "." * 10 + "." * 5 + "x" + "." * 3 + "xx")
    kinds = [(i, type(e).__name__) for i, e in events]
    assert kinds == [(1, "Onset"), (14, "Confirmed"), (29, "Paused"), (40, "Resumed")]
    assert isinstance(events[2][1], Paused) and events[2][1].voiced == pytest.approx(0.4)
    assert ep.in_speech


def test_the_endpointer_quiets_before_it_pauses_and_resumes_from_either():
    ep = Endpointer(2.5, 0.25, 20.0, 0.3, pause=0.2, discard_silence=0.6, quiet=0.1)
    events = frames(ep, "x" * 20 + "." * 10)
    assert [(i, type(e).__name__) for i, e in events] == [(1, "Onset"), (14, "Confirmed"), (24, "Quieted"),
                                                          (29, "Paused")]
    assert isinstance(events[2][1], Quieted) and len(events[2][1].pcm) < len(events[3][1].pcm)
    assert ep.quiet
    assert [type(e).__name__ for _, e in frames(ep, "xx")] == ["Resumed"] and not ep.quiet
    events = frames(ep, "x" * 5 + "." * 6 + "x" + "." + "xx")  # a lone voiced frame in the quiet is a click
    assert [(i, type(e).__name__) for i, e in events] == [(9, "Quieted"), (14, "Resumed")]
    assert [type(e).__name__ for _, e in frames(ep, "." * 10)] == ["Quieted", "Paused"]


def test_end_now_and_end_after():
    ep = smart_endpointer()
    frames(ep, "x" * 20 + "." * 10)
    ended = ep.end_now()
    assert isinstance(ended, Ended) and ended.silence == pytest.approx(0.2) and not ep.in_speech
    assert ep.end_now() is None
    frames(ep, "x" * 20 + "." * 12)
    assert ep.end_after(0.6) is None, "not silent that long yet"
    events = frames(ep, "." * 18)
    assert [(i, type(e)) for i, e in events] == [(17, Ended)]
    assert frames(ep, "xx") == [(1, Onset())]


def test_without_pause_nothing_changes():
    ep = Endpointer(0.6, 0.25, 20.0, 0.3)
    events = frames(ep, "x" * 20 + "." * 29 + "x" + "." * 30)
    assert [type(e).__name__ for _, e in events] == ["Onset", "Confirmed", "Ended"]
    assert not any(isinstance(e, (Paused, Resumed)) for _, e in events)


# ---- the worker pool's urgent slot -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_urgent_work_has_its_own_slot():
    from twisted.internet import reactor

    pool = WorkerPool(reactor, size=1, queue_limit=4, name="test-urgent")
    pool.start()
    release = threading.Event()
    try:
        busy = pool.run(release.wait, 10)
        queued = pool.run(lambda: "final")
        with pytest.raises(EngineBusy):
            await pool.run(lambda: "interim", interim=True)
        assert await pool.run(lambda: "urgent", urgent=True) == "urgent", "not behind the busy thread"
        assert pool.queued == 1
        release.set()
        assert await busy is True and await queued == "final"
    finally:
        release.set()
        await threads.deferToThread(lambda: None)
        pool.stop()


# ---- the options ---------------------------------------------------------------------------------


def _load(tmp_path, agent: str):
    from upvoot.config import load_config

    ini = tmp_path / "upvoot.ini"
    ini.write_text(f"[upvoot]\n[agent:a]\n{agent}\n", encoding="utf-8")
    return load_config(str(ini))


def test_turn_options(tmp_path, monkeypatch):
    from upvoot.config import ConfigError
    from upvoot.engines import smartturn
    from upvoot.engines.interfaces import EngineUnavailable

    monkeypatch.setattr(smartturn, "model_path", lambda: "found")
    cfg = _load(tmp_path, "turn = smart\nturn_pause = 150ms").agents["a"]
    assert (cfg.turn, cfg.turn_pause, cfg.turn_max_pause, cfg.turn_unfinished_pause) == ("smart", 0.15, 2.5, 0.7)
    assert _load(tmp_path, "turn = smart\nturn_unfinished_pause = 1200ms").agents["a"].turn_unfinished_pause == 1.2
    with pytest.raises(ConfigError, match=r"\[agent:a\] turn_unfinished_pause: 20s is out of range \(100ms\.\.10s\)"):
        _load(tmp_path, "turn = smart\nturn_unfinished_pause = 20s")
    with pytest.raises(ConfigError, match=r"\[agent:a\] turn_pause: must be shorter than turn_max_pause"):
        _load(tmp_path, "turn = smart\nturn_pause = 1s\nturn_max_pause = 1s")
    with pytest.raises(ConfigError, match=r"\[agent:a\] turn: expected one of smart, silence"):
        _load(tmp_path, "turn = clever")

    def missing():
        raise EngineUnavailable("the smart-turn model is not installed")

    monkeypatch.setattr(smartturn, "model_path", missing)
    with pytest.raises(ConfigError, match=r"\[agent:a\] turn: turn = smart: the smart-turn model is not installed"):
        _load(tmp_path, "turn = smart")
    assert _load(tmp_path, "turn = silence").agents["a"].turn == "silence", "silence needs no model"
