"""Turn-taking: when the caller's turn ends, and the work begun before it does.

The agent's ``turn`` option picks the policy:

- ``silence``: the turn ends after ``end_of_turn`` (600 ms) of silence, the
  endpointer alone (``upvoot.call.hearing``).
- ``smart``: after ``turn_transcribe_after`` (100 ms) of silence the final
  transcription starts speculatively (``upvoot.call.speculation``); after
  ``turn_pause`` (200 ms) the end-of-turn model (``IEndOfTurn``,
  smart-turn) is asked whether the caller has finished (the transcript, a
  decode several times the model's cost, is then nearly there). The model
  can only make the turn shorter than ``silence`` would, and the
  transcript only longer:

  - "finished": the turn ends as soon as the transcript is there (the
    reply needs it anyway), and that transcript is the turn's;
  - "not finished": the turn ends after ``turn_unfinished_pause`` of
    silence (default 700 ms: see etc/upvoot.ini for what bench/hesitant.py
    measured of other values);
  - less than ``MIN_VOICED`` (0.8 s) of speech so far (the model is not
    asked): the turn ends after ``end_of_turn`` (600 ms) of silence, as
    with ``silence``;
  - whatever the model says, a transcript that ends on a word no sentence
    ends on ("... a table for", "... and", "um", a trailing "..."
    ``unfinished``) holds the turn open: ``turn_max_pause`` (2.5 s) of
    silence ends it.

  A model that cannot answer (the workers refuse it, it fails) leaves the
  decision to silence (``end_of_turn``). The caller speaking again drops
  the model's answer, the speculative transcription and the speculative
  brain request. With a brain that streams its reply (a language model;
  not the scripted brain, whose replies are synthesized at start), the
  brain is asked as soon as the speculative transcript is there, at most
  one request per call; what it says is kept until the turn has really
  ended, and dropped if the caller goes on.

States (Automat ``TypeMachineBuilder``)::

    idle --quieted--> early (the transcription starts) --paused--> deciding
    idle --paused--> deciding --complete--> idle (the turn ends now)
    deciding --finished--> confirming (the model says so; the transcript is not there yet)
    confirming --transcript_ends--> idle (the turn ends now)
    deciding --incomplete--> unsure (the turn ends at turn_unfinished_pause)
    deciding --unasked | failed--> unsure (the turn ends at end_of_turn)
    unsure --transcript_ends--> unsure (a transcript still under way when
        unsure was entered: that silence ends the turn only from now on)
    deciding --dangles--> holding;  confirming, unsure --transcript_dangles--> holding (ends at turn_max_pause)
    early, deciding, confirming, unsure, holding --resumed--> idle (the speculative work is dropped)
    any --ended--> idle (the speculation goes to the turn's reply)
    any --cancel--> idle (all dropped: a cough, a digit, the call ending)

Sans-IO but for the clock: the endpointer's events come in (``heard``,
``ended``), its decisions go out through ``emit`` as the endpointer's own
events (``Ended``/``Discarded``), after the transition has returned.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from upvoot.call.dangling import unfinished
from upvoot.call.hearing import Endpointer, Paused, Quieted, Resumed
from upvoot.call.speculation import Speculation
from upvoot.engines.interfaces import EngineBusy

SMART = "smart"
SILENCE = "silence"
POLICIES = (SMART, SILENCE)
FINISHED = 0.5  # the end-of-turn model's probability above which the caller has finished
#: The speech (s) an utterance needs before the model may end it early: in a
#: shorter one ("Yes, | that's right", "Front | Center") the model calls the
#: first words' pause finished; on bench/hesitant.py, complete sentences
#: ended early fell from 16 % to 7 % with this floor, and nothing got slower
#: than ``end_of_turn``.
MIN_VOICED = 0.8
def endpointer_for(cfg: Any) -> Endpointer:
    """The endpointer of an agent's turn policy: with ``smart`` it pauses at
    ``turn_pause`` and ends at ``turn_max_pause``; a too-short sound is
    discarded after ``end_of_turn`` with either policy."""
    if cfg.turn == SMART:
        return Endpointer(max(cfg.turn_max_pause, cfg.turn_pause), cfg.min_utterance, cfg.max_utterance,
                          cfg.barge_in_min, pause=cfg.turn_pause, discard_silence=cfg.end_of_turn,
                          quiet=cfg.turn_transcribe_after)
    return Endpointer(cfg.end_of_turn, cfg.min_utterance, cfg.max_utterance, cfg.barge_in_min)


class TurnInputs(Protocol):
    def quieted(self) -> None: ...
    def paused(self, event: Paused) -> None: ...
    def resumed(self) -> None: ...
    def complete(self) -> object: ...  # -> the endpointer's event ending the turn
    def finished(self) -> None: ...  # the model says finished, the transcript is still to come
    def transcript_ends(self) -> object: ...  # -> the endpointer's event ending the turn
    def transcript_dangles(self) -> None: ...
    def incomplete(self) -> object: ...  # the model says not finished; -> an event when its silence has already passed
    def unasked(self) -> object: ...  # too little speech for the model; -> an event when end_of_turn has passed
    def dangles(self) -> None: ...  # the model answered; the transcript, already there, dangles
    def failed(self) -> object: ...  # -> an event when the fixed silence has already passed
    def ended(self) -> tuple: ...  # -> (Speculation | None, the pause's time if the model ended the turn)
    def cancel(self) -> None: ...


class TurnWork:
    """What the turn policy holds between its states, and what it does."""

    def __init__(self, clock: Any, endpointer: Endpointer, model: Any, stt: Any, end_silence: float,
                 prefix: Callable[[], bytes], speculate_reply: Callable[[str], Any] | None,
                 unfinished_silence: float | None = None) -> None:
        self.clock = clock
        self.endpointer = endpointer
        self.model = model  # IEndOfTurn
        self.stt = stt
        self.end_silence = end_silence
        self.unfinished_silence = end_silence if unfinished_silence is None else unfinished_silence
        self.pending_silence: float | None = None  # unsure, the transcript still under way: the silence that ends it
        self.prefix = prefix
        self.speculate_reply = speculate_reply  # text -> SpeculativeReply; None: the brain is not asked early
        self.asked: defer.Deferred | None = None  # the model's run
        self.speculation: Speculation | None = None
        self.paused_at: float | None = None
        self.decided_by_model = False

    def begin(self) -> None:
        """The speculation of this pause (its transcription starts after the
        transition, ``TurnTaker.heard``: it may answer at once)."""
        spec = self.speculation = Speculation(self.prefix(), self.clock)
        if self.speculate_reply is not None:
            spec.on_heard = self._heard

    def start(self, event: Paused) -> None:
        self.paused_at = self.clock.seconds()
        self.decided_by_model = False
        if self.speculation is None:  # no quiet before the pause
            self.begin()
        if event.voiced >= MIN_VOICED:
            self.asked = self.model.predict(event.pcm)  # its own slot: first

    def _heard(self, spec: Speculation) -> None:
        if spec is self.speculation and spec.text and self.speculate_reply is not None:
            spec.reply = self.speculate_reply(spec.text)

    def drop_answer(self) -> None:
        asked, self.asked = self.asked, None
        if asked is not None and not asked.called:
            asked.cancel()

    def drop(self) -> None:
        self.drop_answer()
        spec, self.speculation = self.speculation, None
        if spec is not None:
            spec.cancel()
        self.paused_at = None
        self.decided_by_model = False
        self.pending_silence = None

    def end_after(self, silence: float) -> object | None:
        """Unsure: the turn ends after ``silence``, but only once its
        transcript is there (the reply needs it anyway): one that comes later
        may dangle and hold the turn, and the caller going on meanwhile is
        the same turn, not a new one."""
        spec = self.speculation
        if spec is not None and not spec.settled:  # under way, or starting right after this transition
            self.pending_silence = silence
            return None
        return self.endpointer.end_after(silence)

    def transcript_came(self) -> object | None:
        silence, self.pending_silence = self.pending_silence, None
        return None if silence is None else self.endpointer.end_after(silence)

    def hand_over(self) -> tuple:
        self.drop_answer()
        spec, self.speculation = self.speculation, None
        if spec is not None:
            spec.handed_over()
        paused = self.paused_at if self.decided_by_model else None
        self.paused_at = None
        self.decided_by_model = False
        self.pending_silence = None
        return spec, paused


builder = TypeMachineBuilder(TurnInputs, TurnWork)
idle = builder.state("idle")
early = builder.state("early")  # quieted: the transcription is under way, the model not asked yet
deciding = builder.state("deciding")
unsure = builder.state("unsure")  # ends after a silence, once the transcript is there, unless it dangles
holding = builder.state("holding")  # the transcript dangles: ends at turn_max_pause
confirming = builder.state("confirming")
STATES = (idle, early, deciding, confirming, unsure, holding)


@idle.upon(TurnInputs.quieted).to(early)
def _transcribe_early(inputs: TurnInputs, work: TurnWork) -> None:
    work.begin()


@idle.upon(TurnInputs.paused).to(deciding)
def _ask(inputs: TurnInputs, work: TurnWork, event: Paused) -> None:
    work.start(event)


@early.upon(TurnInputs.paused).to(deciding)
def _ask_after_the_quiet(inputs: TurnInputs, work: TurnWork, event: Paused) -> None:
    work.start(event)


@deciding.upon(TurnInputs.complete).to(idle)
def _finished(inputs: TurnInputs, work: TurnWork) -> object:
    work.asked = None
    work.decided_by_model = True
    return work.endpointer.end_now()


@deciding.upon(TurnInputs.finished).to(confirming)
def _finished_unheard(inputs: TurnInputs, work: TurnWork) -> None:
    work.asked = None


@confirming.upon(TurnInputs.transcript_ends).to(idle)
def _heard_finished(inputs: TurnInputs, work: TurnWork) -> object:
    work.decided_by_model = True
    return work.endpointer.end_now()


@confirming.upon(TurnInputs.transcript_dangles).to(holding)
def _heard_unfinished(inputs: TurnInputs, work: TurnWork) -> None:
    pass


@unsure.upon(TurnInputs.transcript_dangles).to(holding)
def _heard_unfinished_unsure(inputs: TurnInputs, work: TurnWork) -> None:
    work.pending_silence = None
    work.endpointer.hold()


@unsure.upon(TurnInputs.transcript_ends).loop()
def _heard_unsure(inputs: TurnInputs, work: TurnWork) -> object:
    return work.transcript_came()


@deciding.upon(TurnInputs.dangles).to(holding)
def _unfinished_words(inputs: TurnInputs, work: TurnWork) -> None:
    work.asked = None


@deciding.upon(TurnInputs.incomplete).to(unsure)
def _unfinished(inputs: TurnInputs, work: TurnWork) -> object:
    work.asked = None
    return work.end_after(work.unfinished_silence)


@deciding.upon(TurnInputs.unasked).to(unsure)
def _unheard(inputs: TurnInputs, work: TurnWork) -> object:
    return work.end_after(work.end_silence)


@deciding.upon(TurnInputs.failed).to(unsure)
def _unanswered(inputs: TurnInputs, work: TurnWork) -> object:
    work.asked = None
    return work.end_after(work.end_silence)


for _state in (early, deciding, confirming, unsure, holding):
    @_state.upon(TurnInputs.resumed).to(idle)
    def _resumed(inputs: TurnInputs, work: TurnWork) -> None:
        work.drop()

for _state in STATES:
    @_state.upon(TurnInputs.ended).to(idle)
    def _ended(inputs: TurnInputs, work: TurnWork) -> tuple:
        return work.hand_over()

    @_state.upon(TurnInputs.cancel).to(idle)
    def _cancel(inputs: TurnInputs, work: TurnWork) -> None:
        work.drop()

# every other (state, input) pair is a fact that does not matter there (a late answer, a stray pause)
_DECLARED = {
    (idle, TurnInputs.quieted), (idle, TurnInputs.paused), (early, TurnInputs.paused), (deciding, TurnInputs.complete), (deciding, TurnInputs.finished),
    (deciding, TurnInputs.incomplete), (deciding, TurnInputs.unasked), (deciding, TurnInputs.failed), (confirming, TurnInputs.transcript_ends),
    (confirming, TurnInputs.transcript_dangles), (deciding, TurnInputs.dangles), (unsure, TurnInputs.transcript_dangles),
    (unsure, TurnInputs.transcript_ends),
}
idle.upon(TurnInputs.resumed).loop().returns(None)
for _state in STATES:
    for _inp in (TurnInputs.quieted, TurnInputs.paused, TurnInputs.complete, TurnInputs.finished, TurnInputs.incomplete,
                 TurnInputs.unasked, TurnInputs.dangles, TurnInputs.failed, TurnInputs.transcript_ends, TurnInputs.transcript_dangles):
        if (_state, _inp) not in _DECLARED:
            _state.upon(_inp).loop().returns(None)

TurnMachine = builder.build()


class TurnTaker:
    """One call's turn policy (see the module docstring).

    ``heard(event)``: a ``Paused`` or ``Resumed`` of the call's endpointer;
    ``ended()``: the endpointer ended the utterance (or ``emit`` was given
    the event that does), returns ``(speculation, paused_at)``, the work for
    the turn's reply and the time the model was asked when it was the model
    that ended the turn; ``cancel()``: drop everything."""

    _log = Logger()

    def __init__(self, clock: Any, cfg: Any, model: Any, stt: Any, emit: Callable[[object], None], *,
                 prefix: Callable[[], bytes] = bytes, speculate_reply: Callable[[str], Any] | None = None,
                 call_id: str = "") -> None:
        if cfg.turn == SMART and model is None:
            raise ValueError("turn = smart needs an end-of-turn model")
        self.policy = cfg.turn
        self.endpointer = endpointer_for(cfg)
        self._emit = emit
        self._call_id = call_id
        self._work = TurnWork(clock, self.endpointer, model, stt, cfg.end_of_turn, prefix, speculate_reply,
                              unfinished_silence=min(max(cfg.turn_unfinished_pause, cfg.turn_pause),
                                                     max(cfg.turn_max_pause, cfg.turn_pause)))
        self._machine = TurnMachine(self._work)

    @property
    def speculation(self) -> Speculation | None:
        """The speculative work under way (until the turn ends)."""
        return self._work.speculation

    def heard(self, event: object) -> None:
        if isinstance(event, Quieted):
            self._machine.quieted()
            self._transcribe(event.pcm)
        elif isinstance(event, Paused):
            self._machine.paused(event)
            asked, spec = self._work.asked, self._work.speculation
            if asked is not None:  # after the transition: an answer at once (a test's model) comes back here
                asked.addCallbacks(self._answered, self._unanswered, callbackArgs=(asked,), errbackArgs=(asked,))
            elif spec is not None:  # too little speech for the model: silence decides
                decided = self._machine.unasked()
                if decided is not None:
                    self._emit(decided)
                elif spec is self._work.speculation and spec.settled:
                    self._transcribed(spec)  # the early transcript, already there, may hold the turn
            self._transcribe(event.pcm)
        elif isinstance(event, Resumed):
            self._machine.resumed()

    def _transcribe(self, pcm: bytes) -> None:
        """Start this pause's transcription (once: at the quiet, or else at the pause)."""
        spec = self._work.speculation
        if spec is not None and not spec.started:
            spec.on_done = self._transcribed
            spec.transcribe(self._work.stt, pcm)

    def ended(self) -> tuple:
        return self._machine.ended()

    def cancel(self) -> None:
        self._machine.cancel()

    def _answered(self, probability: float, asked: defer.Deferred) -> None:
        if asked is not self._work.asked:
            return
        spec = self._work.speculation
        if spec is not None and spec.settled and spec.text and unfinished(spec.text):
            decided = self._machine.dangles()
        elif probability <= FINISHED:
            decided = self._machine.incomplete()
        elif spec is not None and not spec.settled:
            decided = self._machine.finished()  # the transcript decides, once it is there
        else:
            decided = self._machine.complete()
        if decided is not None:
            self._emit(decided)

    def _transcribed(self, spec: Speculation) -> None:
        if spec is not self._work.speculation:
            return
        dangles = bool(spec.text) and unfinished(spec.text)
        decided = self._machine.transcript_dangles() if dangles else self._machine.transcript_ends()
        if decided is not None:
            self._emit(decided)

    def _unanswered(self, failure: Failure, asked: defer.Deferred) -> None:
        if failure.check(defer.CancelledError) or asked is not self._work.asked:
            return
        if not failure.check(EngineBusy):
            self._log.warn("End-of-turn model failed: {error}; the turn ends on silence", event="call.turn_model_failed",
                           call_id=self._call_id, error=failure.getErrorMessage())
        decided = self._machine.failed()
        if decided is not None:
            self._emit(decided)
