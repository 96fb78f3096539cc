"""The call: an explicit state machine that listens, thinks and speaks.

Sans-IO: it talks to an ``ICallOutput`` (the WebSocket adapter implements it
through a provider framing) and to the engine seams, and it reads time only
from the injected clock. It knows nothing of Autobahn, Exotel or Twilio, so
unit tests drive it with ``task.Clock`` and fake engines, and the daemon
drives the very same machine over a socket.

States (Automat ``TypeMachineBuilder``)::

    new --start--> speaking (greeting)
    listening --speech_started--> hearing --utterance_ended--> thinking
    thinking --reply_ready--> speaking --playout_finished--> listening
    speaking --speech_started--> paused   (agent audio paused at once)
    paused --speech_confirmed--> hearing  (barge-in: rest of reply dropped)
    paused --speech_discarded--> speaking (not speech after all: resume)
    any live state --limits / end_requested / turn_failed--> ending
    ending --playout_finished--> ended;  any --hangup--> ended

Ownership: every timer and in-flight Deferred belongs to the state that
started it (the silence timers to ``listening``, the interim decoder to
``hearing``, the reply producer to thinking/speaking/paused, the closing
line to ``ending``) and is cancelled when that state is left. ``ended``
cancels whatever is left, so a finished call holds no delayed call.
"""

from __future__ import annotations

from typing import Any, Callable

from automat import TypeMachineBuilder

from upvoot.call.core import CallCore, CallInputs, EndReason, Hearing, ICallOutput, Listening
from upvoot.call.playout import Pacer

__all__ = ["CallInputs", "CallCore", "EndReason", "ICallOutput", "new_call", "state_of", "CallMachine"]

# ============================================================== the machine

builder = TypeMachineBuilder(CallInputs, CallCore)
new = builder.state("new")
listening = builder.state("listening", lambda proto, core, *a: Listening(core, proto))
hearing = builder.state("hearing", lambda proto, core, *a: Hearing(core, proto))
thinking = builder.state("thinking")
speaking = builder.state("speaking")
paused = builder.state("paused")
ending = builder.state("ending")
ended = builder.state("ended")

_handled: set[tuple[str, str]] = set()


def on(state, inp, target):
    _handled.add((state.name, inp.__name__))
    return state.upon(inp).to(target)


# --- new
@on(new, CallInputs.start, speaking)
def _start(proto: CallInputs, core: CallCore) -> None:
    core.start_timers()
    core.say(core.agent.config.greeting, "greeting")


