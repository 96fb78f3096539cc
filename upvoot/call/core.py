"""What a call holds beyond its current state: the turn-taking, the
replies being produced and played, the transcript, the limits' timers.

``upvoot.call.machine`` defines the state machine; its transitions call into
``CallCore``, and ``CallCore`` feeds facts back to the machine through the
``CallInputs`` protocol. Nothing here knows which state the call is in, nor
anything of Autobahn or providers: the output is an ``ICallOutput``, time is
the injected clock.
"""

from __future__ import annotations

import enum
import math
import time
import uuid
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger



from upvoot.audio import FRAME_BYTES, duration
from upvoot.call.hearing import Confirmed, Discarded, Ended, Endpointer, Onset
from upvoot.engines.interfaces import EngineBusy, ReplyEndCall, ReplyText, Turn
from upvoot.engines.sentences import SentenceSplitter
from upvoot.call.playout import Pacer, Playback


class EndReason(str, enum.Enum):
    """Why a call ended; stored in the call record."""

    HANGUP = "hangup"  # the caller (provider) closed the socket
    END_CALL = "end_call"  # the client sent {"type": "end_call"}
    SILENCE = "silence"  # silence_timeout of caller silence
    MAX_DURATION = "max_duration"
    MAX_TURNS = "max_turns"
    AGENT = "agent"  # the brain decided to end the call
    ERROR = "error"  # engines failed max_failures times in a row
    SHUTDOWN = "shutdown"  # the daemon was stopped


class ICallOutput(Protocol):
    """What the call does to the line (implemented by the WebSocket adapter)."""

    def audio_start(self) -> None: ...
    def audio(self, pcm: bytes) -> None: ...
    def audio_end(self, interrupted: bool) -> None: ...
    def transcript(self, role: str, text: str) -> None: ...
    def interim(self, text: str) -> None: ...
    def turn_start(self) -> None: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...


class CallInputs(Protocol):
    """Every input of the machine, by name: facts, never questions."""

    def start(self) -> None: ...
    def speech_started(self) -> None: ...
    def speech_confirmed(self) -> None: ...
    def speech_discarded(self) -> None: ...
    def utterance_ended(self, pcm: bytes) -> None: ...
    def digit_pressed(self, text: str) -> None: ...
    def nothing_heard(self) -> None: ...
    def reply_ready(self) -> None: ...
    def playout_finished(self) -> None: ...
    def agent_finished(self) -> None: ...
    def turns_exhausted(self) -> None: ...
    def turn_failed(self) -> None: ...
    def silence_prompt_due(self) -> None: ...
    def silence_timeout(self) -> None: ...
    def wrap_up_due(self) -> None: ...
    def time_up(self) -> None: ...
    def end_requested(self) -> None: ...
    def shutdown(self) -> None: ...
    def hangup(self) -> None: ...


class Reply:
    """One stretch of agent speech and the work producing it."""

    def __init__(self, kind: str, playback: Playback) -> None:
        self.kind = kind  # greeting | reply | prompt | warning | apology
        self.playback = playback
        self.producer: defer.Deferred | None = None
        self.ends_call = False
        self.ready = False
        self.committed = False  # the caller's turn was transcribed and sent
        self.caller_pcm = b""
        self.times: dict[str, float] = {}
        self.audio_started = False
        self.abandoned = False

    def cancel(self) -> None:
        self.playback.stop()
        if self.producer is not None and not self.producer.called:
            self.producer.cancel()


class Listening:
    """State data of ``listening``: the silence timers."""

    def __init__(self, core: "CallCore", proto: CallInputs) -> None:
        cfg = core.agent.config
        now = core.clock.seconds()
        self.timers = []
        if cfg.silence_prompt and cfg.silence_prompt_after and not core.silence_prompted:
            self.timers.append(core.clock.callLater(max(0.0, core.silence_since + cfg.silence_prompt_after - now), proto.silence_prompt_due))
        self.timers.append(core.clock.callLater(max(0.0, core.silence_since + cfg.silence_timeout - now), proto.silence_timeout))

    def cancel(self) -> None:
        for t in self.timers:
            if t.active():
                t.cancel()


