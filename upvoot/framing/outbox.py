"""What a provider codec holds on its way out: the :class:`MarkBook` of
marks in flight (which echo means played, which cleared) and the
:class:`Backlog` of outbound calls made before the provider's start.
Pure: no provider knowledge, no I/O (used by :mod:`upvoot.framing.provider`).
"""

from __future__ import annotations

from collections.abc import Callable

from upvoot import audio
from upvoot.framing.base import Frame, PlayoutMark, ProtocolError


class MarkBook:
    """Names of marks sent and not yet acknowledged.

    After :meth:`cleared` (we sent a clear), marks still outstanding are
    reported ``cleared=True`` if the provider echoes them later (Twilio and
    Telnyx return pending marks on clear). Providers that confirm a clear
    with a message of their own (Plivo, Vonage) use :meth:`release_cleared`.
    ``echo_means_played`` (Exotel: its clear lets the playing chunk finish):
    a mark echoed after our clear played; only :meth:`sent_cleared` ones are cleared.
    """

    def __init__(self, echo_means_played: bool = False) -> None:
        self.echo_means_played = echo_means_played
        self._pending: list[str] = []
        self._cleared: list[str] = []

    def sent(self, name: str) -> None:
        self._pending.append(name)

    def cleared(self) -> None:
        if not self.echo_means_played:
            self._cleared.extend(self._pending)
            self._pending.clear()

    def sent_cleared(self, name: str) -> None:
        """A mark sent after the audio before it was dropped."""
        self._cleared.append(name)

    def echoed(self, name: str) -> list:
        if name in self._pending:
            self._pending.remove(name)
            return [PlayoutMark(name)]
        if name in self._cleared:
            self._cleared.remove(name)
            return [PlayoutMark(name, cleared=True)]
        return [ProtocolError(f"mark {name[:60]!r} was not pending")]

    def release_cleared(self) -> list:
        """The provider confirmed our clear: marks outstanding at that clear
        will never be echoed; report them cleared now."""
        names, self._cleared = self._cleared, []
        return [PlayoutMark(n, cleared=True) for n in names]


class Backlog:
    """Outbound calls made before the provider's ``start`` (stream id or
    audio format still unknown), replayed in order once it arrives.

    ``clear()`` before start drops the queued audio but keeps marks, so every
    mark is still sent (and echoed) once the stream exists. Audio beyond
    ``max_audio_bytes`` (internal 16 kHz s16le) is dropped.
    """

    def __init__(self, max_audio_bytes: int = 30 * audio.BYTES_PER_SECOND) -> None:
        self.max_audio_bytes = max_audio_bytes
        self._ops: list[tuple[str, tuple]] = []
        self._audio_bytes = 0

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, op: str, *args: object) -> None:
        if op == "audio":
            pcm = args[0]
            assert isinstance(pcm, (bytes, bytearray))
            room = self.max_audio_bytes - self._audio_bytes
            room -= room % 2
            if room <= 0:
                return
            pcm = bytes(pcm[:room])
            self._audio_bytes += len(pcm)
            args = (pcm,)
        self._ops.append((op, args))

    def clear(self) -> None:
        self._ops = [(op, args) for op, args in self._ops if op == "mark"]
        self._audio_bytes = 0

    def replay(self, call: Callable[[str, tuple], list[Frame]]) -> list[Frame]:
        ops, self._ops, self._audio_bytes = self._ops, [], 0
        frames: list[Frame] = []
        for op, args in ops:
            frames += call(op, args)
        return frames
