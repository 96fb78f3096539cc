"""Barge-in at the caller's ear, on task.Clock: clear at onset, resume from
the last acknowledged mark (the resent audio is exactly what was not
acknowledged), and backchannels that do not interrupt the agent."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from upvoot.audio import BYTES_PER_SECOND, FRAME_BYTES
from upvoot.call import Pacer, new_call, state_of
from upvoot.call.bargein import Backchannels, normalize
from upvoot.daemon.line import FramingLine
from upvoot.dial import AgentAudio, Cleared, make_sim
from upvoot.framing.base import PlayoutMark
from upvoot.framing.exotel import ExotelFraming
from upvoot.testing import QueueSTT, RecordingOutput, ToneTTS, agent_config, make_agent, quiet, speech

STEP = 0.02
LONG = {"rule.long": "hours -> One two three four five six seven eight nine ten eleven twelve."}


class ProviderLine(RecordingOutput):
    """A provider's line: keeps every byte sent, plays it at real time from
    its arrival (``tick``), echoes a mark once the audio before it has
    played, and on ``clear`` drops what has not played and every pending
    mark (the harshest provider: they never come back)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(acknowledges_playout=True)
        self.clock = clock
        self.call = None
        self.wire = bytearray()  # every agent byte sent, resends included
        self.ear = bytearray()  # what the caller heard, in order
        self._queue: list[bytes] = []
        self._play_end = 0.0
        self._marks: list[tuple[int, str]] = []  # (wire position, name)
        self._played_to = 0  # wire position played
        self.cuts: list[int] = []  # wire position played at each clear
        self.starts: list[int] = []  # wire position at each audio_start

    def audio(self, pcm: bytes) -> None:
        super().audio(pcm)
        self.wire += pcm

    def mark(self, name: str, last: bool) -> None:
        super().mark(name, last)
        self._marks.append((len(self.wire), name))

    def audio_start(self) -> None:
        super().audio_start()
        self.starts.append(len(self.wire))

    def clear(self) -> None:
        super().clear()
        self.cuts.append(self._played_to)
        self._played_to = len(self.wire)  # the unplayed rest is dropped
        self._marks.clear()

    def tick(self) -> None:
        """20 ms of real time: one frame plays, marks due are echoed."""
        if self._played_to < len(self.wire):
            frame = self.wire[self._played_to:self._played_to + FRAME_BYTES]
            self.ear += frame
            self._played_to += len(frame)
        while self._marks and self._marks[0][0] <= self._played_to:
            _, name = self._marks.pop(0)
            self.call.playout_acknowledged(name, False)


class Harness:
    def __init__(self, line_factory=None, stt=None, **cfg):
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.out = line_factory(self.clock) if line_factory else RecordingOutput()
        cfg.setdefault("rules", LONG)
        self.agent = make_agent(agent_config(**cfg), stt=stt or QueueSTT(["hours please"]), tts=ToneTTS())
        self.call = new_call(self.agent, self.out, self.clock, Pacer(self.clock), lambda outcome: None)
        self.out.call = self.call
        self.report = self.call.report

    @property
    def state(self):
        return state_of(self.call)

    def wait(self, seconds: float, audio: bytes | None = None):
        pcm = audio if audio is not None else quiet(seconds)
        for i in range(int(round(seconds / STEP))):
            frame = pcm[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]
            if frame and self.state != "ended":
                self.call.caller_audio(frame)
            self.clock.advance(STEP)
            if hasattr(self.out, "tick"):
                self.out.tick()

    def until(self, state: str, limit: float = 30.0):
        t = 0.0
        while self.state != state and t < limit:
            self.wait(STEP)
            t += STEP
        assert self.state == state, f"still {self.state} after {limit}s"

    def to_reply(self):
        self.call.start()
        self.until("listening")
        self.wait(0.8, speech(0.8))
        self.until("speaking", limit=2.0)


def reply_audio() -> bytes:
    """The long reply as the caller hears it when nobody interrupts."""
    h = Harness(ProviderLine)
    h.to_reply()
    reply0 = h.out.starts[-1]
    h.until("listening")
    return bytes(h.out.ear[reply0:])


def test_backchannel_words_match_the_recognizers_spellings():
    b = Backchannels(("mm-hm", "uh-huh", "yeah", "okay", "right", "i see"))
    assert normalize("Mm-hmm.") == normalize("mm-hm") == "mhm"
    for text in ("Mm-hmm.", "mhm", "Yeah.", "yeah, okay", "Okay!", "Uh-huh, right.", "I see."):
        assert b.match(text), text
    for text in ("", "...", "Yeah, but wait", "stop", "see", "okay what about Sunday"):
        assert not b.match(text), text
    assert not Backchannels(()).match("yeah"), "an empty list: nothing is a backchannel"


