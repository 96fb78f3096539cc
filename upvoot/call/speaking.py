"""The agent's side of a call: the replies, and the work producing them.

A ``Reply`` is one stretch of agent speech (a greeting, a reply to a turn, a
fixed line) with its ``Playback`` and the producer filling it. Its
``ReplyKind`` says what it is, its ``ReplyState`` how far it has come::

    TRANSCRIBING --> ANSWERING --> READY --> PLAYING --> OVER
         |                                     ^
         +--> HELD (the caller spoke again      |  fixed lines start PLAYING
              before it was understood)

``Voice`` produces replies: the caller's audio to text (STT), text to a
reply (the brain), the reply to audio (TTS), sentence by sentence; fixed
lines from the phrase cache. It tells the call what happened through a
``ReplyListener``; it never asks which state the call is in.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from upvoot.audio import duration
from upvoot.call.outcome import CallReport
from upvoot.call.playout import Playback
from upvoot.call.speculation import Speculation
from upvoot.engines.interfaces import ReplyEndCall, ReplyText
from upvoot.engines.sentences import SentenceSplitter


class ReplyKind(enum.Enum):
    GREETING = "greeting"
    REPLY = "reply"  # the answer to a caller's turn
    LAST_REPLY = "last_reply"  # an answer after which the brain ends the call
    PROMPT = "prompt"  # the silence prompt
    WARNING = "warning"  # the wrap-up warning
    APOLOGY = "apology"  # said instead of a reply whose engines failed
    CLOSING = "closing"  # the line said as the call ends

    @property
    def answers_turn(self) -> bool:
        return self in (ReplyKind.REPLY, ReplyKind.LAST_REPLY)


class ReplyState(enum.Enum):
    TRANSCRIBING = "transcribing"  # the caller's audio is being turned into text
    HELD = "held"  # the caller spoke again before it was understood: its audio joins the next piece
    ANSWERING = "answering"  # the caller's words are known (and sent); brain and TTS at work
    READY = "ready"  # its first audio is queued; it has not started playing
    PLAYING = "playing"  # handed to the pacer (audio_start sent)
    OVER = "over"  # played out, cut off or dropped: nothing more happens to it

    @property
    def understood(self) -> bool:
        """The caller's turn was transcribed and recorded."""
        return self in (ReplyState.ANSWERING, ReplyState.READY, ReplyState.PLAYING)


class Reply:
    """One stretch of agent speech and the work producing it."""

    def __init__(self, kind: ReplyKind, state: ReplyState, new_playback: Callable[[Callable[[], None]], Playback],
                 on_played: Callable[["Reply"], None]) -> None:
        self.kind = kind
        self.state = state
        self.playback = new_playback(lambda: on_played(self))
        self.producer: defer.Deferred | None = None
        self.caller_pcm = b""  # the turn's audio (joined with the next piece if HELD)
        self.times: dict[str, float] = {}  # speech_end, endpointed, transcribed, first_token

    def cancel(self) -> None:
        """Drop the rest: nothing more is produced or sent."""
        if self.state is not ReplyState.HELD:
            self.state = ReplyState.OVER
        self.playback.stop()
        if self.producer is not None and not self.producer.called:
            self.producer.cancel()


class ReplyListener(Protocol):
    """What ``Voice`` tells the call about a reply."""

    def is_current(self, reply: Reply) -> bool: ...
    def reply_ready(self, reply: Reply) -> None: ...
    def nothing_heard(self, reply: Reply) -> None: ...
    def caller_understood(self, reply: Reply, text: str) -> None: ...
    def reply_failed(self, reply: Reply) -> None: ...


