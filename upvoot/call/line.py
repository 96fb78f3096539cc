"""The call's outbound side: what a call does to its phone line.

The call core writes to an ``ILine`` and never asks what is behind it, and
records itself into an ``ICallRecorder`` when it is given one. The
daemon implements it over a socket and a provider framing
(``upvoot.daemon.line``); tests implement it with a list.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ILine(Interface):
    """Agent audio, playout marks, clear, and the control messages."""

    acknowledges_playout = Attribute(
        "bool: the far end acknowledges marks (``ICallHandle.playout_acknowledged``), "
        "so its marks, not our estimate, are the clock of what the caller has heard")
    min_lead = Attribute(
        "float, seconds: the least audio to keep ahead of the caller's ear "
        "(a provider's minimum chunk size); 0.0 when the line has none")
    mark_every = Attribute(
        "int, bytes of 16 kHz s16le audio between playout marks: whole provider chunks of at "
        "least 100 ms, counted from the start of a playback (or of its resume), so a mark falls "
        "at a chunk's end and an acknowledged mark is exactly where the caller's ear is")

    def audio_start() -> None:
        """The agent starts speaking."""

    def audio(pcm: bytes) -> None:
        """Agent audio: 16 kHz mono s16le, a multiple of 2 bytes."""

    def audio_end(interrupted: bool) -> None:
        """The agent stopped speaking (``interrupted``: by a barge-in)."""

    def mark(name: str, last: bool) -> None:
        """Ask the far end to acknowledge ``name`` once the audio sent so far
        has played. ``last``: the utterance's final mark, so any audio the
        line still holds back (a partial provider chunk) must leave now.
        Only called when ``acknowledges_playout`` is true."""

    def clear() -> None:
        """Drop agent audio the far end has buffered but not yet played."""

    def prime(pcm: bytes) -> None:
        """After ``clear``, before the audio of a resume: ``pcm`` is what the
        caller heard just before it (16 kHz s16le). A line that resamples
        fills its filter with it, so the resumed audio joins seamlessly;
        nothing of it is sent."""

    def transcript(role: str, text: str) -> None:
        """A final transcript line (``role``: ``caller`` or ``agent``)."""

    def interim(text: str) -> None:
        """A partial transcript of the caller's speech in progress."""

    def turn_start() -> None:
        """The caller's turn was understood; the agent starts its reply."""

    def close() -> None:
        """The call is over: flush what is pending and close the line."""


class ICallRecorder(Interface):
    """Where a call records its two sides, each at the time it is heard.

    ``t`` is seconds since the call started at which the audio plays at the
    caller's ear: caller audio when it arrives; an agent frame when it
    will play, after the audio queued ahead of it. Upvoot's implementation
    is ``upvoot.ledger.recordings.CallRecorder``."""

    relpath = Attribute("str: where the recording will be, relative to the state directory (for the call record)")

    def caller(t: float, pcm: bytes) -> None:
        """Caller audio (16 kHz mono s16le) heard at ``t``."""

    def agent(t: float, pcm: bytes) -> None:
        """Agent audio (16 kHz mono s16le) that plays at ``t``."""

    def stop(duration: float) -> None:
        """The call is over after ``duration`` seconds: nothing more comes."""