def test_onset_clears_the_provider_at_once_and_a_cough_resumes_from_the_last_acknowledged_mark():
    expected = reply_audio()
    h = Harness(ProviderLine)
    h.to_reply()
    h.wait(1.03)
    h.wait(0.06, speech(0.06))  # onset: two voiced frames
    assert h.state == "paused"
    assert h.out.events[-1] == ("clear",), "the clear leaves with the pause, not at confirmation"
    reply0, paused_at = h.out.starts[-1], len(h.out.wire)
    acked = h.call.core.reply.playback.acked
    heard = h.out.cuts[0] - reply0  # where the caller's ear stopped
    assert 0 < acked <= heard < paused_at - reply0, "audio was in the provider's buffer"
    h.wait(0.1, speech(0.1))  # a cough: discarded after the end-of-turn silence, the reply resumes
    assert h.state == "paused" and len(h.out.wire) == paused_at, "nothing sent while paused"
    h.until("speaking", limit=2.0)
    assert h.report.barge_ins == 0 and h.report.barge_ins_resumed == 1
    h.until("listening")
    wire = bytes(h.out.wire)
    assert wire[reply0:paused_at] == expected[:paused_at - reply0]
    assert wire[paused_at:] == expected[acked:], "resent: exactly what had not been acknowledged, then the rest"
    # the caller heard the reply up to the clear, then again from the last acknowledged byte
    assert bytes(h.out.ear[reply0:]) == expected[:heard] + expected[acked:]
    kinds = [e["kind"] for e in h.report.timeline]
    assert kinds.index("clear") < kinds.index("barge_in_resumed") < kinds.index("resume")


def test_a_raw_line_is_not_cleared_and_resumes_where_it_paused():
    h = Harness()
    h.to_reply()
    h.wait(1.0)
    h.wait(0.06, speech(0.06))
    assert h.state == "paused"
    sent = h.out.audio_bytes
    h.wait(0.1, speech(0.1))
    h.until("speaking", limit=2.0)
    h.until("listening")
    assert ("clear",) not in h.out.events
    assert h.out.transcripts()[-1] == ("agent", "One two three four five six seven eight nine ten eleven twelve.")
    assert h.out.audio_bytes > sent


def test_a_confirmed_barge_in_after_the_clear_sends_no_second_clear():
    h = Harness(ProviderLine, stt=QueueSTT(["hours please", "stop"], interim="stop now"),
                backchannels=("mm-hm", "yeah"))
    h.to_reply()
    h.wait(1.0)
    h.wait(0.5, speech(0.5))
    assert h.state == "hearing"
    assert h.out.kinds().count("clear") == 1
    assert ("audio_end", True) in h.out.events and h.report.barge_ins == 1
    kinds = [e["kind"] for e in h.report.timeline]
    assert "barge_in" in kinds and {"kind": "agent_end", "interrupted": True} in [
        {k: v for k, v in e.items() if k != "t"} for e in h.report.timeline]


@pytest.mark.parametrize("line", [None, ProviderLine], ids=["raw", "provider"])
def test_backchannels_do_not_interrupt_the_agent(line):
    h = Harness(line, stt=QueueSTT(["hours please"], interim="Mm-hmm."), backchannels=("mm-hm", "yeah", "okay"))
    h.to_reply()
    h.wait(1.0)
    h.wait(0.4, speech(0.4))  # long enough to be confirmed, and its words are a backchannel
    # the agent went on; the ear starts afresh, so the tail of the "mm-hm" is a new onset, a short one
    assert h.state in ("speaking", "paused")
    h.until("listening")
    assert h.report.barge_ins == 0 and h.report.barge_ins_resumed >= 1
    assert {"kind": "barge_in_resumed", "backchannel": True} in [
        {k: v for k, v in e.items() if k != "t"} for e in h.report.timeline]
    assert h.out.transcripts()[-1] == ("agent", "One two three four five six seven eight nine ten eleven twelve.")
    assert not any(e == ("audio_end", True) for e in h.out.events)


