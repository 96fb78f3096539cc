"""What a call holds beyond its current state, and what its transitions do.

``upvoot.call.machine`` decides; ``CallCore`` does. The core never fires an
input into the machine: what it learns (caller audio cut into speech
events, a reply ready, a playback finished) it hands to ``post`` as a
``CallInputs`` fact, and the handle fires it once no transition is running.
Nothing here asks which state the call is in, nor knows of sockets or
providers: the line is an ``ILine``, time is the injected clock.

Its parts, each in its own module: hearing (``Ear``, ``Interims``),
speaking (``Reply``, ``Voice``), playout (``Playback``, ``MarkLedger``),
limits (``CallLimits``, ``SilenceClock``, ``Listening``), outcome
(``CallReport``).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from twisted.logger import Logger

from upvoot.call.bargein import BargeIn
from upvoot.call.caller import CallerSide
from upvoot.call.hearing import OVERHEARD_PRE_ROLL, Ear, Interims
from upvoot.call.inputs import CallInputs
from upvoot.call.limits import CallLimits, Listening, SilenceClock
from upvoot.call.outcome import CallOutcome, CallReport, EndReason
from upvoot.call.playout import MarkLedger, Pacer, Playback
from upvoot.call.speaking import Reply, ReplyKind, ReplyState, Voice
from upvoot.call.speculation import Speculation, reply_speculator
from upvoot.call.turns import TurnTaker

Post = Callable[..., None]  # post(CallInputs.<input>, *args)


class CallCore(CallerSide):
    """Everything a call holds that outlives a single state (the caller's
    speech events and the turn policy's work: ``CallerSide``)."""

    _log = Logger()

    def __init__(self, agent: Any, line: Any, clock: Any, pacer: Pacer, post: Post,
                 on_ended: Callable[[CallOutcome], None], *, call_id: str | None = None, lead: float = 0.1,
                 min_lead: float | None = None, log_transcripts: bool = False, recorder: Any = None) -> None:
        cfg = agent.config
        self.agent = agent
        self.line = line  # ILine
        self.clock = clock
        self.pacer = pacer
        self.post = post
        self.on_ended = on_ended
        self.recorder = recorder  # ICallRecorder, or None
        self.report = CallReport(call_id or uuid.uuid4().hex, cfg.name, line, clock, log_transcripts)
        # the turn policy (``turn``): the endpointer, the end-of-turn model, the work begun at a pause
        self.turns = TurnTaker(clock, cfg, agent.turn_model, agent.stt, self._heard, prefix=self._held_audio,
                               speculate_reply=reply_speculator(agent.brain, cfg.system_prompt,
                                                                lambda: self.report.history, clock),
                               call_id=self.report.call_id)
        self._handover: Speculation | None = None  # the ended turn's speculative work, for start_turn
        self.ear = Ear(agent.vad.new_detector(), self.turns.endpointer)
        self.voice = Voice(agent, clock, self.report, self)
        self.limits = CallLimits(clock, cfg, post)
        self.silence = SilenceClock(self.report.t0)
        # a provider's minimum chunk (Exotel) needs more lead for the first chunk to leave at once
        self.lead = max(lead, line.min_lead)
        self.min_lead = None if min_lead is None else max(min_lead, line.min_lead)
        self.marks = MarkLedger(line, clock) if line.acknowledges_playout else None
        self.barge = BargeIn(line, self.marks, self.report, agent.stt, cfg.backchannels, post)
        self.reply: Reply | None = None  # the agent speech of the live states
        self.closing: Reply | None = None  # the closing line, once the call is ending
        self.end_reason: EndReason | None = None
        self.wrap_up_pending = False  # the wrap-up warning came while the agent was busy
        self.held_digits: list[str] = []  # digits that wait for the agent to finish
        self._turn_times: dict[str, float] = {}
        self._guard = None  # the closing line's time limit
        self.finished = False

    @property
    def call_id(self) -> str:
        return self.report.call_id

    # ------------------------------------------------------------ facts in
    def hear(self, pcm: bytes) -> None:
        """Caller audio (16 kHz s16le, even length, any size)."""
        if self.finished:
            return
        if self.recorder is not None:
            self.recorder.caller(self.report.elapsed(), pcm)
        if self.closing is not None:
            return
        for event in self.ear.hear(pcm):
            self._heard(event)

    def digit(self, digit: str) -> None:
        """A keypad digit is caller input: it becomes a caller turn (and
        interrupts the agent unless the agent's dtmf_interrupts is off)."""
        if self.finished or self.closing is not None:
            return
        pressed = CallInputs.digit_pressed if self.agent.config.dtmf_interrupts else CallInputs.digit_waiting
        self.post(pressed, f"DTMF {digit}")

    def playout_acknowledged(self, name: str, cleared: bool) -> None:
        if self.marks is not None and not self.finished:
            self.marks.acknowledged(name, cleared)

    # ------------------------------------------------------ state data
    def listening(self) -> Listening:
        return Listening(self.clock, self.agent.config, self.silence, self.post)

    def interims(self) -> Interims:
        return Interims(self.clock, self.agent.config.interim_interval, self.agent.stt, self.ear.endpointer,
                        self._interim, lambda e: self.voice.log_failure("stt", e, interim=True))

    # ------------------------------------------------------------ speaking
    def _new_playback(self, on_played: Callable[[], None]) -> Playback:
        on_sent = self._record_agent if self.recorder is not None else None
        return Playback(self.line, self.lead, on_played, marks=self.marks, on_sent=on_sent, min_lead=self.min_lead)

    def _record_agent(self, pcm: bytes, ahead: float) -> None:
        self.recorder.agent(self.report.elapsed() + ahead, pcm)  # where it plays at the caller's ear

    def new_reply(self, kind: ReplyKind, state: ReplyState) -> Reply:
        """The one way a reply is made: with its playback, reporting to ``_played``."""
        return Reply(kind, state, self._new_playback, self._played)

    def begin(self) -> None:
        """The call starts: the limits run, the greeting is said."""
        self.limits.start()
        self.say(self.agent.config.greeting, ReplyKind.GREETING)

    def say(self, text: str, kind: ReplyKind) -> None:
        """Speak a fixed line now (cached audio when available)."""
        if kind is ReplyKind.PROMPT:
            self.report.event("silence_prompt")
        self.reply = self.new_reply(kind, ReplyState.PLAYING)
        self._start_audio(self.reply)
        self.voice.speak_line(self.reply, text)

    def _start_audio(self, reply: Reply) -> None:
        reply.state = ReplyState.PLAYING
        self.report.event("agent_start", reply=reply.kind.value)
        self.line.audio_start()
        self.pacer.add(reply.playback)

    def start_reply_audio(self) -> None:
        """The reply being thought of has audio: it starts playing."""
        assert self.reply is not None
        self._start_audio(self.reply)
        self.report.turn_latency(self.reply.times, self.reply.playback)

    def _played(self, reply: Reply) -> None:
        """A playback finished playing at the caller's end: say which one."""
        if reply is self.closing:
            self.line.audio_end(False)
            self.report.event("agent_end", interrupted=False)
            self.report.agent_said(reply.playback.full_text())
            self.post(CallInputs.closing_played)
            return
        if reply is not self.reply:
            return
        reply.state = ReplyState.OVER
        self.line.audio_end(False)
        self.report.event("agent_end", interrupted=False)
        self.report.agent_said(reply.playback.full_text())
        self.silence.agent_finished(self.clock.seconds(), was_prompt=reply.kind is ReplyKind.PROMPT)
        if reply.kind.answers_turn:
            self.report.turns += 1
        if reply.kind is ReplyKind.LAST_REPLY:
            self.post(CallInputs.agent_finished)
        elif reply.kind.answers_turn and self.report.turns >= self.agent.config.max_turns:
            self.post(CallInputs.turns_exhausted)
        else:
            self.post(CallInputs.reply_played)

    def after_playout(self) -> None:
        """Back to listening after agent speech: what waited for it comes now."""
        reply, self.reply = self.reply, None
        if self.held_digits:
            text = " ".join(self.held_digits)
            self.held_digits.clear()
            self.post(CallInputs.digit_pressed, text)
        if self.wrap_up_pending and (reply is None or reply.kind is not ReplyKind.WARNING):
            self.wrap_up_pending = False
            self.post(CallInputs.wrap_up_due)

    def hold_digit(self, text: str) -> None:
        self.held_digits.append(text)

    # ReplyListener: what Voice says about a reply
    def is_current(self, reply: Reply) -> bool:
        return reply is self.reply and not self.finished

    def reply_ready(self, reply: Reply) -> None:
        if self.is_current(reply):
            self.post(CallInputs.reply_ready)

    def nothing_heard(self, reply: Reply) -> None:
        if self.is_current(reply):
            self.post(CallInputs.nothing_heard)

    def caller_understood(self, reply: Reply, text: str) -> None:
        self.report.caller_said(text)
        self.line.turn_start()

    def reply_failed(self, reply: Reply) -> None:
        self.post(CallInputs.turn_failed)

    # -------------------------------------------------------------- turns
    def start_turn(self, pcm: bytes) -> None:
        """The caller's utterance ended: transcribe it and answer."""
        prefix = self._held_audio()  # the caller went on talking before we understood the last piece:
        pcm = prefix + pcm  # hear it as one turn
        spec, self._handover = self._handover, None
        if spec is not None and spec.prefix != prefix:  # begun on other audio than this turn's
            spec.cancel()
            spec = None
        reply = self.reply = self.new_reply(ReplyKind.REPLY, ReplyState.TRANSCRIBING)
        reply.caller_pcm = pcm
        reply.times = dict(self._turn_times)
        self.voice.answer(reply, speculation=spec)

    def start_text_turn(self, text: str) -> None:
        """A turn whose caller text is already known (a DTMF digit)."""
        if self.reply is not None:
            self.reply.cancel()
        self.reply = self.new_reply(ReplyKind.REPLY, ReplyState.TRANSCRIBING)
        self.voice.answer(self.reply, known_text=text)

    def digit_turn_while_hearing(self, text: str) -> None:
        self.ear.endpointer.reset()
        self._drop_turn_work()
        self.start_text_turn(text)

    def caller_resumed(self) -> None:
        """The caller spoke again while we were thinking. Once the turn was
        understood its reply is dropped; before, its audio is held to be
        heard with what comes next."""
        reply = self.reply
        if reply is None:
            return
        if reply.state.understood:
            reply.cancel()
            self.reply = None
        else:
            reply.state = ReplyState.HELD
            reply.cancel()

    def forget_reply(self) -> None:
        self.reply = None

    # ---------------------------------------------------------- barge-in
    def pause(self) -> None:
        """Onset over the agent: it pauses, the line's buffer is cleared
        (``BargeIn``); the utterance keeps less of the audio from before it."""
        if self.reply is not None:
            self.ear.endpointer.trim_lead(OVERHEARD_PRE_ROLL)
            self.barge.pause(self.reply.playback)

    def judge(self) -> None:
        """Confirmed speech over the agent: its words decide (backchannels)."""
        self.barge.judge(self.ear.endpointer.utterance)

    def resume(self, backchannel: bool = False) -> None:
        """Not a barge-in: the reply goes on from the last byte heard. After
        a backchannel the ear starts afresh, so more speech is a new onset."""
        self.report.barge_ins_resumed += 1
        self.report.event("barge_in_resumed", backchannel=backchannel)
        if backchannel:
            self.ear.endpointer.reset()
            self._drop_turn_work()  # a pause's speculative work on the backchannel
        if self.reply is not None:
            self.barge.resume(self.reply.playback, self.clock.seconds())
        else:
            self.barge.cancel()

    def barge_in(self) -> None:
        """Confirmed: drop the rest of the reply; keep what was heard."""
        self.report.barge_ins += 1
        self.report.event("barge_in")
        self.barge.cancel()
        reply, self.reply = self.reply, None
        if reply is None:
            return
        heard = reply.playback.heard_text()
        understood = reply.state.understood
        reply.cancel()
        if not reply.playback.cleared:  # cleared at onset already: nothing was sent since
            self.line.clear()
        self.line.audio_end(True)
        self.report.event("agent_end", interrupted=True)
        if reply.kind.answers_turn and understood:
            self.report.turns += 1
        self.report.agent_said(heard, interrupted=True)
        self.report.log_barge_in(heard)

    # -------------------------------------------------------------- ending
    def begin_ending(self, reason: EndReason, closing_line: str) -> None:
        """Cut what the agent is saying, then say ``closing_line``."""
        self.end_reason = reason
        self.barge.cancel()
        self._drop_turn_work()
        reply, self.reply = self.reply, None
        if reply is not None:
            if reply.state is ReplyState.PLAYING and not reply.playback.done:
                heard = reply.playback.heard_text()
                reply.cancel()
                self.line.clear()
                self.line.audio_end(True)
                self.report.event("agent_end", interrupted=True)
                self.report.agent_said(heard, interrupted=True)
            else:
                reply.cancel()
        self._log.info("Ending call: {reason}", event="call.ending", call_id=self.call_id, reason=reason.value)
        closing = self.closing = self.new_reply(ReplyKind.CLOSING, ReplyState.PLAYING)
        if not closing_line:
            self.post(CallInputs.closing_played)
            return
        self._start_audio(closing)
        self.voice.speak_line(closing, closing_line)
        # a guard, so a stuck synthesis can never keep the line open
        self._guard = self.clock.callLater(30.0, self.post, CallInputs.closing_played)

    def finish(self, reason: EndReason | None = None) -> None:
        """The call is over: cancel everything, close the line, report once."""
        if self.finished:
            return
        self.finished = True
        self.barge.cancel()
        self._drop_turn_work()
        if self.end_reason is None:
            self.end_reason = reason or EndReason.HANGUP
        for reply in (self.reply, self.closing):
            if reply is not None:
                reply.cancel()
        self.reply = self.closing = None
        self.limits.cancel()
        if self._guard is not None and self._guard.active():
            self._guard.cancel()
        self.line.close()
        if self.recorder is not None:
            self.recorder.stop(self.report.elapsed())
        self.report.event("end", reason=self.end_reason.value)
        self.on_ended(self.report.outcome(self.end_reason))
