"""Energy VAD: speech is a frame well above an adaptive noise floor.

The cheapest detector (a few microseconds per 20 ms frame, no model). It
tracks the line's noise floor (a slow follower of quiet frames) and calls a
frame speech when it is both above an absolute threshold and some decibels
above the floor, so steady line hiss or hum is not speech while a voice is.

Options (``vad.*`` in an agent section):
- ``vad.threshold`` (dBFS, default -40): frames quieter than this are never speech.
- ``vad.margin`` (dB, default 12): how far above the noise floor speech must be.
"""

from __future__ import annotations

from typing import Mapping

import attrs
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES, rms_dbfs
from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    IEngineFactory,
    IVoiceActivityDetector,
    IVoiceActivityDetectorFactory,
)
from upvoot.engines.options import parse_float, reject_unknown


@attrs.frozen
class EnergySettings:
    threshold: float = -40.0
    margin: float = 12.0


@implementer(IVoiceActivityDetector)
class EnergyDetector:
    frame_bytes = FRAME_BYTES

    def __init__(self, settings: EnergySettings) -> None:
        self._s = settings
        self.reset()

    def reset(self) -> None:
        self._floor = -70.0

    def is_speech(self, frame: bytes) -> bool:
        level = rms_dbfs(frame)
        speech = level > self._s.threshold and level > self._floor + self._s.margin
        if not speech:
            # follow the floor quickly down, slowly up (a voice must not raise it)
            rate = 0.3 if level < self._floor else 0.05
            self._floor += rate * (level - self._floor)
        return speech


@implementer(IVoiceActivityDetectorFactory)
class EnergyVAD:
    def __init__(self, settings: EnergySettings) -> None:
        self.settings = settings

    def new_detector(self) -> EnergyDetector:
        return EnergyDetector(self.settings)


@implementer(IEngineFactory)
class EnergyFactory:
    kind = "vad"
    name = "energy"

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> EnergySettings:
        reject_unknown(options, {"threshold", "margin"})
        s = EnergySettings()
        if "threshold" in options:
            s = attrs.evolve(s, threshold=parse_float(options, "threshold", -100.0, 0.0))
        if "margin" in options:
            s = attrs.evolve(s, margin=parse_float(options, "margin", 0.0, 60.0))
        return s

    def build(self, settings: EnergySettings, context: EngineContext) -> EnergyVAD:
        return EnergyVAD(settings)


factory = EnergyFactory()

__all__ = ["factory", "EngineOptionError"]
