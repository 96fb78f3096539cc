"""Engine registry: which ini value selects which factory.

Factories are imported lazily (by dotted path) so the daemon never imports a
model library it is not configured to use.
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