# --- listening
@on(listening, CallInputs.speech_started, hearing)
def _listen_hear(proto: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()


@on(listening, CallInputs.silence_prompt_due, speaking)
def _prompt(proto: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()
    core.say(core.agent.config.silence_prompt, "prompt")


@on(listening, CallInputs.wrap_up_due, speaking)
def _warn(proto: CallInputs, core: CallCore, data: Listening) -> None:
    data.cancel()
    core.say(core.agent.config.wrap_up_warning, "warning")


# --- hearing
@on(hearing, CallInputs.speech_discarded, listening)
def _hear_discard(proto: CallInputs, core: CallCore, data: Hearing) -> None:
    data.cancel()


@on(hearing, CallInputs.utterance_ended, thinking)
def _hear_end(proto: CallInputs, core: CallCore, data: Hearing, pcm: bytes) -> None:
    data.cancel()
    core.start_turn(pcm)


# --- keypad digits: a caller turn whose text is known
@on(listening, CallInputs.digit_pressed, thinking)
def _digit_listen(proto: CallInputs, core: CallCore, data: Listening, text: str) -> None:
    data.cancel()
    core.start_text_turn(text)


@on(hearing, CallInputs.digit_pressed, thinking)
def _digit_hear(proto: CallInputs, core: CallCore, data: Hearing, text: str) -> None:
    data.cancel()
    core.endpointer.reset()
    core.start_text_turn(text)


@on(thinking, CallInputs.digit_pressed, thinking)
def _digit_think(proto: CallInputs, core: CallCore, text: str) -> None:
    core.start_text_turn(text)


for _state in (speaking, paused):

    def _digit_interrupts(proto: CallInputs, core: CallCore, text: str) -> None:
        core.barge_in()
        core.start_text_turn(text)

    _digit_interrupts.__name__ = f"digit_from_{_state.name}"
    on(_state, CallInputs.digit_pressed, thinking)(_digit_interrupts)


# --- thinking
@on(thinking, CallInputs.reply_ready, speaking)
def _think_speak(proto: CallInputs, core: CallCore) -> None:
    core.start_reply_audio()


@on(thinking, CallInputs.nothing_heard, listening)
def _think_nothing(proto: CallInputs, core: CallCore) -> None:
    core.reply = None


@on(thinking, CallInputs.speech_started, hearing)
def _think_more(proto: CallInputs, core: CallCore) -> None:
    if core.reply is not None and core.reply.committed:
        core.reply.cancel()
        core.reply = None
    else:
        core.abandon_turn()  # keeps core.reply so its audio joins the next turn


# --- speaking
@on(speaking, CallInputs.speech_started, paused)
def _speak_pause(proto: CallInputs, core: CallCore) -> None:
    core.pause()


@on(speaking, CallInputs.playout_finished, listening)
def _speak_done(proto: CallInputs, core: CallCore) -> None:
    pass  # CallCore.after_playout already ran: the silence timers need it


@on(speaking, CallInputs.agent_finished, ended)
def _agent_done(proto: CallInputs, core: CallCore) -> None:
    core.reply = None
    core.end_reason = EndReason.AGENT
    core.finish()


# --- paused
@on(paused, CallInputs.speech_confirmed, hearing)
def _barge(proto: CallInputs, core: CallCore) -> None:
    core.barge_in()


@on(paused, CallInputs.speech_discarded, speaking)
def _not_barge(proto: CallInputs, core: CallCore) -> None:
    core.resume()


@on(paused, CallInputs.utterance_ended, thinking)
def _barge_turn(proto: CallInputs, core: CallCore, pcm: bytes) -> None:
    core.barge_in()
    core.start_turn(pcm)


# --- the ways to end, from every live state
_LIVE = (listening, hearing, thinking, speaking, paused)


def _ending(inp, reason: EndReason, line_of: Callable[[Any], str]) -> None:
    for state in _LIVE:
        reg = on(state, inp, ending)
        if state in (listening, hearing):

            def impl(proto, core, data: object, *a, _reason=reason, _line=line_of):
                data.cancel()
                core.begin_ending(_reason, _line(core.agent.config))

        else:

            def impl(proto, core, *a, _reason=reason, _line=line_of):
                core.begin_ending(_reason, _line(core.agent.config))

        impl.__name__ = f"end_{reason.value}_from_{state.name}"
        reg(impl)


_ending(CallInputs.end_requested, EndReason.END_CALL, lambda c: c.goodbye)
_ending(CallInputs.silence_timeout, EndReason.SILENCE, lambda c: c.closing_silence)
_ending(CallInputs.time_up, EndReason.MAX_DURATION, lambda c: c.closing_max_duration)
_ending(CallInputs.turns_exhausted, EndReason.MAX_TURNS, lambda c: c.closing_max_turns)
_ending(CallInputs.turn_failed, EndReason.ERROR, lambda c: c.closing_error)
_ending(CallInputs.shutdown, EndReason.SHUTDOWN, lambda c: c.goodbye)


@on(ending, CallInputs.playout_finished, ended)
def _ended(proto: CallInputs, core: CallCore) -> None:
    core.finish()


for _state in _LIVE + (ending, new):
    reg = on(_state, CallInputs.hangup, ended)
    if _state in (listening, hearing):

        def _hang(proto, core, data: object):
            data.cancel()
            core.finish(EndReason.HANGUP)

    else:

        def _hang(proto, core):
            core.finish(EndReason.HANGUP)

    _hang.__name__ = f"hangup_from_{_state.name}"
    reg(_hang)


# wrap-up warning while busy: say it at the next quiet moment
for _state in (hearing, thinking, speaking, paused):

    if _state is hearing:

        def _later(proto, core, data: object):
            core.wrap_up_pending = True

    else:

        def _later(proto, core):
            core.wrap_up_pending = True

    _handled.add((_state.name, "wrap_up_due"))
    _state.upon(CallInputs.wrap_up_due).loop()(_later)

# every other (state, input) pair is a fact that does not matter there
for _state in (new, listening, hearing, thinking, speaking, paused, ending, ended):
    for _name in ("start", "speech_started", "speech_confirmed", "speech_discarded", "utterance_ended", "digit_pressed",
                  "nothing_heard", "reply_ready", "playout_finished", "agent_finished", "turns_exhausted",
                  "turn_failed", "silence_prompt_due", "silence_timeout", "wrap_up_due", "time_up",
                  "end_requested", "shutdown", "hangup"):
        if (_state.name, _name) not in _handled:
            _state.upon(getattr(CallInputs, _name)).loop().returns(None)

CallMachine = builder.build()


def new_call(agent: Any, output: ICallOutput, clock: Any, pacer: Pacer, on_ended: Callable[[dict], None], **kw: Any) -> tuple[CallInputs, CallCore]:
    """Make a call machine (not yet started: call ``machine.start()``)."""
    core = CallCore(agent, output, clock, pacer, on_ended, **kw)
    machine = CallMachine(core)
    core.machine = machine
    return machine, core


def state_of(machine: CallInputs) -> str:
    """The current state's name (for tests and logs)."""
    return machine.__automat_transitioner__._state.name  # type: ignore[attr-defined]
