"""The call machine driven by task.Clock with deterministic engines."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from upvoot.audio import FRAME_BYTES
from upvoot.call import CallOutcome, Pacer, new_call, state_of
from upvoot.call.outcome import STAGES
from upvoot.ledger.billing import points_for
from upvoot.testing import QueueSTT, RecordingOutput, ToneTTS, WORD_SECONDS, agent_config, make_agent, quiet, speech

STEP = 0.02


class Harness:
    def __init__(self, config=None, stt=None, tts=None):
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.out = RecordingOutput()
        self.pacer = Pacer(self.clock)
        self.ended: list[dict] = []
        self.agent = make_agent(config or agent_config(), stt=stt, tts=tts)
        self.call = new_call(self.agent, self.out, self.clock, self.pacer, self._ended)
        self.report = self.call.report

    def _ended(self, outcome: CallOutcome) -> None:
        """The outcome as a dict, with the points the ledger charges for it."""
        cfg = self.agent.config
        self.ended.append(dict(attrs.asdict(outcome, recurse=False),
                               points_charged=points_for(outcome.duration, cfg.billing_increment, cfg.points_per_increment)))

    def start(self):
        self.call.start()

    @property
    def state(self):
        return state_of(self.call)

    def wait(self, seconds: float, audio: bytes | None = None):
        """Advance time in 20 ms steps, feeding ``audio`` (or silence) as the caller."""
        n = int(round(seconds / STEP))
        pcm = audio if audio is not None else quiet(seconds)
        for i in range(n):
            frame = pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]
            if frame and self.state != "ended":
                self.call.caller_audio(frame)
            self.clock.advance(STEP)

    def say(self, seconds: float):
        self.wait(seconds, speech(seconds))

    def until(self, state: str, limit: float = 30.0):
        t = 0.0
        while self.state != state and t < limit:
            self.wait(STEP)
            t += STEP
        assert self.state == state, f"still {self.state} after {limit}s"
        return t


def greeted() -> Harness:
    h = Harness(stt=QueueSTT(["what are your opening hours", "bye now"], interim="what are"))
    h.start()
    h.until("listening")
    return h


def test_greeting_starts_at_once_and_is_paced():
    h = Harness()
    h.start()
    # the first frames leave at once, bounded by the lead (100 ms)
    assert h.out.kinds()[:2] == ["audio_start", "audio"]
    assert 0 < h.out.audio_bytes <= int(0.1 * 32000) + FRAME_BYTES
    greeting_seconds = 3 * WORD_SECONDS
    h.wait(greeting_seconds / 2)
    # never dumped: what was sent stays within the lead of real time
    assert h.out.audio_bytes <= int((greeting_seconds / 2 + 0.1) * 32000) + FRAME_BYTES
    t = h.until("listening")
    assert h.out.events[-2] == ("audio_end", False)
    assert h.out.events[-1] == ("transcript", "agent", "Hello there caller")
    assert h.out.audio_bytes == int(greeting_seconds * 32000)
    assert t < greeting_seconds


def test_full_turn_messages_in_order():
    h = greeted()
    mark = len(h.out.events)
    h.say(1.0)
    h.until("speaking", limit=2.0)
    h.until("listening")
    kinds = h.out.kinds()[mark:]
    assert "interim" in kinds
    final = kinds.index("transcript")
    assert all(k != "interim" for k in kinds[final:]), "no interim after the final"
    assert kinds.index("interim") < final
    assert kinds[final:final + 3] == ["transcript", "turn_start", "audio_start"]
    assert h.out.transcripts()[-2:] == [("caller", "what are your opening hours"), ("agent", "We are open nine to five.")]
    assert h.report.turns == 1
    assert [t.role for t in h.report.history] == ["agent", "caller", "agent"]
    (lat,) = h.report.latencies
    assert lat["end_of_turn"] + lat["turn_model"] == pytest.approx(0.6, abs=0.03)
    assert lat["voice_to_voice"] == pytest.approx(sum(lat[k] for k in STAGES), abs=1e-3)


def test_barge_in_pauses_within_two_frames_then_drops_the_rest():
    tts = ToneTTS()
    cfg = agent_config(rules={"rule.long": "hours -> One two three four five six seven eight nine ten eleven twelve."})
    h = Harness(cfg, stt=QueueSTT(["hours please", "stop"]), tts=tts)
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("speaking", limit=2.0)
    h.wait(1.0)  # about four words played
    sent_before = h.out.audio_bytes
    h.wait(0.06, speech(0.06))  # onset after two voiced frames
    assert h.state == "paused"
    paused_at = h.out.audio_bytes
    assert paused_at - sent_before <= 3 * FRAME_BYTES
    h.say(0.4)  # confirmed: barge-in
    assert h.state == "hearing"
    assert h.out.audio_bytes == paused_at, "nothing sent after the pause"
    assert ("clear",) in h.out.events and ("audio_end", True) in h.out.events
    heard = [e for e in h.out.events if e[:2] == ("transcript", "agent")][-1][2]
    assert heard.startswith("One two three") and "twelve" not in heard
    assert h.report.history[-1].text == heard
    assert h.report.barge_ins == 1


def test_barge_in_stops_synthesis_of_the_rest_of_the_reply():
    sentences = ["Sentence number %s is here." % n for n in ("one", "two", "three", "four", "five", "six")]
    cfg = agent_config(rules={"rule.long": "hours -> " + " ".join(sentences)})
    h = Harness(cfg, stt=QueueSTT(["hours please", "stop"]))
    tts = h.agent.tts = ToneTTS(clock=h.clock, work=0.05)  # 5x faster than real time
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("speaking", limit=3.0)
    h.wait(0.3)
    h.say(0.5)  # barge in during the first sentence
    assert h.state == "hearing"
    asked = list(tts.requests)
    h.wait(3.0)  # the caller's new turn is answered, but the old reply is not resumed
    later = tts.requests[len(asked):]
    assert len(asked) < len(sentences)
    assert not any(s in later for s in sentences), "no synthesis of the dropped reply after the barge-in"
    assert h.clock.getDelayedCalls() != []  # the call goes on (silence timers), but:
    h.call.hangup()
    assert h.clock.getDelayedCalls() == []


def test_noise_blip_resumes_the_reply():
    cfg = agent_config(rules={"rule.long": "hours -> One two three four five six seven eight."})
    h = Harness(cfg, stt=QueueSTT(["hours please"]))
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("speaking", limit=2.0)
    h.wait(0.5)
    h.wait(0.1, speech(0.1))  # a click: below barge_in_min and min_utterance
    h.until("speaking", limit=2.0)
    h.until("listening")
    assert h.report.barge_ins == 0 and h.report.barge_ins_resumed == 1
    assert h.out.transcripts()[-1] == ("agent", "One two three four five six seven eight.")


def test_silence_prompts_then_ends_at_timeout_not_before():
    h = greeted()
    h.wait(5.9)
    assert h.state == "listening"
    h.wait(0.2)
    assert h.state == "speaking"  # "Are you still there"
    h.until("listening")
    h.wait(10.0 - 6.1 - 3 * WORD_SECONDS - 0.2)
    assert h.state == "listening", "silence is counted from the end of agent audio, the prompt does not reset it"
    h.until("ending", limit=0.5)
    h.until("ended")
    assert h.ended[0]["end_reason"] == "silence"
    assert h.out.closed
    assert h.clock.getDelayedCalls() == []


def test_max_duration_ends_with_closing_line():
    cfg = agent_config(max_duration=20.0, wrap_up_before=0.0, silence_timeout=100.0, silence_prompt_after=0.0)
    h = Harness(cfg)
    h.start()
    h.wait(19.9)
    assert h.state == "listening"
    h.wait(0.2)
    assert h.state == "ending"
    h.until("ended")
    s = h.ended[0]
    assert s["end_reason"] == "max_duration"
    assert s["transcript"][-1]["text"] == "Time is up goodbye"
    assert h.clock.getDelayedCalls() == []


def test_wrap_up_warning_before_max_duration():
    cfg = agent_config(max_duration=30.0, wrap_up_before=10.0, silence_timeout=100.0, silence_prompt_after=0.0)
    h = Harness(cfg)
    h.start()
    h.wait(20.1)
    assert h.state == "speaking"
    h.until("listening")
    assert h.out.transcripts()[-1] == ("agent", "Almost out of time")


def test_max_turns_closes_after_the_last_reply():
    cfg = agent_config(max_turns=2)
    h = Harness(cfg, stt=QueueSTT(["hours", "hours again"]))
    h.start()
    h.until("listening")
    for _ in range(2):
        h.say(0.8)
        h.until("speaking", limit=2.0)
        h.until("listening" if h.report.turns < 1 else "ending")
    h.until("ended")
    assert h.ended[0]["end_reason"] == "max_turns"
    assert h.ended[0]["turns"] == 2


def test_end_call_says_goodbye_then_closes():
    h = greeted()
    h.call.end_requested()
    assert h.state == "ending"
    h.until("ended")
    assert h.out.transcripts()[-1] == ("agent", "Goodbye from us")
    assert h.out.kinds()[-1] == "close"
    assert h.ended[0]["end_reason"] == "end_call"
    assert h.clock.getDelayedCalls() == []


def test_brain_end_rule_ends_call_with_agent_reason():
    h = Harness(stt=QueueSTT(["ok bye"]))
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("ended", limit=10)
    assert h.ended[0]["end_reason"] == "agent"
    assert h.out.transcripts()[-1] == ("agent", "Goodbye then!")


def test_hangup_mid_greeting_leaves_nothing_behind():
    h = Harness()
    h.start()
    h.wait(0.1)
    h.call.hangup()
    assert h.state == "ended"
    assert h.clock.getDelayedCalls() == []
    assert len(h.ended) == 1 and h.ended[0]["end_reason"] == "hangup"
    h.call.hangup()  # twice is harmless
    assert len(h.ended) == 1


def test_hangup_while_thinking_cancels_the_transcription():
    stt = QueueSTT(["hours"], hold=True)
    h = Harness(stt=stt)
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("thinking", limit=2.0)
    pending = list(stt.pending)
    h.call.hangup()
    assert pending and all(d.called for d in pending)  # cancelled
    assert h.clock.getDelayedCalls() == []


def test_caller_speaks_again_while_thinking_joins_the_turn():
    stt = QueueSTT(["hours", "open"], hold=True)
    h = Harness(stt=stt)
    h.start()
    h.until("listening")
    h.say(0.8)
    h.wait(0.6)
    assert h.state == "thinking"
    first_len = stt.requests[-1][0]
    h.say(0.6)
    assert h.state == "hearing"
    h.wait(0.7)
    assert h.state == "thinking"
    assert stt.requests[-1][0] > first_len  # both pieces are transcribed as one turn


def test_failing_engine_apologises_then_gives_up():
    class Broken(QueueSTT):
        def transcribe(self, pcm, final):
            if final:
                return defer.fail(RuntimeError("model exploded"))
            return defer.succeed("")

    h = Harness(agent_config(max_failures=2), stt=Broken())
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("speaking", limit=2.0)
    h.until("listening")
    assert h.out.transcripts()[-1] == ("agent", "Sorry about that")
    h.say(0.8)
    h.until("ended")
    assert h.ended[0]["end_reason"] == "error"
    assert h.ended[0]["engine_failures"] == 2


def test_points_by_rate_and_increment():
    h = Harness(agent_config(points_per_increment=3, billing_increment=60.0, silence_timeout=200.0,
                             silence_prompt_after=0.0))
    h.start()
    h.wait(61.0)
    h.call.hangup()
    assert h.ended[0]["points_charged"] == 6  # two started minutes at 3 points


def test_dtmf_is_a_caller_turn_and_interrupts():
    cfg = agent_config(rules={"rule.one": "dtmf 1 -> You pressed one.",
                              "rule.long": "hours -> One two three four five six seven eight."})
    h = Harness(cfg, stt=QueueSTT(["hours"]))
    h.start()
    h.until("listening")
    h.call.caller_dtmf("1")
    h.until("listening")
    assert h.out.transcripts()[-2:] == [("caller", "DTMF 1"), ("agent", "You pressed one.")]
    h.say(0.8)
    h.until("speaking", limit=2.0)
    h.wait(0.5)
    h.call.caller_dtmf("1")  # interrupts the long reply
    assert ("audio_end", True) in h.out.events
    h.until("listening")
    assert h.out.transcripts()[-1] == ("agent", "You pressed one.")


def test_dtmf_waits_for_the_agent_when_configured_not_to_interrupt():
    cfg = agent_config(dtmf_interrupts=False, rules={"rule.one": "dtmf 1 -> You pressed one.",
                                                      "rule.long": "hours -> One two three four."})
    h = Harness(cfg, stt=QueueSTT(["hours"]))
    h.start()
    h.until("listening")
    h.say(0.8)
    h.until("speaking", limit=2.0)
    h.call.caller_dtmf("1")
    assert ("audio_end", True) not in h.out.events
    h.until("listening")
    h.wait(0.1)
    h.until("listening")
    assert ("agent", "One two three four.") in h.out.transcripts()
    assert h.out.transcripts()[-1] == ("agent", "You pressed one.")