def test_other_words_are_a_barge_in_and_no_list_means_every_confirmed_speech_is_one():
    for interim, phrases in (("wait a second", ("mm-hm", "yeah")), ("yeah", ())):
        h = Harness(stt=QueueSTT(["hours please"], interim=interim), backchannels=phrases)
        h.to_reply()
        h.wait(1.0)
        h.wait(0.4, speech(0.4))
        assert h.state == "hearing", (interim, phrases)
        assert h.report.barge_ins == 1


class SlowInterims(QueueSTT):
    """Interims answered only when the test says (finals as QueueSTT)."""

    def transcribe(self, pcm, final):
        if final:
            return super().transcribe(pcm, final)
        self.requests.append((len(pcm), final))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, text):
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(text)


@pytest.mark.parametrize("words, state", [("okay", "speaking"), ("what about sunday", "thinking")])
def test_an_utterance_that_ends_before_its_words_are_known_waits_for_them(words, state):
    stt = SlowInterims(["hours please", "what about sunday"])
    h = Harness(ProviderLine, stt=stt, backchannels=("okay",))
    h.to_reply()
    h.wait(1.0)
    h.wait(0.4, speech(0.4))
    assert h.state == "judging"
    h.wait(1.0)  # the utterance ends: its audio is held
    assert h.state == "judged"
    stt.answer(words)
    if state == "thinking":  # the held utterance is the caller's turn (answered at once by these engines)
        assert h.state in ("thinking", "speaking") and h.report.barge_ins == 1
        h.until("listening")
        assert ("caller", "what about sunday") in h.out.transcripts()
    else:
        assert h.state == "speaking" and h.report.barge_ins == 0
        h.until("listening")
        assert h.out.transcripts()[-1][1].endswith("eleven twelve.")
    assert h.clock.getDelayedCalls() != []
    h.call.hangup()
    assert h.clock.getDelayedCalls() == []


def test_resent_seconds_are_in_the_timeline():
    h = Harness(ProviderLine)
    h.to_reply()
    h.wait(1.0)
    h.wait(0.06, speech(0.06))
    unheard = len(h.out.wire) - h.out.starts[-1] - h.call.core.reply.playback.acked
    h.wait(0.1, speech(0.1))
    h.until("speaking", limit=2.0)
    (clear,) = [e for e in h.report.timeline if e["kind"] == "clear"]
    (resume,) = [e for e in h.report.timeline if e["kind"] == "resume"]
    assert unheard > 0
    assert clear["unheard"] == resume["resent"] == pytest.approx(unheard / BYTES_PER_SECOND, abs=1e-3)


def test_the_backchannels_option_is_a_list_of_short_phrases(tmp_path):
    from upvoot.config import ConfigError, load_config

    ini = tmp_path / "u.ini"
    ini.write_text("[upvoot]\n[agent:a]\nbackchannels = Mm-hm,  yeah , I  see,\n[agent:b]\nbackchannels =\n")
    cfg = load_config(str(ini))
    assert cfg.agents["a"].backchannels == ("mm-hm", "yeah", "i see")
    assert cfg.agents["b"].backchannels == ()
    ini.write_text("[upvoot]\n[agent:a]\nbackchannels = yeah, this is far too long a phrase\n")
    with pytest.raises(ConfigError, match=r"\[agent:a\].*backchannels"):
        load_config(str(ini))


# ---- the same over the real Exotel codec at 8 kHz ------------------------------------------


