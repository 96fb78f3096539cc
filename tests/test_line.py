"""upvoot.daemon.line.FramingLine: a call's ILine over a framing, without a socket."""

from __future__ import annotations

import json

from zope.interface.verify import verifyObject

from upvoot.call.line import ILine
from upvoot.daemon.line import FramingLine
from upvoot.framing.base import Frame
from upvoot.framing.raw import RawFraming


class Tagging:
    """A framing whose every output frame names the call that made it."""

    name = "tagging"
    acknowledges_playout = True
    min_lead = 0.25
    mark_every = 6400

    def __init__(self) -> None:
        self.pending_drain = [Frame("drained")]

    def receive_text(self, text):
        return []

    def receive_binary(self, data):
        return []

    def audio_start(self):
        return [Frame("audio_start")]

    def audio(self, pcm):
        return [Frame(pcm)]

    def audio_end(self, interrupted):
        return [Frame(f"audio_end:{interrupted}")]

    def mark(self, name):
        return [Frame(f"mark:{name}")]

    def flush(self):
        return [Frame("flushed")]

    def drain(self):
        out, self.pending_drain = self.pending_drain, []
        return out

    def clear(self):
        return [Frame("clear")]

    def transcript(self, role, text):
        return [Frame(f"transcript:{role}:{text}")]

    def interim(self, text):
        return [Frame(f"interim:{text}")]

    def turn_start(self):
        return [Frame("turn_start")]

    def event(self, type, **fields):
        return [Frame(f"event:{type}:{sorted(fields.items())}")]


class Wire:
    def __init__(self) -> None:
        self.frames: list = []
        self.closes: list[tuple[int, str]] = []

    def send(self, frames) -> None:
        self.frames.extend(f.payload for f in frames)

    def hang_up(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


def line_over(framing):
    wire = Wire()
    return FramingLine(framing, wire.send, wire.hang_up), wire


def test_it_provides_iline_and_takes_the_framing_s_playout_facts():
    line, _ = line_over(Tagging())
    assert verifyObject(ILine, line)
    assert line.acknowledges_playout is True and line.min_lead == 0.25 and line.mark_every == 6400
    raw, _ = line_over(RawFraming())
    assert verifyObject(ILine, raw)
    assert raw.acknowledges_playout is False and raw.min_lead == 0.0 and raw.mark_every == 3200


def test_every_call_becomes_the_framing_s_frames_in_order():
    line, wire = line_over(Tagging())
    line.audio_start()
    line.audio(b"\x01\x00")
    line.audio_end(True)
    line.clear()
    line.transcript("agent", "hi")
    line.interim("he")
    line.turn_start()
    line.notice("error", message="bad")
    assert wire.frames == ["audio_start", b"\x01\x00", "audio_end:True", "clear", "transcript:agent:hi",
                           "interim:he", "turn_start", "event:error:[('message', 'bad')]"]
    assert wire.closes == []


def test_only_the_last_mark_of_an_utterance_flushes_the_held_back_audio():
    line, wire = line_over(Tagging())
    line.mark("m1", last=False)
    assert wire.frames == ["mark:m1"]
    line.mark("m2", last=True)
    assert wire.frames == ["mark:m1", "mark:m2", "flushed"]


def test_close_drains_then_closes_1000_once_and_nothing_is_sent_after():
    line, wire = line_over(Tagging())
    line.close()
    assert wire.frames == ["drained"]
    assert wire.closes == [(1000, "call ended")]
    line.close()
    line.audio(b"\x00\x00")
    line.transcript("agent", "too late")
    assert wire.frames == ["drained"] and wire.closes == [(1000, "call ended")]


def test_over_the_raw_framing_the_client_gets_its_documented_messages():
    line, wire = line_over(RawFraming())
    line.audio_start()
    line.audio(b"\x00\x00" * 320)
    line.audio_end(False)
    line.notice("error", message="text frame is not JSON")
    line.close()
    texts = [json.loads(p) for p in wire.frames if isinstance(p, str)]
    assert texts == [{"type": "audio_start"}, {"type": "audio_end", "interrupted": False},
                     {"type": "error", "message": "text frame is not JSON"}]
    assert [p for p in wire.frames if isinstance(p, bytes)] == [b"\x00\x00" * 320]
    assert wire.closes == [(1000, "call ended")]
