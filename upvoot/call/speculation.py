"""Work started before the caller's turn has ended, kept or dropped.

At the short pause (``turn = smart``) the turn policy (``upvoot.call.turns``)
starts the final transcription of the utterance so far (``Speculation``)
and, with a brain that streams its reply (a language model, not the
scripted brain), the reply to that transcript (``SpeculativeReply``), at
most one per call. When the turn ends with no new speech, the turn's reply
(``upvoot.call.speaking.Voice``) takes both over: the transcript as it is,
the reply's pieces as they came; speech resuming drops both (``cancel``).
Nothing is spoken before the turn has really ended.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from upvoot.engines.interfaces import IKnownReplies, ReplyText, Turn


class Speculation:
    """The final transcription of an utterance, started at its pause.

    ``prefix``: audio heard before it and joined to it (a turn held while
    the caller went on, ``ReplyState.HELD``); the turn's reply uses the
    speculation only if its own prefix is the same."""

    def __init__(self, prefix: bytes, clock: Any) -> None:
        self.prefix = prefix
        self._clock = clock
        self.text: str | None = None
        self.transcribed_at: float | None = None  # on the call's clock
        self.reply: SpeculativeReply | None = None
        self.on_heard: Callable[[Speculation], None] | None = None  # the transcript came (the brain may be asked)
        self.on_done: Callable[[Speculation], None] | None = None  # the transcription ended, either way
        self._stt: defer.Deferred | None = None
        self._failure: Failure | None = None
        self._waiters: list[defer.Deferred] = []

    def transcribe(self, stt: Any, pcm: bytes) -> None:
        d = self._stt = stt.transcribe(self.prefix + pcm, True)
        d.addCallbacks(self._heard, self._lost)

    def _heard(self, text: str) -> None:
        self._stt = None
        self.text = (text or "").strip()
        self.transcribed_at = self._clock.seconds()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.text)
        if self.on_heard is not None:
            self.on_heard(self)
        if self.on_done is not None:
            self.on_done(self)

    def _lost(self, failure: Failure) -> None:
        self._stt = None
        if failure.check(defer.CancelledError):
            return
        self._failure = failure
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        if self.on_done is not None:
            self.on_done(self)

    @property
    def started(self) -> bool:
        """The transcription was started (it may have ended)."""
        return self._stt is not None or self.settled

    @property
    def settled(self) -> bool:
        """The transcription has ended (with a text or a failure)."""
        return self.text is not None or self._failure is not None

    def transcript(self) -> defer.Deferred:
        """The transcript (a Deferred); cancelling it drops the speculation."""
        if self.text is not None:
            return defer.succeed(self.text)
        if self._failure is not None:
            return defer.fail(self._failure)
        if self._stt is None:
            return defer.fail(defer.CancelledError("the speculation was dropped"))
        waiter = defer.Deferred(lambda d: self.cancel())
        self._waiters.append(waiter)
        return waiter

    def handed_over(self) -> None:
        """The turn ended: its reply owns this now; no brain request starts
        from here any more (the reply asks the brain itself)."""
        self.on_heard = self.on_done = None

    def cancel(self) -> None:
        self.on_heard = self.on_done = None
        self._waiters.clear()
        if self._stt is not None:
            d, self._stt = self._stt, None
            d.cancel()
        if self.reply is not None:
            reply, self.reply = self.reply, None
            reply.cancel()


class SpeculativeReply:
    """The brain's reply to ``history`` (the call's conversation and the
    caller's speculative turn), streamed into a buffer until the turn's
    reply reads it (``items``) or it is dropped (``cancel``)."""

    def __init__(self, brain: Any, system_prompt: str, history: tuple, clock: Any) -> None:
        self.history = history
        self.first_token: float | None = None  # when its first text came, on the call's clock
        self._clock = clock
        self._items: list[object] = []
        self._done = False
        self._failure: Failure | None = None
        self._wake: defer.Deferred | None = None
        self._task = defer.Deferred.fromCoroutine(self._pump(brain, system_prompt))
        self._task.addErrback(self._stopped)

    async def _pump(self, brain: Any, system_prompt: str) -> None:
        async for item in brain.reply(system_prompt, list(self.history)):
            if isinstance(item, ReplyText) and self.first_token is None:
                self.first_token = self._clock.seconds()
            self._items.append(item)
            self._notify()
        self._done = True
        self._notify()

    def _stopped(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            self._failure = failure
        self._done = True
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            wake, self._wake = self._wake, None
            wake.callback(None)

    @property
    def running(self) -> bool:
        return not self._done

    def cancel(self) -> None:
        if not self._task.called:
            self._task.cancel()

    async def items(self) -> AsyncIterator[object]:
        """Every piece of the reply, those already there first; cancelling
        the reader cancels the request."""
        i = 0
        try:
            while True:
                if i < len(self._items):
                    i += 1
                    yield self._items[i - 1]
                elif self._failure is not None:
                    self._failure.raiseException()
                elif self._done:
                    return
                else:
                    self._wake = defer.Deferred()
                    await self._wake
        except BaseException:
            self.cancel()
            raise


def reply_speculator(brain: Any, system_prompt: str, history: Callable[[], list], clock: Any
                     ) -> Callable[[str], SpeculativeReply] | None:
    """How a call asks its brain early: ``text -> SpeculativeReply`` to the
    conversation so far and the caller's speculative turn ``text``; None for
    a brain that knows its replies beforehand (``IKnownReplies``, the
    scripted brain): its replies cost nothing to ask for."""
    if IKnownReplies.providedBy(brain):
        return None

    def speculate(text: str) -> SpeculativeReply:
        return SpeculativeReply(brain, system_prompt, (*history(), Turn("caller", text)), clock)

    return speculate
