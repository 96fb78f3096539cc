"""The seams between the call machine and the engines that hear, think and speak.

The call machine (``upvoot.call.machine``) only ever talks to these interfaces, so an
engine can be swapped per agent in the ini file without touching call logic.

Audio everywhere inside UpVoot is 16 kHz mono signed 16-bit little-endian PCM
(``bytes``) unless a name says otherwise; engines that work at other rates
convert at their edge.

Every engine kind has a *factory* (``IEngineFactory``) that:

1. parses and validates its options from the agent's ini section at config
   load time, without loading any model (so a bad option stops the daemon
   before it daemonizes, naming file, section and option);
2. builds the engine once per process at service start (models are loaded
   once and shared by every call of every agent that uses the same options).

Asynchronous methods return ``Deferred`` objects or async iterators whose
``__anext__`` awaits Deferreds, so callers can drive them from coroutines
run with ``Deferred.fromCoroutine`` and cancel them on barge-in or hang-up.
"""

from __future__ import annotations

from typing import AsyncIterator, Mapping, Sequence

import attrs
from zope.interface import Attribute, Interface


class EngineOptionError(ValueError):
    """An engine option is invalid. ``option`` is the option's name without
    the engine prefix; the config loader adds file and section."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


class EngineUnavailable(RuntimeError):
    """An engine could not be built (missing model file, missing package)."""


class EngineBusy(RuntimeError):
    """The shared worker pool is saturated; the work was not queued."""


class IEngineFactory(Interface):
    """Turns an agent's ``KIND.*`` options into a shared engine instance."""

    kind = Attribute("'vad', 'stt', 'brain' or 'tts'")
    name = Attribute("the value that selects it in the ini, e.g. 'whisper'")

    def parse_options(options: Mapping[str, str], base_dir: str) -> object:
        """Validate options (names without the ``KIND.`` prefix) and return a
        hashable frozen settings object. Raise ``EngineOptionError`` naming
        the offending option. ``base_dir`` resolves relative paths. Must not
        load models."""

    def build(settings: object, context: "EngineContext") -> object:
        """Build the engine (loading models). Runs at service start, may
        block (it is called from a thread) and may raise
        ``EngineUnavailable`` with a message for the operator."""


@attrs.frozen
class EngineContext:
    """What engines may use: the shared worker pool and the reactor clock."""

    pool: object  # upvoot.daemon.workers.WorkerPool
    clock: object  # IReactorTime


class IVoiceActivityDetector(Interface):
    """Per-call, stateful: says for each 20 ms frame whether it holds speech.

    Runs on the reactor thread (it must cost microseconds per frame: hopping
    to a thread per frame costs more than the inference)."""

    frame_bytes = Attribute("bytes per frame it expects: 640 (20 ms at 16 kHz)")

    def is_speech(frame: bytes) -> bool:
        """Classify one frame of exactly ``frame_bytes`` bytes."""

    def reset() -> None:
        """Forget adaptation state (called between calls is not needed:
        detectors are per call)."""


class IVoiceActivityDetectorFactory(Interface):
    def new_detector() -> IVoiceActivityDetector:
        """A fresh detector for one call."""


class ISpeechToText(Interface):
    """Shared by all calls; work runs on the worker pool."""

    def transcribe(pcm: bytes, final: bool) -> object:
        """Return a Deferred firing with the text of ``pcm`` (16 kHz s16le).

        ``final=False`` is an interim decode of a still-growing utterance: the
        engine may fail it at once with ``EngineBusy`` when the pool is
        saturated so interims never delay finals. Cancelling the Deferred
        drops the work if it has not started and discards its result if it
        has."""


class IEndOfTurn(Interface):
    """Whether a caller who has paused has finished their turn, from the
    sound of it (smart-turn). Shared by all calls; inference runs on the
    worker pool as urgent work (its own slot), never on the reactor."""

    def predict(pcm: bytes) -> object:
        """Return a Deferred firing with the probability (0..1) that the
        utterance in ``pcm`` (16 kHz s16le, the trailing silence included)
        is a finished turn. Cancelling it discards the result."""


@attrs.frozen
class Turn:
    """One finished turn of the conversation, as the caller experienced it."""

    role: str  # "caller" or "agent"
    text: str


@attrs.frozen
class ReplyText:
    """A piece of the agent's reply text (a token, word or sentence)."""

    text: str


@attrs.frozen
class ReplyEndCall:
    """The brain decided the call should end after what it has said."""

    reason: str = "agent"


class ILanguageModel(Interface):
    """The agent's brain. Shared by all calls; per-call state is passed in."""

    def reply(system_prompt: str, history: Sequence[Turn]) -> AsyncIterator[object]:
        """Stream the agent's next reply as ``ReplyText`` pieces, optionally
        followed by ``ReplyEndCall``. The last turn of ``history`` is the
        caller's. Cancelling the consuming coroutine aborts the request."""


class IKnownReplies(Interface):
    """A brain whose every reply text is known before any call (the scripted
    brain): the daemon synthesizes them once at start, like the greeting, so
    a reply's first audio byte leaves as soon as the turn is understood."""

    def known_replies() -> Sequence[str]:
        """Every text this brain may reply with."""


class ITextToSpeech(Interface):
    """Shared by all calls; synthesis runs on the worker pool."""

    def synthesize(text: str) -> AsyncIterator[bytes]:
        """Stream 16 kHz s16le PCM for ``text`` in chunks (one per sentence
        or smaller). Cancelling the consuming coroutine stops synthesis of
        what has not started yet."""
