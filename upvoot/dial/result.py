"""What one dialer call is asked to do, and what it came to.

``DialOptions`` (the URL, the caller's audio, the timers, the provider to
speak), ``DialResult`` (every message, every burst of agent audio, how the
call closed) and ``exit_code`` (the ``upvoot dial`` exit status of a result).
Plain data: ``upvoot.dial.engine`` fills a result in, the command prints it,
bench/ and the tests read it.
"""

from __future__ import annotations

from typing import Any

import attrs

from upvoot.audio import duration

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


@attrs.frozen
class DialOptions:
    """What one call does. Times are seconds from the open."""

    url: str
    play: bytes = b""  # caller audio, 16 kHz mono s16le
    play_after_greeting: bool = False
    delay: float = 0.0
    max_seconds: float = 120.0
    end_call_after: float | None = None
    hangup_after: float | None = None
    record: bool = False
    record_raw: bool = False
    cafile: str | None = None
    insecure: bool = False
    connect_timeout: float = 10.0
    #: "raw" or a provider whose protocol to speak (``upvoot.dial.providers``)
    provider: str = "raw"
    sample_rate: int | None = None
    codec: str | None = None
    #: the provider's custom parameters (Exotel query pairs, Twilio
    #: ``<Parameter>``, Plivo extra headers, Vonage NCCO headers)
    custom: dict = attrs.field(factory=dict)


@attrs.define
class Burst:
    """Agent audio between one ``audio_start`` and its ``audio_end``."""

    start: float
    end: float | None = None
    interrupted: bool | None = None
    #: (arrival time, bytes) of every binary frame of the burst
    frames: list[tuple[float, int]] = attrs.field(factory=list)


@attrs.define
class DialResult:
    url: str
    opened: bool = False
    #: HTTP status of a refused upgrade (e.g. 401)
    refused: int | None = None
    #: why the call could not be set up (connect or TLS failure)
    error: str | None = None
    #: "server", "client" (we hung up) or "network" (dropped without a close)
    closed_by: str | None = None
    #: why we hung up: "hangup-after", "max-seconds", "interrupted"
    hangup_reason: str | None = None
    close_code: int | None = None
    close_reason: str | None = None
    clean: bool = False
    #: seconds from the open to the close
    duration: float = 0.0
    messages: list[tuple[float, Any]] = attrs.field(factory=list)
    bursts: list[Burst] = attrs.field(factory=list)
    audio_bytes: int = 0
    audio_frames: int = 0
    #: binary frames outside audio_start..audio_end (a protocol violation)
    stray_frames: int = 0
    sent_bytes: int = 0
    end_call_sent_at: float | None = None
    recording: bytes | None = None
    provider: str = "raw"
    #: the provider call id and stream id the dialer made up (provider calls)
    call_id: str | None = None
    stream_id: str | None = None
    #: marks the server asked for, clears it sent (provider calls)
    marks: int = 0
    clears: int = 0
    #: the server broke one of the provider's rules (see ``upvoot.dial.providers``)
    violations: list[str] = attrs.field(factory=list)

    @property
    def audio_seconds(self) -> float:
        return duration(self.audio_bytes)

    @property
    def first_audio_at(self) -> float | None:
        for burst in self.bursts:
            if burst.frames:
                return burst.frames[0][0]
        return None


def exit_code(result: DialResult) -> int:
    if result.refused is not None:
        return EXIT_REFUSED
    if result.error or not result.opened:
        return EXIT_FAILED
    if result.closed_by == "client":
        return EXIT_OK
    if result.closed_by == "server" and result.close_code == 1000:
        return EXIT_OK
    return EXIT_FAILED
