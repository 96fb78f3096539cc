"""The seam between a provider's wire format and the call.

A *framing* is a pure, sans-IO codec: WebSocket frames in -> call events out;
agent audio and commands in -> WebSocket frames out. No sockets, no reactor,
no clock: it can be tested from recorded message sequences. The call machine
only sees the events below and never knows which provider it talks to.

Internal audio is 16 kHz mono s16le; a framing converts at its edge (codec,
rate, base64, chunking) and keeps any conversion state across frames.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import attrs


# ---- events: frames in -> what happened on the call ---------------------------


@attrs.frozen
class CallStarted:
    """The provider says who is calling. For the raw protocol it comes from
    the connection itself (there is no start message)."""

    provider: str
    call_id: str | None = None
    stream_id: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    custom: dict = attrs.field(factory=dict)


@attrs.frozen
class CallerAudio:
    pcm: bytes  # 16 kHz mono s16le, any length, always an even number of bytes


@attrs.frozen
class Dtmf:
    digit: str


@attrs.frozen
class PlayoutMark:
    """The provider reports that audio up to the mark ``name`` has played
    (or was cleared, ``cleared=True``)."""

    name: str
    cleared: bool = False


@attrs.frozen
class EndCallRequested:
    """The client asked the agent to end the call gracefully."""


@attrs.frozen
class CallStopped:
    """The provider says the call is over (the socket will close)."""

    reason: str = "hangup"


@attrs.frozen
class ProtocolError:
    """A frame could not be understood. The call goes on; it is logged."""

    message: str


Event = Union[CallStarted, CallerAudio, Dtmf, PlayoutMark, EndCallRequested, CallStopped, ProtocolError]


# ---- frames out ------------------------------------------------------------------


@attrs.frozen
class Frame:
    """One WebSocket message to send: ``bytes`` go binary, ``str`` go as text."""

    payload: Union[bytes, str]

    @property
    def is_binary(self) -> bool:
        return isinstance(self.payload, bytes)


@runtime_checkable
class Framing(Protocol):
    """The whole contract of a provider codec (``upvoot.framing.raw`` is the
    simplest): every codec provides every member, so an adapter never asks
    what a codec can do. Frames returned must be sent in order."""

    #: the provider's name ("raw", "twilio", ...)
    name: str
    #: True when the provider acknowledges playback with marks, so the call
    #: may use them as the clock of what the caller has heard.
    acknowledges_playout: bool
    #: seconds of agent audio the pacer must hand over at once for the first
    #: chunk to leave at once (providers with large minimum chunks); 0.0 when none
    min_lead: float
    #: bytes of internal 16 kHz audio between playout marks: whole provider
    #: chunks, at least 100 ms, so each mark falls at a chunk's end and its
    #: echo means "heard up to here", exactly (a provider's clear lets the
    #: playing chunk finish). 3200 where no chunk is known.
    mark_every: int

    def receive_text(self, text: str) -> list[Event]: ...

    def receive_binary(self, data: bytes) -> list[Event]: ...

    def audio_start(self) -> list[Frame]: ...

    def audio(self, pcm: bytes) -> list[Frame]:
        """Agent audio (16 kHz s16le, a multiple of 2 bytes)."""
        ...

    def audio_end(self, interrupted: bool) -> list[Frame]:
        """The agent stopped speaking; flush any partial chunk."""
        ...

    def mark(self, name: str) -> list[Frame]: ...

    def flush(self) -> list[Frame]:
        """All audio of the utterance has been handed over: frames held back
        (a partial chunk, the marks after it) must leave now; [] when nothing
        is held."""
        ...

    def prime(self, pcm: bytes) -> list[Frame]:
        """After a clear, before a resume: ``pcm`` (16 kHz s16le) is the
        audio just before the resumed audio, heard already; a codec that
        resamples fills its filter with it, so the resumed audio is encoded
        as in the uninterrupted stream. Nothing of it is sent."""
        ...

    def drain(self) -> list[Frame]:
        """Frames made due by receiving (e.g. output queued before the
        provider's start); the adapter calls it after each ``receive_*``.
        [] when none."""
        ...

    def clear(self) -> list[Frame]:
        """Drop audio the provider has buffered but not yet played."""
        ...

    def transcript(self, role: str, text: str) -> list[Frame]: ...

    def interim(self, text: str) -> list[Frame]: ...

    def turn_start(self) -> list[Frame]: ...

    def event(self, type: str, **fields: object) -> list[Frame]:
        """Any other server notice (e.g. ``error``); codecs without a channel
        for it return []."""
        ...


#: every member of the contract, for checks
FRAMING_MEMBERS = (
    "name", "acknowledges_playout", "min_lead", "mark_every", "receive_text", "receive_binary", "audio_start", "audio",
    "audio_end", "mark", "flush", "prime", "drain", "clear", "transcript", "interim", "turn_start", "event",
)