class ExotelLine(FramingLine):
    """The call's real ``FramingLine`` over the real ``ExotelFraming`` at
    8 kHz, wired on the clock to the Exotel simulator of ``upvoot.dial``
    (chunks play in real time from arrival; marks are echoed once the audio
    before them has played; a clear lets the playing 200 ms chunk finish
    and drops the rest). Keeps each media payload (8 kHz s16le) with the
    time it starts playing, and the clear times."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.call = None
        self.sim = make_sim("exotel", sample_rate=8000)
        self.chunks: list[tuple[float, bytes]] = []  # (plays_at, payload), in arrival order
        self.clears: list[float] = []
        self.cuts: list[tuple[int, float]] = []  # (chunks received before it, where the ear stops) per clear
        self.starts: list[int] = []  # number of chunks at each audio_start
        super().__init__(ExotelFraming(), self._to_sim, lambda code, reason: None)
        for frame in self.sim.open():
            self._from_sim(frame)

    def _to_sim(self, frames) -> None:
        now = self.clock.seconds()
        for frame in frames:
            msg = json.loads(frame.payload)
            for event in self.sim.receive_text(frame.payload, now):
                if isinstance(event, AgentAudio):
                    self.chunks.append((event.plays_at, base64.b64decode(msg["media"]["payload"])))
                elif isinstance(event, Cleared):
                    self.clears.append(now)

    def _from_sim(self, frame) -> None:
        for event in self.framing.receive_text(frame.payload):
            if isinstance(event, PlayoutMark) and self.call is not None:
                self.call.playout_acknowledged(event.name, event.cleared)
        self.send(self.framing.drain())

    def audio_start(self) -> None:
        self.starts.append(len(self.chunks))
        super().audio_start()

    def tick(self) -> None:
        for frame in self.sim.poll(self.clock.seconds()):
            self._from_sim(frame)

    def clear(self) -> None:
        now = self.clock.seconds()
        playing = [p + len(c) / 16000 for p, c in self.chunks if p <= now < p + len(c) / 16000]
        self.cuts.append((len(self.chunks), playing[0] if playing else now))
        super().clear()

    def ear(self, since: int) -> bytes:
        """What the caller heard of the chunks from ``since`` on: a clear lets
        the chunk playing at that moment finish and drops the chunks that
        had arrived and would have played after it."""
        heard = []
        for i, (plays_at, payload) in enumerate(self.chunks):
            clear = next(((n, cut) for n, cut in self.cuts if i < n), None)  # the first clear after it came
            if i >= since and (clear is None or plays_at < clear[1] - 1e-6):
                heard.append((plays_at, payload))
        return b"".join(c for _, c in sorted(heard, key=lambda x: x[0]))


def _samples(payload: bytes) -> np.ndarray:
    payload = payload.rstrip(b"\0")
    return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2").astype(np.int32)


def test_over_exotel_8khz_a_resume_from_the_last_echoed_mark_says_nothing_twice():
    """Exotel's 200 ms chunks at 8 kHz: each mark falls at a chunk's end, so
    the mark echoed after the clear (the playing chunk finished) is exactly
    where the caller's ear stopped, and the resume holds every sample once."""
    ref = Harness(ExotelLine)
    ref.to_reply()
    first = ref.out.starts[-1]
    ref.until("listening")
    expected = _samples(ref.out.ear(first))
    assert ref.out.clears == [] and ref.out.sim.violations == []
    for after in (1.03, 1.11, 1.27):  # the onset at other phases of the 200 ms chunk grid
        h = Harness(ExotelLine)
        h.to_reply()
        first = h.out.starts[-1]
        h.wait(after)
        h.wait(0.06, speech(0.06))
        assert h.state == "paused" and len(h.out.clears) == 1
        h.wait(0.5)  # the playing chunk finishes; its mark comes back
        playback = h.call.core.reply.playback
        heard = h.out.ear(first)
        assert playback.acked == 2 * len(heard), "acknowledged = heard, to the byte (16 kHz vs 8 kHz)"
        h.until("speaking", limit=2.0)
        assert h.report.barge_ins == 0 and h.report.barge_ins_resumed == 1
        h.until("listening")
        assert h.out.sim.violations == []
        got = _samples(h.out.ear(first))
        assert len(got) == len(expected), f"onset at +{after}s: {len(got) - len(expected)} samples more than the reply"
        # the resent audio is resampled again, after a prime with the 40 ms heard before it: the
        # seam is seamless (a fresh resampler's start differed by up to 2,600 LSB for ~6 ms); two
        # uninterrupted 8 kHz streams differ by 2 LSB (soxr's blocks)
        assert int(np.abs(got - expected).max()) <= 4, after


def test_speech_over_the_agent_keeps_only_a_short_pre_roll():
    """Before the caller's first word over the agent, the line may carry the
    agent's own echo: the utterance keeps OVERHEARD_PRE_ROLL of it, not the
    whole PRE_ROLL a turn begun in silence keeps."""
    from upvoot.call.hearing import OVERHEARD_PRE_ROLL, PRE_ROLL

    per_second = 2 * 16000
    stt = QueueSTT(["hours please"], interim="wait a second")
    h = Harness(stt=stt, backchannels=("mm-hm",))
    h.to_reply()
    first = [n for n, final in stt.requests if final][0]
    assert first >= (PRE_ROLL - 0.04 + 0.7) * per_second, first
    h.wait(1.0)
    before = len(stt.requests)
    h.wait(0.4, speech(0.4))
    judged = [n for n, final in stt.requests[before:] if not final]
    assert h.state == "hearing" and judged
    assert max(judged) <= (OVERHEARD_PRE_ROLL + 0.4) * per_second, judged