class Hearing:
    """State data of ``hearing``: the bounded-rate interim decoder."""

    def __init__(self, core: "CallCore", proto: CallInputs) -> None:
        self.core = core
        self.timer = None
        self.inflight: defer.Deferred | None = None
        self.last = ""
        if core.agent.config.interim_interval:
            self.timer = core.clock.callLater(core.agent.config.interim_interval, self._tick)

    def _tick(self) -> None:
        core = self.core
        self.timer = core.clock.callLater(core.agent.config.interim_interval, self._tick)
        if self.inflight is not None or core.endpointer.voiced_seconds < 0.3:
            return
        d = self.inflight = core.agent.stt.transcribe(core.endpointer.utterance, False)

        def got(text: str) -> None:
            self.inflight = None
            text = (text or "").strip()
            if text and text != self.last:
                self.last = text
                core.output.interim(text)

        def failed(f):
            self.inflight = None
            if f.check(defer.CancelledError):
                return None
            if not f.check(EngineBusy):
                core.log_failure(f, "stt", interim=True)
            return None

        d.addCallbacks(got, failed)

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.inflight is not None:
            self.inflight.cancel()


class CallCore:
    """Everything a call holds that outlives a single state."""

    _log = Logger()

    def __init__(
        self,
        agent: Any,
        output: ICallOutput,
        clock: Any,
        pacer: Pacer,
        on_ended: Callable[[dict], None],
        call_id: str | None = None,
        lead: float = 0.1,
        log_transcripts: bool = False,
        recorder: Any = None,
    ) -> None:
        self.agent = agent
        self.output = output
        self.clock = clock
        self.pacer = pacer
        self.on_ended = on_ended
        self.call_id = call_id or uuid.uuid4().hex
        self.lead = lead
        self.log_transcripts = log_transcripts
        self.recorder = recorder  # upvoot.ledger.recordings.CallRecorder, or None
        cfg = agent.config
        self.detector = agent.vad.new_detector()
        self.endpointer = Endpointer(cfg.end_of_turn, cfg.min_utterance, cfg.max_utterance, cfg.barge_in_min)
        self.machine: CallInputs = None  # type: ignore[assignment]
        self.history: list[Turn] = []
        self.transcript: list[dict] = []
        self.turns = 0
        self.barge_ins = 0
        self.barge_ins_resumed = 0
        self.failures = 0
        self.failures_total = 0
        self.reply: Reply | None = None
        self.closing: Reply | None = None
        self.end_reason: EndReason | None = None
        self.started_wall = time.time()
        self.t0 = clock.seconds()
        self.silence_since = self.t0
        self.silence_prompted = False
        self.wrap_up_pending = False
        self._timers: list = []
        self._turn_times: dict[str, float] = {}
        self._queued_digits: list[str] = []
        self.latencies: list[dict] = []
        self._pending = bytearray()
        self._finished = False

    # -------------------------------------------------------------- audio in
    def caller_audio(self, pcm: bytes) -> None:
        """Feed caller audio (16 kHz s16le, even length, any size)."""
        if self.recorder is not None and not self._finished:
            self.recorder.caller(self.elapsed(), pcm)
        if self._finished or self.closing is not None:
            return
        self._pending += pcm
        while len(self._pending) >= FRAME_BYTES:
            frame = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            for event in self.endpointer.feed(frame, self.detector.is_speech(frame)):
                if self._finished:
                    return
                if isinstance(event, Onset):
                    self.machine.speech_started()
                elif isinstance(event, Confirmed):
                    self.machine.speech_confirmed()
                elif isinstance(event, Discarded):
                    if self.reply is not None and self.reply.abandoned:
                        # a cough after an unanswered turn: answer that turn now
                        self.machine.utterance_ended(b"")
                    else:
                        self.machine.speech_discarded()
                elif isinstance(event, Ended):
                    now = self.clock.seconds()
                    self._turn_times = {"speech_end": now - (0 if event.forced else self.agent.config.end_of_turn),
                                        "endpointed": now}
                    self.machine.utterance_ended(event.pcm)

    def caller_dtmf(self, digit: str) -> None:
        """A keypad digit is caller input: it becomes a caller turn (and
        interrupts the agent unless the agent's dtmf_interrupts is off)."""
        if self._finished or self.closing is not None:
            return
        text = f"DTMF {digit}"
        speaking = self.reply is not None and self.reply.audio_started and not self.reply.playback.done
        if speaking and not self.agent.config.dtmf_interrupts:
            self._queued_digits.append(text)
            return
        self.machine.digit_pressed(text)

    # ------------------------------------------------------------- timers
    def start_timers(self) -> None:
        cfg = self.agent.config
        self._timers.append(self.clock.callLater(cfg.max_duration, self.machine.time_up))
        if cfg.wrap_up_warning and cfg.wrap_up_before:
            self._timers.append(self.clock.callLater(cfg.max_duration - cfg.wrap_up_before, self.machine.wrap_up_due))

    def elapsed(self) -> float:
        return self.clock.seconds() - self.t0

    # ------------------------------------------------------------ speaking
    def _new_playback(self, reply_box: list) -> Playback:
        if self.recorder is None:
            return Playback(self.output, self.lead, lambda: self._played(reply_box[0]))
        tap = self.recorder.agent_sink(self.output, self.clock, self.t0)  # records each frame as it will play
        tap.playback = Playback(tap, self.lead, lambda: self._played(reply_box[0]))
        return tap.playback

    def say(self, text: str, kind: str) -> Reply:
        """Speak a fixed line now (cached audio when available)."""
        box: list = [None]
        reply = Reply(kind, self._new_playback(box))
        box[0] = reply
        self.reply = reply
        self._start_audio(reply)
        reply.producer = defer.Deferred.fromCoroutine(self._speak_line(reply, text))
        reply.producer.addErrback(self._producer_failed, reply)
        return reply

    async def _speak_line(self, reply: Reply, text: str) -> None:
        try:
            await self._speak_sentence(reply, text)
        except defer.CancelledError:
            raise
        except Exception:
            self._log.failure("Could not speak a fixed line", event="call.tts_failed", call_id=self.call_id)
        reply.playback.finish()
        reply.playback.pump(self.clock.seconds())

    def _start_audio(self, reply: Reply) -> None:
        reply.audio_started = True
        self.output.audio_start()
        self.pacer.add(reply.playback)

    async def _speak_sentence(self, reply: Reply, text: str) -> None:
        cached = self.agent.phrases.get(text)
        if cached is not None:
            reply.playback.add(cached, text)
            self._mark_ready(reply)
            return
        first = True
        async for pcm in self.agent.tts.synthesize(text):
            reply.playback.add(pcm, text if first else None)
            first = False
            self._mark_ready(reply)
        # backpressure: do not synthesize far ahead of playout
        while reply.playback.buffered > 8 * 32000 and not reply.playback.done:
            await deferLater(self.clock, 0.2, lambda: None)

    def _mark_ready(self, reply: Reply) -> None:
        if not reply.ready:
            reply.ready = True
            if not reply.audio_started and reply is self.reply:
                self.machine.reply_ready()

    def start_reply_audio(self) -> None:
        assert self.reply is not None
        reply = self.reply
        self._start_audio(reply)
        self._record_latency(reply)

    def _record_latency(self, reply: Reply) -> None:
        """Voice-to-voice latency of a turn, split by stage (seconds)."""
        t = reply.times
        if not {"speech_end", "endpointed", "transcribed"} <= t.keys():
            return
        now = self.clock.seconds()
        first_token = t.get("first_token", t["transcribed"])
        stages = {
            "endpointing": t["endpointed"] - t["speech_end"],
            "transcription": t["transcribed"] - t["endpointed"],
            "first_token": first_token - t["transcribed"],
            "first_audio": now - first_token,
            "voice_to_voice": now - t["speech_end"],
        }
        stages = {k: round(max(0.0, v), 4) for k, v in stages.items()}
        self.latencies.append(stages)
        if reply.playback.marks:
            # the provider acknowledges playout: voice-to-voice is when the
            # caller started hearing the reply, not when we sent it
            speech_end = t["speech_end"]
            stages["voice_to_voice_sent"] = stages["voice_to_voice"]

            def heard_from(start: float) -> None:
                stages["voice_to_voice"] = round(max(0.0, start - speech_end), 4)

            reply.playback.on_first_ack = heard_from
        self._log.info(
            "Turn latency {voice_to_voice:.3f}s (endpointing {endpointing:.3f}, transcription {transcription:.3f}, "
            "first token {first_token:.3f}, first audio {first_audio:.3f})",
            event="call.turn_latency", call_id=self.call_id, **stages,
        )

    def _played(self, reply: Reply) -> None:
        """A playback finished playing at the caller's end."""
        if reply is self.closing:
            self.output.audio_end(False)
            self._agent_said(reply.playback.full_text())
            self.machine.playout_finished()
            return
        if reply is not self.reply:
            return
        self.output.audio_end(False)
        self._agent_said(reply.playback.full_text())
        if reply.kind == "reply":
            self.turns += 1
        if reply.ends_call:
            self.machine.agent_finished()
        elif reply.kind == "reply" and self.turns >= self.agent.config.max_turns:
            self.machine.turns_exhausted()
        else:
            self.after_playout()
            self.machine.playout_finished()

    def after_playout(self) -> None:
        """Entering listening after agent speech: the silence clock starts
        when the audio has *played*, not when its last byte was sent."""
        reply, self.reply = self.reply, None
        if reply is not None and reply.kind == "prompt":
            self.silence_prompted = True  # the prompt does not restart the clock
        else:
            self.silence_since = self.clock.seconds()
            self.silence_prompted = False
        if self._queued_digits:
            text = " ".join(self._queued_digits)
            self._queued_digits.clear()
            self._timers.append(self.clock.callLater(0, self.machine.digit_pressed, text))
        if self.wrap_up_pending and reply is not None and reply.kind != "warning":
            self.wrap_up_pending = False
            self._timers.append(self.clock.callLater(0, self._wrap_up_now))

    def _wrap_up_now(self) -> None:
        self.machine.wrap_up_due()

    # -------------------------------------------------------------- turns
    def start_text_turn(self, text: str) -> None:
        """A turn whose caller text is already known (a DTMF digit)."""
        if self.reply is not None:
            self.reply.cancel()
        box: list = [None]
        reply = Reply("reply", self._new_playback(box))
        box[0] = reply
        reply.times = {}
        self.reply = reply
        reply.producer = defer.Deferred.fromCoroutine(self._produce(reply, b"", text))
        reply.producer.addErrback(self._producer_failed, reply)

    def start_turn(self, pcm: bytes) -> None:
        box: list = [None]
        reply = Reply("reply", self._new_playback(box))
        box[0] = reply
        if self.reply is not None and not self.reply.committed and self.reply.kind == "reply":
            # the caller went on talking before we understood the last piece:
            # hear it as one turn
            pcm = self.reply.caller_pcm + pcm
        reply.caller_pcm = pcm
        reply.times = dict(self._turn_times)
        self.reply = reply
        reply.producer = defer.Deferred.fromCoroutine(self._produce(reply, pcm))
        reply.producer.addErrback(self._producer_failed, reply)

    def abandon_turn(self) -> None:
        """The caller spoke again while we were thinking: drop the reply."""
        if self.reply is not None:
            self.reply.abandoned = True
            self.reply.cancel()

    async def _produce(self, reply: Reply, pcm: bytes, known_text: str | None = None) -> None:
        started = self.clock.seconds()
        try:
            if known_text is not None:
                text = known_text
            else:
                text = (await self.agent.stt.transcribe(pcm, True) or "").strip()
        except defer.CancelledError:
            raise
        except Exception as e:
            self._engine_failed(reply, "stt", e)
            return
        if not text:
            self._log.info("Utterance of {seconds:.2f}s had no words", event="call.no_words", call_id=self.call_id, seconds=duration(pcm))
            if reply is self.reply:
                self.machine.nothing_heard()
            return
        reply.committed = True
        reply.times["transcribed"] = self.clock.seconds()
        self._caller_said(text)
        self.output.turn_start()
        splitter = SentenceSplitter()
        try:
            async for item in self.agent.brain.reply(self.agent.config.system_prompt, list(self.history)):
                if isinstance(item, ReplyText):
                    reply.times.setdefault("first_token", self.clock.seconds())
                    for piece in splitter.feed(item.text):
                        await self._speak_sentence(reply, piece)
                elif isinstance(item, ReplyEndCall):
                    reply.ends_call = True
            rest = splitter.flush()
            if rest:
                await self._speak_sentence(reply, rest)
        except defer.CancelledError:
            raise
        except Exception as e:
            if reply.playback.queued == 0:
                self._engine_failed(reply, "brain/tts", e)
                return
            self.log_failure(None, "brain/tts", error=e)
        if reply.playback.queued == 0:
            self._engine_failed(reply, "brain", RuntimeError("empty reply"))
            return
        self.failures = 0
        reply.playback.finish()
        reply.playback.pump(self.clock.seconds())
        self._log.debug("Reply produced in {secs:.3f}s", event="call.reply_produced", call_id=self.call_id, secs=self.clock.seconds() - started)

    def _engine_failed(self, reply: Reply, engine: str, error: BaseException) -> None:
        self.failures += 1
        self.failures_total += 1
        self.log_failure(None, engine, error=error)
        if reply is not self.reply:
            return
        if self.failures >= self.agent.config.max_failures:
            self.machine.turn_failed()
            return
        # a short spoken apology, and the call goes on
        reply.kind = "apology"
        apology = self.agent.config.apology
        cached = self.agent.phrases.get(apology)
        if cached is None:
            self.machine.turn_failed()
            return
        reply.playback.add(cached, apology)
        reply.playback.finish()
        self._mark_ready(reply)

    def _producer_failed(self, failure, reply: Reply):
        if failure.check(defer.CancelledError):
            return None
        self._log.failure("Reply producer crashed", failure, event="call.producer_crashed", call_id=self.call_id)
        if reply is self.reply and not self._finished:
            self.failures = self.agent.config.max_failures
            self.machine.turn_failed()
        return None

    def log_failure(self, failure, engine: str, interim: bool = False, error: BaseException | None = None) -> None:
        self._log.warn(
            "Engine {engine} failed{interim}: {error}",
            event="call.engine_failed", call_id=self.call_id, engine=engine,
            interim=" (interim)" if interim else "",
            error=repr(error) if error is not None else (failure.getErrorMessage() if failure else "?"),
        )

    # ---------------------------------------------------------- barge-in
    def pause(self) -> None:
        if self.reply is not None:
            self.reply.playback.pause()

    def resume(self) -> None:
        self.barge_ins_resumed += 1
        if self.reply is not None:
            self.reply.playback.resume(self.clock.seconds())

    def barge_in(self) -> None:
        """Confirmed: drop the rest of the reply; keep what was heard."""
        self.barge_ins += 1
        reply, self.reply = self.reply, None
        if reply is None:
            return
        heard = reply.playback.heard_text()
        reply.cancel()
        self.output.clear()
        self.output.audio_end(True)
        if reply.kind == "reply" and reply.committed:
            self.turns += 1
        self._agent_said(heard, interrupted=True)
        self._log.info("Barge-in after {heard!r}", event="call.barge_in", call_id=self.call_id,
                       heard=heard if self.log_transcripts else f"{len(heard.split())} words")

    # ------------------------------------------------------------- records
    def _caller_said(self, text: str) -> None:
        self.history.append(Turn("caller", text))
        self.transcript.append({"role": "caller", "text": text, "t": round(self.elapsed(), 3)})
        self.output.transcript("caller", text)

    def _agent_said(self, text: str, interrupted: bool = False) -> None:
        if not text:
            return
        self.history.append(Turn("agent", text))
        entry = {"role": "agent", "text": text, "t": round(self.elapsed(), 3)}
        if interrupted:
            entry["interrupted"] = True
        self.transcript.append(entry)
        self.output.transcript("agent", text)

    # -------------------------------------------------------------- ending
    def begin_ending(self, reason: EndReason, line: str) -> None:
        self.end_reason = reason
        reply, self.reply = self.reply, None
        if reply is not None:
            if reply.audio_started and not reply.playback.done:
                heard = reply.playback.heard_text()
                reply.cancel()
                self.output.clear()
                self.output.audio_end(True)
                self._agent_said(heard, interrupted=True)
            else:
                reply.cancel()
        self._log.info("Ending call: {reason}", event="call.ending", call_id=self.call_id, reason=reason.value)
        box: list = [None]
        closing = Reply("closing", self._new_playback(box))
        box[0] = closing
        self.closing = closing
        if not line:
            self._timers.append(self.clock.callLater(0, self.machine.playout_finished))
            return
        self._start_audio(closing)
        closing.producer = defer.Deferred.fromCoroutine(self._speak_line(closing, line))
        closing.producer.addErrback(self._producer_failed, closing)
        # a guard, so a stuck synthesis can never keep the line open
        self._timers.append(self.clock.callLater(30.0, self.machine.playout_finished))

    def finish(self, reason: EndReason | None = None) -> None:
        """The call is over: cancel everything, close, report once."""
        if self._finished:
            return
        self._finished = True
        if self.end_reason is None:
            self.end_reason = reason or EndReason.HANGUP
        for reply in (self.reply, self.closing):
            if reply is not None:
                reply.cancel()
        self.reply = self.closing = None
        for t in self._timers:
            if t.active():
                t.cancel()
        self._timers.clear()
        self.output.close()
        if self.recorder is not None:
            self.recorder.stop(self.elapsed())
        self.on_ended(self.summary())

    def summary(self) -> dict:
        seconds = max(0.0, self.elapsed())
        cfg = self.agent.config
        increments = math.ceil(seconds / cfg.billing_increment) if seconds > 0 else 0
        return {
            "call_id": self.call_id,
            "agent": cfg.name,
            "started_at": self.started_wall,
            "ended_at": self.started_wall + seconds,
            "duration": round(seconds, 3),
            "end_reason": (self.end_reason or EndReason.HANGUP).value,
            "turns": self.turns,
            "barge_ins": self.barge_ins,
            "barge_ins_resumed": self.barge_ins_resumed,
            "engine_failures": self.failures_total,
            "latencies": list(self.latencies),
            "points_charged": increments * cfg.points_per_increment,
            "transcript": list(self.transcript),
        }
