"""The end-of-turn model: smart-turn v3.2, offline, on the worker pool.

smart-turn (BSD-2-Clause, by Daily) is a Whisper-tiny encoder with a
classifier: it reads the last (up to) 8 s of a caller's utterance and says
how likely it is that the caller has finished their turn, from the words'
sound and the intonation, not from the length of the silence. UpVoot asks it
after a short pause (``turn_pause``) and ends the turn at once when it says
"finished" (``upvoot.call.turns``).

The model file (int8 ONNX, 8.7 MB) ships inside the ``pipecat-ai`` wheel,
which the install commands put in the venv without its dependencies
(``pip install --no-deps pipecat-ai==1.14.0``). It is found through
``importlib.metadata`` (the wheel's file list); pipecat itself is never
imported: its dependencies are not installed and the daemon needs none.

Its input, as pipecat's own analyser prepares it (read from
``pipecat/audio/turn/smart_turn/local_smart_turn_v3.py`` and
``_whisper_features.py`` of 1.14.0): the last 8 s of 16 kHz audio, shorter
audio padded with zeros at the start to exactly 8 s; that waveform
normalized to zero mean and unit variance (padding included, variance
epsilon 1e-7); Whisper's 80-bin log-mel features of it (400-sample FFT, hop
160), 800 frames: ``input_features`` ``[1, 80, 800]`` float32. faster-whisper's
own ``FeatureExtractor`` computes the same features (largest difference to
pipecat's reference features ~3e-7, tests/test_smartturn.py checks it). The
output (named ``logits``, ``[1, 1]``) is already a probability; above 0.5 is
"finished", as in pipecat.

One onnxruntime session per process, one intra-op thread (70-85 ms per
inference on one core), shared by every call; ``predict`` runs it on the
worker pool as *urgent* work: its own slot, never behind interims or queued
transcriptions.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from upvoot._env import set_offline_environment

set_offline_environment()  # before onnxruntime loads

import numpy as np  # noqa: E402
from zope.interface import implementer  # noqa: E402

from upvoot.audio import to_float32  # noqa: E402
from upvoot.engines.interfaces import EngineContext, EngineUnavailable, IEndOfTurn  # noqa: E402

DISTRIBUTION = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
INSTALL = f"pip install --no-deps {DISTRIBUTION}==1.14.0"

RATE = 16000
SECONDS = 8  # the window the model reads
SAMPLES = RATE * SECONDS
FRAMES = SAMPLES // 160  # 800 feature frames
THRESHOLD = 0.5  # above: the turn is finished


def model_path() -> str:
    """Where the installed ``pipecat-ai`` wheel keeps the smart-turn v3.2
    model, found from the wheel's file list (pipecat is not imported).
    ``EngineUnavailable`` saying how to install it when it is not there."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EngineUnavailable(f"the smart-turn model is not installed (it ships in the {DISTRIBUTION} "
                                f"wheel: {INSTALL})") from None
    for file in dist.files or ():
        if file.as_posix() == MODEL_FILE:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise EngineUnavailable(f"{DISTRIBUTION} {dist.version} holds no {MODEL_FILE} (install {INSTALL})")


def window(pcm: bytes) -> np.ndarray:
    """The model's waveform: the last 8 s, zero-padded at the start to 8 s."""
    audio = to_float32(pcm)[-SAMPLES:]
    if audio.size < SAMPLES:
        audio = np.pad(audio, (SAMPLES - audio.size, 0))
    return audio


class Features:
    """Whisper log-mel features of the normalized 8 s window, computed with
    faster-whisper's ``FeatureExtractor`` (thread-safe: it only reads its
    filters)."""

    def __init__(self) -> None:
        from faster_whisper.feature_extractor import FeatureExtractor

        self._extract = FeatureExtractor(feature_size=80, sampling_rate=RATE, hop_length=160, chunk_length=SECONDS,
                                         n_fft=400)

    def __call__(self, pcm: bytes) -> np.ndarray:
        audio = window(pcm)
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        mel = self._extract(audio, padding=0)  # [80, 801 - 1]
        return mel[None, :, :FRAMES].astype(np.float32)


@implementer(IEndOfTurn)
class SmartTurn:
    """The loaded model; ``predict`` on the worker pool, ``probability`` inline."""

    def __init__(self, session: Any, pool: Any) -> None:
        self._session = session
        self._pool = pool
        self._features = Features()
        self._input = session.get_inputs()[0].name

    def predict(self, pcm: bytes):
        return self._pool.run(self.probability, pcm, urgent=True)

    def probability(self, pcm: bytes) -> float:
        """Blocking inference (a worker thread): P(the turn is finished)."""
        (out,) = self._session.run(None, {self._input: self._features(pcm)})
        return float(np.asarray(out).reshape(-1)[0])


def load(context: EngineContext, path: str | None = None) -> SmartTurn:
    """Load the model (blocking: at service start, in a thread)."""
    path = path or model_path()
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed: {e}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EngineUnavailable(f"cannot load the smart-turn model {path}: {e}") from None
    shape = session.get_inputs()[0].shape
    if list(shape[1:]) != [80, FRAMES]:
        raise EngineUnavailable(f"{path} is not smart-turn v3 (input shape {shape}, expected [N, 80, {FRAMES}])")
    return SmartTurn(session, context.pool)


__all__ = ["INSTALL", "MODEL_FILE", "SmartTurn", "THRESHOLD", "load", "model_path"]
