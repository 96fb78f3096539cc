"""The call: an explicit state machine that listens, thinks and speaks.

The machine decides, ``CallCore`` does: every transition below names what
the core must do, and the core reports facts back only by posting inputs
(``upvoot.call.inputs``), which the handle fires after the transition in
progress has returned, never inside it. Where order matters it is in this
table: a reply that played out is one input (``reply_played``), the closing
line another (``closing_played``); the silence timers of ``listening`` read
the ``SilenceClock``, which the core set when the audio finished playing.

States (Automat ``TypeMachineBuilder``)::

    new --start--> speaking (greeting)
    listening --speech_started--> hearing --utterance_ended--> thinking
    thinking --reply_ready--> speaking --reply_played--> listening
    speaking --speech_started--> paused   (agent audio paused, the line cleared)
    paused --speech_discarded--> speaking (not speech after all: resume from
                                           the last acknowledged mark)
    paused --speech_confirmed--> judging  (the words of it are decoded)
    judging --words_heard--> hearing      (barge-in: rest of reply dropped)
    judging --backchannel_heard--> speaking   ("mm-hm": resume)
    judging --utterance_ended--> judged   (its audio held until the words
                                           decide: judged --words_heard-->
                                           thinking, --backchannel_heard-->
                                           speaking)
    speaking --agent_finished--> ended    (the brain ended the call)
    any live state --limits / end_requested / turn_failed--> ending
    ending --closing_played--> ended;  any --hangup--> ended

Ownership: every timer and in-flight Deferred belongs to the state that
started it (the silence timers to ``listening``, the interim decoder to
``hearing``, the reply producer to thinking/speaking/paused, the closing
line to ``ending``, the decode of speech over the agent to judging/judged,
held by ``core.barge``) and is cancelled when that state is left. ``ended``
cancels whatever is left, so a finished call holds no delayed call.

Every (state, input) pair is declared: those not below are facts that do
not matter in that state (they loop, doing nothing). ``TRANSITIONS`` maps
each pair to its target state, so the handle knows the state it is in.
"""

from __future__ import annotations

from typing import Any, Callable

from automat import TypeMachineBuilder

from upvoot.call.core import CallCore
from upvoot.call.hearing import Interims
from upvoot.call.inputs import INPUT_NAMES, CallInputs
from upvoot.call.limits import Listening
from upvoot.call.outcome import EndReason
from upvoot.call.speaking import ReplyKind

__all__ = ["CallMachine", "INITIAL", "STATES", "TRANSITIONS"]

builder = TypeMachineBuilder(CallInputs, CallCore)
new = builder.state("new")
listening = builder.state("listening", lambda inputs, core: core.listening())
hearing = builder.state("hearing", lambda inputs, core: core.interims())
thinking = builder.state("thinking")
speaking = builder.state("speaking")
paused = builder.state("paused")
judging = builder.state("judging")  # confirmed speech over the agent: its words decide
judged = builder.state("judged")  # the same, once the utterance has ended (its audio held)
ending = builder.state("ending")
ended = builder.state("ended")

INITIAL = new.name
STATES = (new, listening, hearing, thinking, speaking, paused, judging, judged, ending, ended)
_LIVE = (listening, hearing, thinking, speaking, paused, judging, judged)

TRANSITIONS: dict[tuple[str, str], str] = {}


def _leave(data: tuple[object, ...]) -> None:
    """For transitions declared on several states: cancel the state data of
    the state being left when it has some (listening's timers, hearing's
    interim decoder); Automat passes it as the third argument."""
    for each in data:
        each.cancel()  # type: ignore[attr-defined]


def on(old: Any, inp: Callable[..., None], new_state: Any) -> Any:
    """Declare ``old --inp--> new_state``; decorate its implementation."""
    TRANSITIONS[(old.name, inp.__name__)] = new_state.name
    return old.upon(inp).to(new_state)


