"""UpVoot's own wire protocol ("raw"), as written in the integration spec.

Client -> UpVoot
  binary  caller audio: PCM s16le, 16 kHz, mono, frames of any size. An odd
          trailing byte is carried to the next frame (a sample split across
          two frames is reassembled, never dropped).
  text    JSON control messages:
            {"type": "end_call"}   end the call gracefully: the agent says
                                   its goodbye line, then closes with 1000.
          Text that is not a JSON object, or has an unknown "type", is
          answered with an "error" message and otherwise ignored (the call
          goes on).

UpVoot -> client
  binary  agent audio: PCM s16le, 16 kHz, mono, 20 ms (640-byte) frames,
          paced in real time with a small lead, always between an
          audio_start and an audio_end.
  text    JSON control messages, one object per frame, always with "type":
            {"type": "audio_start"}
                agent audio follows.
            {"type": "audio_end", "interrupted": false}
                the agent finished speaking (interrupted: true when the
                caller barged in and the rest of the reply was dropped).
            {"type": "turn_start"}
                the agent has started working on the caller's turn (the
                language model is being asked).
            {"type": "interim", "text": "..."}
                partial transcript of the caller's speech so far.
            {"type": "transcript", "role": "caller" | "agent", "text": "..."}
                final transcript of a turn. For the agent it holds what the
                caller actually heard (cut at a barge-in).
            {"type": "error", "message": "..."}
                a message from the client could not be understood.
            Unknown fields may be added later: ignore them.

The raw protocol has no playback acknowledgement: the server's pacing clock
(bytes sent at real time with a bounded lead) is the clock of what the caller
has heard.
"""

from __future__ import annotations

from upvoot.framing.base import (
    CallerAudio,
    EndCallRequested,
    Event,
    Frame,
    ProtocolError,
)
from upvoot.framing.jsonwire import json_frame as _json
from upvoot.framing.jsonwire import load_object


class RawFraming:
    name = "raw"
    acknowledges_playout = False
    #: the raw protocol sends 20 ms frames as they come: no extra lead
    min_lead = 0.0
    #: no marks on the raw protocol; the contract's default
    mark_every = 3200

    def __init__(self) -> None:
        self._odd = b""

    # frames in -----------------------------------------------------------
    def receive_binary(self, data: bytes) -> list[Event]:
        if self._odd:
            data = self._odd + data
            self._odd = b""
        if len(data) % 2:
            self._odd = data[-1:]
            data = data[:-1]
        return [CallerAudio(data)] if data else []

    def receive_text(self, text: str) -> list[Event]:
        msg = load_object(text)
        if isinstance(msg, ProtocolError):
            return [msg]
        kind = msg.get("type")
        if kind == "end_call":
            return [EndCallRequested()]
        return [ProtocolError(f"unknown message type {str(kind)[:40]!r}")]

    # frames out ----------------------------------------------------------
    def audio_start(self) -> list[Frame]:
        return [_json({"type": "audio_start"})]

    def audio(self, pcm: bytes) -> list[Frame]:
        return [Frame(pcm)] if pcm else []

    def audio_end(self, interrupted: bool) -> list[Frame]:
        return [_json({"type": "audio_end", "interrupted": interrupted})]

    def mark(self, name: str) -> list[Frame]:
        return []

    def flush(self) -> list[Frame]:
        return []  # nothing is held back: audio leaves as it comes

    def prime(self, pcm: bytes) -> list[Frame]:
        return []  # no resampler: nothing to prime

    def drain(self) -> list[Frame]:
        return []  # receiving never makes frames due

    def clear(self) -> list[Frame]:
        return []

    def transcript(self, role: str, text: str) -> list[Frame]:
        return [_json({"type": "transcript", "role": role, "text": text})]

    def interim(self, text: str) -> list[Frame]:
        return [_json({"type": "interim", "text": text})]

    def turn_start(self) -> list[Frame]:
        return [_json({"type": "turn_start"})]

    def event(self, type: str, **fields: object) -> list[Frame]:
        return [_json({"type": type, **fields})]
