"""What the world outside a call may do to it: the ``ICallHandle``.

The daemon keeps handles, never sockets or machines: the socket feeds the
caller's side in through one, the service ends calls (drain, shutdown)
through it. ``upvoot.call.new_call`` returns one.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


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

    def hangup() -> None:
        """The line is gone (the socket closed): the call ends now, nothing more is sent."""
