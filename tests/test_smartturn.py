"""The end-of-turn model (upvoot.engines.smartturn): found in the installed
pipecat-ai wheel without importing pipecat, fed the features pipecat feeds
it, and deciding both ways on synthesized speech. How often it is right is
measured by bench/hesitant.py, not here: these sentences check the
pipeline, each chosen as one the model gets right."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import pytest_twisted

from upvoot import audio
from upvoot.daemon.workers import SynchronousPool, WorkerPool
from upvoot.engines.interfaces import EngineContext

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_imports_pipecat():
    """The daemon only reads the model file out of the wheel."""
    for path in (ROOT / "upvoot").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "pipecat" for n in names), f"{path} imports pipecat"


slow = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    from upvoot.engines import smartturn

    return smartturn.load(EngineContext(pool=SynchronousPool(), clock=None))


@pytest.fixture(scope="module")
def voice():
    from upvoot.engines import get_factory

    piper = get_factory("tts", "piper")
    tts = piper.build(piper.parse_options({"noise_scale": "0", "noise_w_scale": "0"}, "."),
                      EngineContext(pool=SynchronousPool(), clock=None))
    return lambda text: audio.to_int16(tts.synthesize_sync(text))


def _end(x: np.ndarray) -> int:
    """The sample after the last 20 ms within 35 dB of the loudest."""
    frames = x[: len(x) // 320 * 320].reshape(-1, 320).astype(np.float64)
    level = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-9)
    return int((np.nonzero(level > level.max() - 35)[0][-1] + 1) * 320)


def _pause(x: np.ndarray) -> bytes:
    """``x`` and the 200 ms of silence after which the policy asks the model."""
    return np.concatenate([np.zeros(8000, np.int16), x, np.zeros(3200, np.int16)]).astype("<i2").tobytes()


@slow
def test_the_model_file_comes_from_the_wheel():
    from upvoot.engines import smartturn

    path = smartturn.model_path()
    assert path.endswith(smartturn.MODEL_FILE) and Path(path).stat().st_size > 8_000_000


@slow
def test_the_features_are_pipecats(model):
    """faster-whisper's extractor against pipecat's own numpy reference
    (its ``_whisper_features.py``, loaded from the wheel by path: a
    self-contained numpy module; the pipecat package is not imported)."""
    from upvoot.engines import smartturn

    dist = importlib.metadata.distribution(smartturn.DISTRIBUTION)
    (file,) = [f for f in dist.files if f.as_posix() == "pipecat/audio/turn/smart_turn/_whisper_features.py"]
    spec = importlib.util.spec_from_file_location("smart_turn_reference_features", dist.locate_file(file))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    rng = np.random.default_rng(1)
    for seconds in (1.3, 8.0, 9.5):
        pcm = (rng.standard_normal(int(seconds * 16000)) * 3000).astype("<i2").tobytes()
        expected = reference.compute_whisper_log_mel_features(smartturn.window(pcm), do_normalize=True)
        ours = smartturn.Features()(pcm)
        assert ours.shape == (1, 80, 800)
        assert np.abs(ours[0] - expected).max() < 1e-5


@slow
def test_a_complete_sentence_is_finished_and_an_unfinished_one_is_not(model, voice):
    complete = voice("I'd like to book a table for four people.")
    assert model.probability(_pause(complete[:_end(complete)])) > 0.5
    # "I was wondering if ..." cut where "if" ends, as spoken in the whole sentence
    whole = voice("I was wondering if you could help me with my bill.")
    alone = voice("I was wondering if")
    near = _end(alone)
    window = [float((whole[i:i + 320].astype(np.float64) ** 2).mean()) for i in range(near - 2400, near + 2400, 40)]
    cut = near - 2400 + 40 * int(np.argmin(window)) + 160
    assert model.probability(_pause(whole[:cut])) < 0.5


@slow
@pytest_twisted.ensureDeferred
async def test_predict_runs_on_the_workers_urgent_slot(voice):
    from twisted.internet import reactor

    from upvoot.engines import smartturn

    pool = WorkerPool(reactor, size=1, name="test-smartturn")
    pool.start()
    try:
        turn = smartturn.load(EngineContext(pool=pool, clock=reactor))
        complete = voice("What are your opening hours?")
        p = await turn.predict(_pause(complete[:_end(complete)]))
        assert 0.0 <= p <= 1.0 and pool.urgent_active == 0
    finally:
        pool.stop()