# --- new
@on(new, CallInputs.start, speaking)
def _start(inputs: CallInputs, core: CallCore) -> None:
    core.begin()


# --- listening
@on(listening, CallInputs.speech_started, hearing)
def _listen_hear(inputs: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()


@on(listening, CallInputs.silence_prompt_due, speaking)
def _prompt(inputs: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()
    core.say(core.agent.config.silence_prompt, ReplyKind.PROMPT)


@on(listening, CallInputs.wrap_up_due, speaking)
def _warn(inputs: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()
    core.say(core.agent.config.wrap_up_warning, ReplyKind.WARNING)


@on(listening, CallInputs.digit_pressed, thinking)
def _digit_listen(inputs: CallInputs, core: CallCore, data: Listening, text: str) -> None:
    data.cancel()
    core.start_text_turn(text)


@on(listening, CallInputs.digit_waiting, thinking)
def _digit_waiting_listen(inputs: CallInputs, core: CallCore, data: Listening, text: str) -> None:
    data.cancel()
    core.start_text_turn(text)


# --- hearing
@on(hearing, CallInputs.speech_discarded, listening)
def _hear_discard(inputs: CallInputs, core: CallCore, data: Interims) -> None:
    data.cancel()


@on(hearing, CallInputs.utterance_ended, thinking)
def _hear_end(inputs: CallInputs, core: CallCore, data: Interims, pcm: bytes) -> None:
    data.cancel()
    core.start_turn(pcm)


@on(hearing, CallInputs.digit_pressed, thinking)
def _digit_hear(inputs: CallInputs, core: CallCore, data: Interims, text: str) -> None:
    data.cancel()
    core.digit_turn_while_hearing(text)


@on(hearing, CallInputs.digit_waiting, thinking)
def _digit_waiting_hear(inputs: CallInputs, core: CallCore, data: Interims, text: str) -> None:
    data.cancel()
    core.digit_turn_while_hearing(text)


# --- thinking
@on(thinking, CallInputs.reply_ready, speaking)
def _think_speak(inputs: CallInputs, core: CallCore) -> None:
    core.start_reply_audio()


@on(thinking, CallInputs.nothing_heard, listening)
def _think_nothing(inputs: CallInputs, core: CallCore) -> None:
    core.forget_reply()


@on(thinking, CallInputs.speech_started, hearing)
def _think_more(inputs: CallInputs, core: CallCore) -> None:
    core.caller_resumed()


@on(thinking, CallInputs.digit_pressed, thinking)
def _digit_think(inputs: CallInputs, core: CallCore, text: str) -> None:
    core.start_text_turn(text)


@on(thinking, CallInputs.digit_waiting, thinking)
def _digit_waiting_think(inputs: CallInputs, core: CallCore, text: str) -> None:
    core.start_text_turn(text)


# --- speaking
@on(speaking, CallInputs.speech_started, paused)
def _speak_pause(inputs: CallInputs, core: CallCore) -> None:
    core.pause()


@on(speaking, CallInputs.reply_played, listening)
def _speak_done(inputs: CallInputs, core: CallCore) -> None:
    core.after_playout()


@on(speaking, CallInputs.agent_finished, ended)
def _agent_done(inputs: CallInputs, core: CallCore) -> None:
    core.finish(EndReason.AGENT)


# --- paused
@on(paused, CallInputs.speech_confirmed, judging)
def _judge(inputs: CallInputs, core: CallCore) -> None:
    core.judge()


@on(paused, CallInputs.speech_discarded, speaking)
def _not_barge(inputs: CallInputs, core: CallCore) -> None:
    core.resume()


# --- judging, judged: the words of confirmed speech over the agent decide
@on(judging, CallInputs.words_heard, hearing)
def _barge(inputs: CallInputs, core: CallCore) -> None:
    core.barge_in()


@on(judging, CallInputs.backchannel_heard, speaking)
def _backchannel(inputs: CallInputs, core: CallCore) -> None:
    core.resume(backchannel=True)


@on(judging, CallInputs.speech_discarded, speaking)
def _judged_not_speech(inputs: CallInputs, core: CallCore) -> None:
    core.resume()


@on(judging, CallInputs.utterance_ended, judged)
def _judge_ended(inputs: CallInputs, core: CallCore, pcm: bytes) -> None:
    core.barge.hold(pcm)


@on(judged, CallInputs.words_heard, thinking)
def _barge_judged_turn(inputs: CallInputs, core: CallCore) -> None:
    core.barge_in()
    core.start_turn(core.barge.take_held())


@on(judged, CallInputs.backchannel_heard, speaking)
def _backchannel_ended(inputs: CallInputs, core: CallCore) -> None:
    core.resume(backchannel=True)


@on(paused, CallInputs.utterance_ended, thinking)
def _barge_turn(inputs: CallInputs, core: CallCore, pcm: bytes) -> None:
    core.barge_in()
    core.start_turn(pcm)


# --- while the agent speaks, a digit interrupts it or waits for it
def _digit_interrupts(inputs: CallInputs, core: CallCore, text: str) -> None:
    core.barge_in()
    core.start_text_turn(text)


def _digit_waits(inputs: CallInputs, core: CallCore, text: str) -> None:
    core.hold_digit(text)


for _state in (speaking, paused, judging, judged):
    on(_state, CallInputs.digit_pressed, thinking)(_digit_interrupts)
    on(_state, CallInputs.digit_waiting, _state)(_digit_waits)


# --- the wrap-up warning while busy: said at the next quiet moment
def _wrap_up_later(inputs: CallInputs, core: CallCore, *data: object) -> None:
    core.wrap_up_pending = True


for _state in (hearing, thinking, speaking, paused, judging, judged):
    on(_state, CallInputs.wrap_up_due, _state)(_wrap_up_later)


# --- the ways to end, from every live state: the reason, and the closing line said
_ENDINGS: tuple[tuple[Callable[..., None], EndReason, Callable[[Any], str]], ...] = (
    (CallInputs.end_requested, EndReason.END_CALL, lambda cfg: cfg.goodbye),
    (CallInputs.silence_timeout, EndReason.SILENCE, lambda cfg: cfg.closing_silence),
    (CallInputs.time_up, EndReason.MAX_DURATION, lambda cfg: cfg.closing_max_duration),
    (CallInputs.turns_exhausted, EndReason.MAX_TURNS, lambda cfg: cfg.closing_max_turns),
    (CallInputs.turn_failed, EndReason.ERROR, lambda cfg: cfg.closing_error),
    (CallInputs.shutdown, EndReason.SHUTDOWN, lambda cfg: cfg.goodbye),
    (CallInputs.out_of_points, EndReason.NO_POINTS, lambda cfg: cfg.closing_no_points),
)


def _begin_ending(reason: EndReason, line_of: Callable[[Any], str]) -> Callable[..., None]:
    def begin_ending(inputs: CallInputs, core: CallCore, *data: object) -> None:
        _leave(data)
        core.begin_ending(reason, line_of(core.agent.config))

    return begin_ending


for _inp, _reason, _line in _ENDINGS:
    for _state in _LIVE:
        on(_state, _inp, ending)(_begin_ending(_reason, _line))


@on(ending, CallInputs.closing_played, ended)
def _ended(inputs: CallInputs, core: CallCore) -> None:
    core.finish()


def _hang_up(inputs: CallInputs, core: CallCore, *data: object) -> None:
    _leave(data)
    core.finish(EndReason.HANGUP)


for _state in STATES[:-1]:
    on(_state, CallInputs.hangup, ended)(_hang_up)

# --- every other (state, input) pair is a fact that does not matter there
for _state in STATES:
    for _name in INPUT_NAMES:
        if (_state.name, _name) not in TRANSITIONS:
            on(_state, getattr(CallInputs, _name), _state).returns(None)

CallMachine = builder.build()
