"""What the world outside a call may do to it: the ``ICallHandle``.

The daemon keeps handles, never sockets or machines: the socket feeds the
caller's side in through one, the service ends calls (drain, shutdown)
through it. ``upvoot.call.new_call`` returns one (a ``CallHandle``).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from zope.interface import Attribute, Interface, implementer

from upvoot.call.core import CallCore
from upvoot.call.inputs import CallInputs
from upvoot.call.machine import INITIAL, TRANSITIONS, CallMachine
from upvoot.call.outcome import CallOutcome, CallReport


class ICallHandle(Interface):
    call_id = Attribute("str: the call's id (32 hex digits), also the call record's key")

    def start() -> None:
        """Begin the call: the greeting is spoken at once."""

    def caller_audio(pcm: bytes) -> None:
        """Caller audio: 16 kHz mono s16le, an even number of bytes, any length."""

    def caller_dtmf(digit: str) -> None:
        """A keypad digit pressed by the caller."""

    def playout_acknowledged(name: str, cleared: bool) -> None:
        """The far end played (or, ``cleared``, dropped) audio up to mark ``name``."""

    def end_requested() -> None:
        """The client asked to end the call: the agent says goodbye, then it ends."""

    def shutdown() -> None:
        """The daemon is stopping: the agent says goodbye, then the call ends."""

    def out_of_points() -> None:
        """The account cannot pay for more of the call: the agent says its
        ``closing_no_points`` line, then the call ends (``no_points``)."""

    def hangup() -> None:
        """The line is gone (the socket closed): the call ends now, nothing more is sent."""


@implementer(ICallHandle)
class CallHandle:
    """The one ``ICallHandle``: a call's machine and core behind its inbox.

    Every input reaches the machine through ``post``: fired at once when no
    transition is running, else queued and fired, in order, as soon as the
    running one has returned. So no input is ever fired from inside a
    transition, and the handle always knows the state the call is in
    (``state``, from ``TRANSITIONS``)."""

    def __init__(self, agent: Any, line: Any, clock: Any, pacer: Any, on_ended: Callable[[CallOutcome], None], *,
                 call_id: str | None = None, lead: float = 0.1, min_lead: float | None = None,
                 log_transcripts: bool = False, recorder: Any = None) -> None:
        self._inbox: collections.deque = collections.deque()
        self._firing = False
        self.state = INITIAL
        self.core = CallCore(agent, line, clock, pacer, self.post, on_ended, call_id=call_id, lead=lead,
                             min_lead=min_lead, log_transcripts=log_transcripts, recorder=recorder)
        self._machine = CallMachine(self.core)
        self.call_id = self.core.call_id

    @property
    def report(self) -> CallReport:
        """The transcript, counts and latencies so far."""
        return self.core.report

    def post(self, inp: Callable[..., None], *args: Any) -> None:
        """Deliver the fact ``inp`` (a ``CallInputs`` member) with ``args``."""
        self._inbox.append((inp.__name__, args))
        if self._firing:
            return
        self._firing = True
        try:
            while self._inbox:
                name, args = self._inbox.popleft()
                self.state = TRANSITIONS[(self.state, name)]
                getattr(self._machine, name)(*args)
        finally:
            self._firing = False

    # ICallHandle
    def start(self) -> None:
        self.post(CallInputs.start)

    def caller_audio(self, pcm: bytes) -> None:
        self.core.hear(pcm)

    def caller_dtmf(self, digit: str) -> None:
        self.core.digit(digit)

    def playout_acknowledged(self, name: str, cleared: bool) -> None:
        self.core.playout_acknowledged(name, cleared)

    def end_requested(self) -> None:
        self.post(CallInputs.end_requested)

    def shutdown(self) -> None:
        self.post(CallInputs.shutdown)

    def out_of_points(self) -> None:
        self.post(CallInputs.out_of_points)

    def hangup(self) -> None:
        self.post(CallInputs.hangup)


def new_call(agent: Any, line: Any, clock: Any, pacer: Any, on_ended: Callable[[CallOutcome], None], *,
             call_id: str | None = None, lead: float = 0.1, min_lead: float | None = None,
             log_transcripts: bool = False, recorder: Any = None) -> ICallHandle:
    """A call, not yet started (``start()`` it): ``agent`` (an
    ``upvoot.daemon.agents.Agent``-shaped bundle of config and engines) on
    ``line`` (an ``ILine``), time from ``clock`` (``IReactorTime``), audio
    paced by the process's ``pacer``; ``on_ended`` is called once with the
    ``CallOutcome``. ``recorder``: an ``ICallRecorder`` to record the call
    into, or None. ``lead``: seconds of agent audio kept ahead of the
    caller's ear; with ``min_lead``, the most, and the lead follows the
    pacer's recent lateness down to ``min_lead`` (``Playback``)."""
    return CallHandle(agent, line, clock, pacer, on_ended, call_id=call_id, lead=lead, min_lead=min_lead,
                      log_transcripts=log_transcripts, recorder=recorder)


def state_of(handle: CallHandle) -> str:
    """The name of the state the call is in (for tests and logs)."""
    return handle.state
