"""A call's phone line over a provider framing: ``FramingLine`` (an ``ILine``).

The call writes agent audio, marks and control messages to its ``ILine``;
``FramingLine`` turns each into the provider's frames (``upvoot.framing``)
and hands them to ``send``, the socket's writer. It keeps no ledger of its
own: the mark ledger lives in the call (``upvoot.call.playout``), the wire
format in the framing, the socket in ``upvoot.daemon.ws``.
"""

from __future__ import annotations

from typing import Callable, Iterable

from zope.interface import implementer

from upvoot.call.line import ILine
from upvoot.framing.base import Frame, Framing

#: The close code and reason of a call that ended normally.
CLOSE_NORMAL = (1000, "call ended")


@implementer(ILine)
class FramingLine:
    """``ILine`` over ``framing``: frames go to ``send``; ``close`` drains the
    framing, then asks ``hang_up(code, reason)`` to close the socket."""

    def __init__(self, framing: Framing, send: Callable[[Iterable[Frame]], None],
                 hang_up: Callable[[int, str], None]) -> None:
        self.framing = framing
        self._send = send
        self._hang_up = hang_up
        self.closed = False

    # read from the framing when asked: a provider's chunk size (Exotel's
    # min_lead) is only known once its start message has fixed the rate
    @property
    def acknowledges_playout(self) -> bool:
        return self.framing.acknowledges_playout

    @property
    def min_lead(self) -> float:
        return float(self.framing.min_lead)

    @property
    def mark_every(self) -> int:
        return int(self.framing.mark_every)

    def send(self, frames: Iterable[Frame]) -> None:
        if not self.closed:
            self._send(frames)

    def audio_start(self) -> None:
        self.send(self.framing.audio_start())

    def audio(self, pcm: bytes) -> None:
        self.send(self.framing.audio(pcm))

    def audio_end(self, interrupted: bool) -> None:
        self.send(self.framing.audio_end(interrupted))

    def mark(self, name: str, last: bool) -> None:
        self.send(self.framing.mark(name))
        if last:
            # the utterance's tail (held back by a resampler or a provider's
            # chunker) must leave now, or its mark can only come back late
            self.send(self.framing.flush())

    def clear(self) -> None:
        self.send(self.framing.clear())

    def prime(self, pcm: bytes) -> None:
        self.send(self.framing.prime(pcm))

    def transcript(self, role: str, text: str) -> None:
        self.send(self.framing.transcript(role, text))

    def interim(self, text: str) -> None:
        self.send(self.framing.interim(text))

    def turn_start(self) -> None:
        self.send(self.framing.turn_start())

    def notice(self, type: str, **fields: object) -> None:
        """Any other server notice (``error``: a client message not understood)."""
        self.send(self.framing.event(type, **fields))

    def close(self) -> None:
        if self.closed:
            return
        self.send(self.framing.drain())
        self.closed = True
        self._hang_up(*CLOSE_NORMAL)
