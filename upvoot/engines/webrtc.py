"""WebRTC's voice activity detector (the GMM from libwebrtc): almost free.

About 2 us per 20 ms frame, no model file. Its weakness is adaptation: a
fresh instance calls the first ~100 ms of line noise speech, so each
detector reports not-speech for its first ``WARMUP_FRAMES`` frames while the
model settles (the frames are still fed to it). It is also fooled when a
line goes from digital silence to noise (it adapted to the silence): prefer
``silero`` where the line is noisy.

Options (``vad.*`` in an agent section):
- ``aggressiveness`` (0-3, default 2): higher rejects more non-speech (and
  clips more quiet speech).
"""

from __future__ import annotations

from typing import Mapping

import attrs
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES, RATE
from upvoot.engines.interfaces import (
    EngineContext,
    EngineUnavailable,
    IEngineFactory,
    IVoiceActivityDetector,
    IVoiceActivityDetectorFactory,
)
from upvoot.engines.options import parse_int, reject_unknown

#: 160 ms: the span a fresh instance needs before its decisions mean anything.
WARMUP_FRAMES = 8


@attrs.frozen
class WebRTCSettings:
    aggressiveness: int = 2


@implementer(IVoiceActivityDetector)
class WebRTCDetector:
    frame_bytes = FRAME_BYTES

    def __init__(self, module, aggressiveness: int) -> None:
        self._module = module
        self._aggressiveness = aggressiveness
        self.reset()

    def reset(self) -> None:
        self._vad = self._module.Vad(self._aggressiveness)
        self._frames = 0

    def is_speech(self, frame: bytes) -> bool:
        speech = self._vad.is_speech(frame, RATE)
        if self._frames < WARMUP_FRAMES:
            self._frames += 1
            return False
        return speech


@implementer(IVoiceActivityDetectorFactory)
class WebRTCVAD:
    def __init__(self, module, settings: WebRTCSettings) -> None:
        self._module = module
        self.settings = settings

    def new_detector(self) -> WebRTCDetector:
        return WebRTCDetector(self._module, self.settings.aggressiveness)


@implementer(IEngineFactory)
class WebRTCFactory:
    kind = "vad"
    name = "webrtc"

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> WebRTCSettings:
        reject_unknown(options, {"aggressiveness"})
        s = WebRTCSettings()
        if "aggressiveness" in options:
            s = attrs.evolve(s, aggressiveness=parse_int(options, "aggressiveness", 0, 3))
        return s

    def build(self, settings: WebRTCSettings, context: EngineContext) -> WebRTCVAD:
        try:
            import webrtcvad
        except ImportError as e:
            raise EngineUnavailable(f"webrtcvad (package webrtcvad-wheels) is not installed: {e}") from None
        return WebRTCVAD(webrtcvad, settings)


factory = WebRTCFactory()

__all__ = ["factory", "WebRTCSettings", "WebRTCVAD", "WebRTCDetector"]
