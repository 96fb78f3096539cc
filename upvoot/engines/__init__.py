"""The engines: voice activity, speech-to-text, brains, text-to-speech.

Owns: the engine interfaces (``interfaces``), the registry of factories
(here: which ini value selects which factory), every engine and the parsers
of its ``KIND.*`` options. Factories are imported lazily (by dotted path) so
the daemon never imports a model library it is not configured to use.

Engines know neither socket nor call: they never import ``upvoot.daemon``,
``upvoot.call``, ``upvoot.framing``, ``upvoot.ledger``, ``upvoot.dial`` or
Autobahn. Model work runs on the worker pool they are given, never on the
reactor.
"""

from __future__ import annotations

import importlib

from upvoot.engines.interfaces import EngineOptionError, IEngineFactory

KINDS = ("vad", "stt", "brain", "tts")

_FACTORIES: dict[tuple[str, str], str] = {
    ("vad", "energy"): "upvoot.engines.energy:factory",
    ("vad", "silero"): "upvoot.engines.silero:factory",
    ("vad", "webrtc"): "upvoot.engines.webrtc:factory",
    ("stt", "whisper"): "upvoot.engines.whisper:factory",
    ("tts", "piper"): "upvoot.engines.piper:factory",
    ("tts", "espeak"): "upvoot.engines.espeak:factory",
    ("brain", "scripted"): "upvoot.engines.scripted:factory",
    ("brain", "openai"): "upvoot.engines.openai_llm:factory",
    ("brain", "llamacpp"): "upvoot.engines.llamacpp:factory",
    ("stt", "openai"): "upvoot.engines.openai_speech:stt_factory",
    ("tts", "openai"): "upvoot.engines.openai_speech:tts_factory",
}


def names(kind: str) -> list[str]:
    return sorted(n for k, n in _FACTORIES if k == kind)


def get_factory(kind: str, name: str) -> IEngineFactory:
    """The factory for ``kind``/``name``; ``EngineOptionError`` if unknown."""
    try:
        target = _FACTORIES[(kind, name)]
    except KeyError:
        raise EngineOptionError(
            "", f"unknown {kind} engine {name!r} (choose from: {', '.join(names(kind))})"
        ) from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
