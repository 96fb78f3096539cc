"""The caller's side of a call's core: what its speech events do.

``CallCore`` (``upvoot.call.core``) inherits it: the events of the ear
(``upvoot.call.hearing``) and of the turn policy deciding for it
(``upvoot.call.turns``) become the machine's inputs, the timeline's
``caller_start``/``caller_end``/``interim`` events and the turn's times; the
speculative work of an ended turn waits in ``_handover`` for ``start_turn``.
"""

from __future__ import annotations

from typing import Any

from upvoot.call.hearing import Confirmed, Discarded, Ended, Onset
from upvoot.call.inputs import CallInputs
from upvoot.call.speaking import ReplyState


class CallerSide:
    """Mixed into ``CallCore``; uses its report, post, clock, line, reply and turns."""

    report: Any
    post: Any
    clock: Any
    line: Any
    reply: Any
    turns: Any
    finished: bool
    closing: Any
    _turn_times: dict
    _handover: Any

    def _heard(self, event: object) -> None:
        """An event of the caller's speech: the endpointer's, or the turn
        policy's decision (``Ended`` when the end-of-turn model says so)."""
        if self.finished or self.closing is not None:
            return
        if isinstance(event, Onset):
            self.report.event("caller_start")
            self.post(CallInputs.speech_started)
        elif isinstance(event, Confirmed):
            self.post(CallInputs.speech_confirmed)
        elif isinstance(event, Discarded):
            self._drop_turn_work()
            self.report.event("caller_end", t=round(self.report.elapsed() - event.silence, 3))
            if self.reply is not None and self.reply.state is ReplyState.HELD:
                # a cough after a turn not yet understood: that turn ends now
                self.post(CallInputs.utterance_ended, b"")
            else:
                self.post(CallInputs.speech_discarded)
        elif isinstance(event, Ended):
            speculation, paused = self.turns.ended()
            now = self.clock.seconds()
            self.report.event("caller_end", t=round(self.report.elapsed() - event.silence, 3))
            self._turn_times = {"speech_end": now - event.silence, "decided": now}
            if paused is not None:  # the end-of-turn model ended it: asked at the pause, answered now
                self._turn_times["paused"] = paused
            self._drop_turn_work()
            self._handover = speculation
            self.post(CallInputs.utterance_ended, event.pcm)
        else:
            self.turns.heard(event)  # Paused, Resumed: the turn policy's

    def _held_audio(self) -> bytes:
        """The audio a turn starting now joins to its own (``start_turn``)."""
        held = self.reply
        return held.caller_pcm if held is not None and held.state is ReplyState.HELD else b""

    def _drop_turn_work(self) -> None:
        """Drop the speculative work of the turn policy and of an ended turn."""
        self.turns.cancel()
        spec, self._handover = self._handover, None
        if spec is not None:
            spec.cancel()

    def _interim(self, text: str) -> None:
        self.report.event("interim", text=text)
        self.line.interim(text)
