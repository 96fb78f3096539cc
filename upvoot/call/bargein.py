"""Barge-in at the caller's ear: clear at onset, resume from the last
acknowledged mark, and backchannels that do not interrupt.

- ``BargeIn.pause``: at the caller's speech onset the agent's playback
  pauses, and on a line that acknowledges playout (a provider's buffer
  keeps playing what it holds) a ``clear`` goes at once, so the caller's ear
  goes quiet at onset, not at confirmation.
- ``BargeIn.resume``: the onset was no barge-in after all (a cough, a
  click, a backchannel): the playback is rewound to the last acknowledged
  mark (``Playback.rewind``) and goes on from there: the caller hears
  exactly the audio it had not heard, in order, once.
- ``Backchannels``: the agent's list of listener words ("mm-hm", "yeah",
  "okay", ...); an utterance is a backchannel when its words are all made of
  them. ``Overheard`` is the one decode (an interim-style transcription of
  the confirmed speech so far) whose words decide, reported to the machine
  as a fact: ``backchannel_heard`` or ``words_heard``.

The machine decides (``upvoot.call.machine``: paused -> judging ->
speaking | hearing); this module does.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from upvoot.audio import BYTES_PER_SECOND
from upvoot.call.inputs import CallInputs
from upvoot.call.playout import Playback

__all__ = ["BargeIn", "Backchannels", "Overheard", "normalize"]

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(word: str) -> str:
    """One spelling for the variants a recognizer writes: lower case, no
    hyphens or punctuation, letter runs collapsed ("Mm-hmm." -> "mhm",
    "uh-huh" -> "uhuh", "Okay!" -> "okay")."""
    w = re.sub(r"[^a-z0-9']", "", word.lower())
    return re.sub(r"(.)\1+", r"\1", w)


class Backchannels:
    """Listener words that are no bid for the turn. ``phrases``: the agent's
    ``backchannels`` option (each of one or more words); none: off."""

    def __init__(self, phrases: tuple[str, ...] | list[str]) -> None:
        self.phrases = [tuple(normalize(w) for w in p.split() if normalize(w)) for p in phrases]
        self.phrases = [p for p in self.phrases if p]

    def __bool__(self) -> bool:
        return bool(self.phrases)

    def match(self, text: str) -> bool:
        """``text`` has words, and they are all backchannel phrases."""
        words = [normalize(w) for w in _NOT_WORD.sub(" ", text.lower().replace("-", "")).split()]
        words = [w for w in words if w]
        if not words or not self.phrases:
            return False
        ok = [True] + [False] * len(words)  # ok[i]: words[:i] is a sequence of phrases
        for i in range(len(words)):
            if ok[i]:
                for p in self.phrases:
                    if tuple(words[i:i + len(p)]) == p:
                        ok[i + len(p)] = True
        return ok[-1]


class Overheard:
    """The decode of confirmed speech over the agent whose words decide:
    posts ``backchannel_heard`` when they are all backchannels, else
    ``words_heard`` (no words, a busy or failed recognizer included: a
    barge-in as before). ``cancel`` drops it."""

    def __init__(self, stt: Any, backchannels: Backchannels, post: Callable[..., None]) -> None:
        self._post = post
        self._d: defer.Deferred | None = None
        self.text = ""
        self.settled = False
        if not backchannels or stt is None:
            self._decide(False)
            return
        self._backchannels = backchannels
        self._stt = stt

    def start(self, pcm: bytes) -> None:
        if self.settled:
            return
        d = self._d = self._stt.transcribe(pcm, False)
        d.addCallbacks(self._got, self._lost)

    def _got(self, text: str) -> None:
        self._d = None
        self.text = (text or "").strip()
        self._decide(self._backchannels.match(self.text))

    def _lost(self, failure: Failure) -> None:
        self._d = None
        if not failure.check(defer.CancelledError):
            self._decide(False)

    def _decide(self, backchannel: bool) -> None:
        if not self.settled:
            self.settled = True
            self._post(CallInputs.backchannel_heard if backchannel else CallInputs.words_heard)

    def cancel(self) -> None:
        self.settled = True
        if self._d is not None:
            d, self._d = self._d, None
            d.cancel()


class BargeIn:
    """What an onset, a resume and a barge-in do at the caller's ear.
    ``marks``: the call's ``MarkLedger`` when the line acknowledges playout
    (then it has a buffer to clear), else None."""

    def __init__(self, line: Any, marks: Any, report: Any, stt: Any, phrases: tuple[str, ...],
                 post: Callable[..., None]) -> None:
        self._line = line
        self._marks = marks
        self._report = report
        self._stt = stt
        self.backchannels = Backchannels(phrases)
        self._post = post
        self.overheard: Overheard | None = None
        self.held_pcm = b""  # the utterance that ended while its words were being judged

    def pause(self, playback: Playback) -> None:
        """Onset: no more audio leaves; what the line still holds is cleared."""
        playback.pause()
        if self._marks is not None and playback.unacknowledged and not playback.cleared:
            playback.cleared = True
            self._line.clear()
            self._report.event("clear", unheard=round(playback.unacknowledged / BYTES_PER_SECOND, 3))

    def resume(self, playback: Playback, now: float) -> None:
        """Not a barge-in after all: go on from the last acknowledged byte."""
        self.cancel()
        resent = 0
        if playback.cleared:
            self._marks.forget(playback, playback.acked)
            resent = playback.rewind()
        self._report.event("resume", resent=round(resent / BYTES_PER_SECOND, 3))
        playback.resume(now)

    def judge(self, pcm: bytes) -> None:
        """Confirmed speech over the agent: its words decide (``Overheard``)."""
        self.cancel()
        self.held_pcm = b""
        self.overheard = Overheard(self._stt, self.backchannels, self._post)
        self.overheard.start(pcm)

    def hold(self, pcm: bytes) -> None:
        self.held_pcm = pcm

    def take_held(self) -> bytes:
        pcm, self.held_pcm = self.held_pcm, b""
        return pcm

    def cancel(self) -> None:
        if self.overheard is not None:
            self.overheard.cancel()
            self.overheard = None