class Voice:
    """STT -> brain -> TTS for turns; the phrase cache and TTS for fixed lines."""

    _log = Logger()
    AHEAD = 8 * 32000  # bytes (8 s): synthesis waits while this much is queued unplayed

    def __init__(self, agent: Any, clock: Any, report: CallReport, listener: ReplyListener) -> None:
        self.agent = agent
        self.clock = clock
        self.report = report
        self.listener = listener
        self.failures = 0  # in a row

    @property
    def call_id(self) -> str:
        return self.report.call_id

    def _run(self, reply: Reply, work) -> None:
        reply.producer = defer.Deferred.fromCoroutine(work)
        reply.producer.addErrback(self._crashed, reply)

    # -------------------------------------------------------- fixed lines
    def speak_line(self, reply: Reply, text: str) -> None:
        self._run(reply, self._speak_line(reply, text))

    async def _speak_line(self, reply: Reply, text: str) -> None:
        try:
            await self._speak_sentence(reply, text)
        except defer.CancelledError:
            raise
        except Exception:
            self._log.failure("Could not speak a fixed line", event="call.tts_failed", call_id=self.call_id)
        reply.playback.finish()
        reply.playback.pump(self.clock.seconds())

    async def _speak_sentence(self, reply: Reply, text: str) -> None:
        cached = self.agent.phrases.get(text)
        if cached is not None:
            reply.playback.add(cached, text)
            self._ready(reply)
            return
        first = True
        async for pcm in self.agent.tts.synthesize(text):
            reply.playback.add(pcm, text if first else None)
            first = False
            self._ready(reply)
        # backpressure: do not synthesize far ahead of playout
        while reply.playback.buffered > self.AHEAD and not reply.playback.done:
            await deferLater(self.clock, 0.2, lambda: None)

    def _ready(self, reply: Reply) -> None:
        if reply.state in (ReplyState.TRANSCRIBING, ReplyState.ANSWERING):
            reply.state = ReplyState.READY
            self.listener.reply_ready(reply)

    # -------------------------------------------------------------- turns
    def answer(self, reply: Reply, known_text: str | None = None, speculation: Speculation | None = None) -> None:
        """Produce the reply to a turn: ``reply.caller_pcm`` transcribed, or
        ``known_text`` (a keypad digit). ``speculation``: the work the turn
        policy began at the caller's pause (``upvoot.call.speculation``):
        its transcript is the turn's, its brain request the reply's when it
        was asked with the same conversation."""
        self._run(reply, self._answer(reply, known_text, speculation))

    async def _answer(self, reply: Reply, known_text: str | None, speculation: Speculation | None) -> None:
        started = self.clock.seconds()
        pcm = reply.caller_pcm
        try:
            if known_text is not None:
                text = known_text
            elif speculation is not None:
                text = await speculation.transcript()
            else:
                text = (await self.agent.stt.transcribe(pcm, True) or "").strip()
        except defer.CancelledError:
            raise
        except Exception as e:
            self._engine_failed(reply, "stt", e)
            return
        ahead = speculation.reply if speculation is not None else None
        if not text:
            if ahead is not None:
                ahead.cancel()
            self._log.info("Utterance of {seconds:.2f}s had no words", event="call.no_words", call_id=self.call_id,
                           seconds=duration(pcm))
            reply.state = ReplyState.OVER
            self.listener.nothing_heard(reply)
            return
        reply.state = ReplyState.ANSWERING
        # a speculative transcript came before the turn ended: the latency split counts from its time
        reply.times["transcribed"] = (speculation and speculation.transcribed_at) or self.clock.seconds()
        self.listener.caller_understood(reply, text)
        if ahead is not None and ahead.history != tuple(self.report.history):  # asked before the agent's last words
            ahead.cancel()
            ahead = None
        pieces = ahead.items() if ahead is not None else self.agent.brain.reply(self.agent.config.system_prompt,
                                                                                list(self.report.history))
        splitter = SentenceSplitter()
        try:
            async for item in pieces:
                if isinstance(item, ReplyText):
                    # a speculative reply's text may have come before the turn ended: the split counts it from there
                    reply.times.setdefault("first_token", (ahead.first_token if ahead else None) or self.clock.seconds())
                    for piece in splitter.feed(item.text):
                        await self._speak_sentence(reply, piece)
                elif isinstance(item, ReplyEndCall):
                    reply.kind = ReplyKind.LAST_REPLY
            rest = splitter.flush()
            if rest:
                await self._speak_sentence(reply, rest)
        except defer.CancelledError:
            raise
        except Exception as e:
            if reply.playback.queued == 0:
                self._engine_failed(reply, "brain/tts", e)
                return
            self.log_failure("brain/tts", e)
        finally:
            # Cancelled while a sentence is spoken (a barge-in), the brain's
            # stream is suspended at a yield and nothing closes it: close it
            # here, so its request stops (an HTTP stream is aborted).
            close = getattr(pieces, "aclose", None)
            if close is not None:
                defer.Deferred.fromCoroutine(close()).addErrback(lambda _: None)
            if ahead is not None:
                ahead.cancel()
        if reply.playback.queued == 0:
            self._engine_failed(reply, "brain", RuntimeError("empty reply"))
            return
        self.failures = 0
        reply.playback.finish()
        reply.playback.pump(self.clock.seconds())
        self._log.debug("Reply produced in {secs:.3f}s", event="call.reply_produced", call_id=self.call_id,
                        secs=self.clock.seconds() - started)

    def _engine_failed(self, reply: Reply, engine: str, error: BaseException) -> None:
        self.failures += 1
        self.report.engine_failures += 1
        self.log_failure(engine, error)
        if not self.listener.is_current(reply):
            return
        apology = self.agent.config.apology
        cached = self.agent.phrases.get(apology)
        if self.failures >= self.agent.config.max_failures or cached is None:
            reply.state = ReplyState.OVER
            self.listener.reply_failed(reply)
            return
        # a short spoken apology, and the call goes on
        reply.kind = ReplyKind.APOLOGY
        reply.playback.add(cached, apology)
        reply.playback.finish()
        self._ready(reply)

    def _crashed(self, failure, reply: Reply):
        if failure.check(defer.CancelledError):
            return None
        self._log.failure("Reply producer crashed", failure, event="call.producer_crashed", call_id=self.call_id)
        if self.listener.is_current(reply):
            self.failures = self.agent.config.max_failures
            self.listener.reply_failed(reply)
        return None

    def log_failure(self, engine: str, error: BaseException, interim: bool = False) -> None:
        self._log.warn(
            "Engine {engine} failed{interim}: {error}",
            event="call.engine_failed", call_id=self.call_id, engine=engine,
            interim=" (interim)" if interim else "", error=repr(error),
        )
