"""The offline speech engines: sentence splitting, options, and the real models.

Speech is synthesized here by piper *and* espeak-ng (so the recognizer is not
only tested on the voice that speaks to it), padded with silence and mixed
with white noise. Model-loading tests are marked ``slow``; each model is
loaded once per module.
"""

from __future__ import annotations

import re
import shutil

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from upvoot import audio
from upvoot.engines import get_factory
from upvoot.engines import espeak, piper, silero, webrtc, whisper
from upvoot.engines.interfaces import (
    EngineBusy,
    EngineContext,
    EngineOptionError,
    EngineUnavailable,
    IEngineFactory,
    ISpeechToText,
    ITextToSpeech,
    IVoiceActivityDetector,
    IVoiceActivityDetectorFactory,
)
from upvoot.engines.sentences import SentenceSplitter, split_sentences
from upvoot.daemon.workers import WorkerPool

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)

PIPER_TEXT = "The quick brown fox jumps over the lazy dog. Please call me back tomorrow morning."
ESPEAK_TEXT = "Hello, I would like to order a large pizza for dinner tonight. Please call me back tomorrow morning."
LEAD_SECONDS = 1.0




# ---------------------------------------------------------------------------
# sentences (no models)

def test_split_sentences_basic():
    assert split_sentences("Hello there. How are you today? I am fine!") == [
        "Hello there.", "How are you today?", "I am fine!",
    ]
    assert split_sentences("") == []
    assert split_sentences("   ") == []
    assert split_sentences("No final stop") == ["No final stop"]


def test_split_sentences_keeps_abbreviations_numbers_and_initials():
    text = "Dr. Smith sees you at 3.30 p.m. tomorrow. J. R. Tolkien wrote it, e.g. this one. Done."
    assert split_sentences(text, first_clause_words=0) == [
        "Dr. Smith sees you at 3.30 p.m. tomorrow.",
        "J. R. Tolkien wrote it, e.g. this one.",
        "Done.",
    ]


def test_split_sentences_quotes_ellipsis_and_lines():
    assert split_sentences('He said "stop." Then left. Wait... what?! Well\u2026 Go.') == [
        'He said "stop."', "Then left.", "Wait... what?!", "Well\u2026", "Go.",
    ]
    assert split_sentences("First line\n\n- second line\nthird") == ["First line", "- second line", "third"]


def test_long_first_sentence_is_cut_at_a_clause():
    text = "Well, I think that the best option, given your schedule, is Tuesday. Does that work, or not?"
    assert split_sentences(text) == [
        "Well, I think that the best option,",
        "given your schedule, is Tuesday.",
        "Does that work, or not?",
    ]
    # short heads are not cut off ("Sure," alone sounds clipped)
    assert split_sentences("Sure, I can do that. Bye.") == ["Sure, I can do that.", "Bye."]
    # dashes cut too, and are not spoken
    assert split_sentences("One two three four five - six seven.")[0] == "One two three four five"
    assert split_sentences(text, first_clause_words=0)[0] == "Well, I think that the best option, given your schedule, is Tuesday."


def test_run_on_text_is_cut_before_max_chars():
    words = " ".join(["word"] * 100)
    pieces = split_sentences(words, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == words
    assert split_sentences("x" * 120, max_chars=50) == ["x" * 50, "x" * 50, "x" * 20]


def test_splitter_streams_tokens_and_resets_on_flush():
    s = SentenceSplitter()
    out = []
    tokens = ["Sure", ",", " I", " can", " help", " you", " with", " that", ",", " no", " problem", ".",
              " It", " is", " 3", ".", "5", " hours", "."]
    for tok in tokens:
        out += s.feed(tok)
    assert out == ["Sure, I can help you with that,", "no problem."]
    assert s.flush() == "It is 3.5 hours."
    assert s.flush() == ""
    # after a flush the next reply's first sentence is again cut early
    assert s.feed("One two three four five, six. ") == ["One two three four five,"]


CHUNKING_TEXTS = [
    "Well, I think that the best option, given your schedule, is Tuesday. Does that work?",
    "Dr. Smith sees you at 3.30 p.m. tomorrow. J. R. Tolkien wrote it! Wait... what? OK.",
    'He said "stop." Then left.\nNew line here - and a dash; then a colon: done.',
    " ".join(["run on"] * 60) + ". End.",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CHUNKING_TEXTS), st.lists(st.integers(min_value=0, max_value=500), max_size=30))
def test_chunking_does_not_change_the_pieces(text, cuts):
    s = SentenceSplitter(max_chars=80)
    out, last = [], 0
    for cut in sorted(set(c for c in cuts if c <= len(text))):
        out += s.feed(text[last:cut])
        last = cut
    out += s.feed(text[last:])
    rest = s.flush()
    if rest:
        out.append(rest)
    assert out == split_sentences(text, max_chars=80)


# ---------------------------------------------------------------------------
# options and registry (no models)

@pytest.mark.parametrize("kind,name,module", [
    ("stt", "whisper", whisper), ("tts", "piper", piper), ("tts", "espeak", espeak),
    ("vad", "silero", silero), ("vad", "webrtc", webrtc),
])
def test_registry_and_defaults(kind, name, module):
    f = get_factory(kind, name)
    assert f is module.factory
    assert IEngineFactory.providedBy(f) and (f.kind, f.name) == (kind, name)
    s = f.parse_options({}, ".")
    assert hash(s) == hash(f.parse_options({}, "."))


@pytest.mark.parametrize("module,options,option", [
    (whisper, {"beam_size": "zero"}, "beam_size"),
    (whisper, {"beam_size": "0"}, "beam_size"),
    (whisper, {"cpu_threads": "-1"}, "cpu_threads"),
    (whisper, {"num_workers": "0"}, "num_workers"),
    (whisper, {"compute_type": "float99"}, "compute_type"),
    (whisper, {"language": "English please"}, "language"),
    (whisper, {"temperature": "0.2"}, "temperature"),
    (piper, {"length_scale": "0"}, "length_scale"),
    (piper, {"noise_scale": "loud"}, "noise_scale"),
    (piper, {"noise_w_scale": "-1"}, "noise_w_scale"),
    (piper, {"threads": "0"}, "threads"),
    (piper, {"voice": "joe"}, "voice"),
    (espeak, {"rate": "10"}, "rate"),
    (espeak, {"voice": "-x"}, "voice"),
    (espeak, {"voice": "en us"}, "voice"),
    (espeak, {"executable": " "}, "executable"),
    (silero, {"threshold": "1.5"}, "threshold"),
    (silero, {"threshold": "0"}, "threshold"),
    (webrtc, {"aggressiveness": "4"}, "aggressiveness"),
    (webrtc, {"aggressiveness": "high"}, "aggressiveness"),
])
def test_bad_options_name_the_option(module, options, option):
    with pytest.raises(EngineOptionError) as e:
        module.factory.parse_options(options, ".")
    assert e.value.option == option


def test_options_parse(tmp_path):
    s = whisper.factory.parse_options(
        {"model": "models/tiny", "language": "auto", "beam_size": "5", "cpu_threads": "2", "num_workers": "1", "compute_type": "int8"},
        str(tmp_path),
    )
    assert s == whisper.WhisperSettings(str(tmp_path / "models" / "tiny"), None, 5, 2, 1, "int8")
    p = piper.factory.parse_options({"length_scale": "1.2", "noise_scale": "0", "speaker": "3"}, ".")
    assert (p.length_scale, p.noise_scale, p.noise_w_scale, p.speaker) == (1.2, 0.0, None, "3")
    assert espeak.factory.parse_options({"voice": "en-gb", "rate": "200"}, ".") == espeak.EspeakSettings("en-gb", 200)


def _context():
    return EngineContext(pool=None, clock=None)


def test_missing_whisper_model_is_unavailable(tmp_path):
    missing = tmp_path / "no-such-model"
    s = whisper.factory.parse_options({"model": str(missing)}, ".")
    with pytest.raises(EngineUnavailable, match=re.escape(str(missing))):
        whisper.factory.build(s, _context())


@pytest.mark.slow
def test_invalid_whisper_model_is_unavailable(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not a model")
    s = whisper.factory.parse_options({"model": str(tmp_path)}, ".")
    with pytest.raises(EngineUnavailable, match=re.escape(str(tmp_path))):
        whisper.factory.build(s, _context())


def test_missing_piper_voice_is_unavailable(tmp_path):
    missing = tmp_path / "voice.onnx"
    s = piper.factory.parse_options({"model": str(missing)}, ".")
    with pytest.raises(EngineUnavailable, match=re.escape(str(missing))):
        piper.factory.build(s, _context())


@pytest.mark.slow
def test_invalid_piper_voice_is_unavailable(tmp_path):
    model = tmp_path / "voice.onnx"
    model.write_bytes(b"not onnx")
    (tmp_path / "voice.onnx.json").write_text(
        '{"num_symbols": 1, "num_speakers": 1, "audio": {"sample_rate": 22050},'
        ' "espeak": {"voice": "en-us"}, "phoneme_id_map": {}}'
    )
    s = piper.factory.parse_options({"model": str(model)}, ".")
    with pytest.raises(EngineUnavailable, match=re.escape(str(model))):
        piper.factory.build(s, _context())


def test_missing_espeak_is_unavailable():
    s = espeak.factory.parse_options({"executable": "no-such-espeak-ng"}, ".")
    with pytest.raises(EngineUnavailable, match="no-such-espeak-ng"):
        espeak.factory.build(s, _context())


@needs_espeak
def test_unknown_espeak_voice_is_unavailable():
    s = espeak.factory.parse_options({"voice": "xx-nosuchvoice"}, ".")
    with pytest.raises(EngineUnavailable, match="xx-nosuchvoice"):
        espeak.factory.build(s, _context())


def test_parse_wav_ignores_placeholder_sizes():
    pcm = audio.tone(440, 0.1, rate=22050)
    wav = bytearray(audio.wav_bytes(pcm, rate=22050))
    wav[4:8] = wav[40:44] = b"\xff\xff\xff\x7f"  # what espeak-ng writes to a pipe
    assert espeak.parse_wav(bytes(wav)) == (22050, pcm)
    with pytest.raises(espeak.EspeakError):
        espeak.parse_wav(b"garbage")


# ---------------------------------------------------------------------------
# the real models (slow): each loaded once for the module

@pytest.fixture(scope="module")
def pool():
    from twisted.internet import reactor

    p = WorkerPool(reactor, size=2)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def context(pool):
    from twisted.internet import reactor

    return EngineContext(pool=pool, clock=reactor)


@pytest.fixture(scope="module")
def stt(context):
    return whisper.factory.build(whisper.factory.parse_options({}, "."), context)


@pytest.fixture(scope="module")
def tts(context):
    # noise 0: the same audio every run
    opts = {"noise_scale": "0", "noise_w_scale": "0"}
    return piper.factory.build(piper.factory.parse_options(opts, "."), context)


@pytest.fixture(scope="module")
def espeak_tts(context):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return espeak.factory.build(espeak.factory.parse_options({}, "."), context)


@pytest.fixture(scope="module")
def piper_speech(tts):
    return tts.synthesize_sync(PIPER_TEXT)


@pytest.fixture(scope="module")
def espeak_speech(espeak_tts):
    return espeak_tts.synthesize_sync(ESPEAK_TEXT)


def on_noisy_line(speech: bytes, level_dbfs: float, seed: int = 1) -> bytes:
    """Speech padded with silence (1 s before, 1 s after), noise throughout."""
    clean = audio.silence(LEAD_SECONDS) + speech + audio.silence(1.0)
    mixed = audio.to_float32(clean) + audio.to_float32(audio.noise(audio.duration(clean), level_dbfs, seed=seed))
    return audio.from_float32(mixed)


def speech_span(speech: bytes) -> tuple[float, float]:
    """Seconds (in the padded signal) of the first and last clean frame above -45 dBFS."""
    loud = [i for i in range(0, len(speech) // audio.FRAME_BYTES)
            if audio.rms_dbfs(speech[i * audio.FRAME_BYTES:(i + 1) * audio.FRAME_BYTES]) > -45]
    return LEAD_SECONDS + loud[0] * 0.02, LEAD_SECONDS + (loud[-1] + 1) * 0.02


def decisions(detector, pcm: bytes) -> list[bool]:
    n = len(pcm) // audio.FRAME_BYTES
    return [detector.is_speech(pcm[i * audio.FRAME_BYTES:(i + 1) * audio.FRAME_BYTES]) for i in range(n)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.mark.slow
@pytest.mark.parametrize("level", [-50, -35])
@pytest_twisted.ensureDeferred
async def test_whisper_hears_piper(stt, piper_speech, level):
    assert ISpeechToText.providedBy(stt)
    text = await stt.transcribe(on_noisy_line(piper_speech, level), final=True)
    assert words(text) == words(PIPER_TEXT)


@pytest.mark.slow
@pytest.mark.parametrize("level", [-50, -35])
@pytest_twisted.ensureDeferred
async def test_whisper_hears_espeak(stt, espeak_speech, level):
    # espeak-ng is robotic: tiny.en mishears some of its words, so check the key ones
    text = await stt.transcribe(on_noisy_line(espeak_speech, level), final=True)
    heard = set(words(text))
    assert {"order", "pizza", "dinner", "tonight", "call", "tomorrow", "morning"} <= heard, text


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_whisper_ignores_noise_and_tiny_input(stt):
    assert await stt.transcribe(audio.noise(2.0, -50), final=True) == ""
    assert await stt.transcribe(audio.silence(0.05), final=True) == ""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_interims_run_when_idle_and_are_refused_when_busy(stt, pool, piper_speech):
    pcm = on_noisy_line(piper_speech, -50)[: 3 * audio.BYTES_PER_SECOND]
    assert "quick brown fox" in (await stt.transcribe(pcm, final=False)).lower()
    finals = [stt.transcribe(pcm, final=True) for _ in range(pool.size)]
    with pytest.raises(EngineBusy):
        await stt.transcribe(pcm, final=False)
    for text in await defer.gatherResults(finals):
        assert "quick brown fox" in text.lower()


@pytest.mark.slow
def test_piper_output_is_16khz(tts, piper_speech):
    raw = b"".join(c.audio_int16_bytes for c in tts.voice.synthesize(PIPER_TEXT, tts.syn_config))
    assert tts.sample_rate == 22050
    assert len(piper_speech) % 2 == 0 and audio.rms_dbfs(piper_speech) > -30
    assert len(piper_speech) // 2 == pytest.approx(len(raw) // 2 * 16000 / 22050, abs=2)


async def collect(tts, text: str) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(text)]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_piper_streams_one_chunk_per_piece(tts):
    assert ITextToSpeech.providedBy(tts)
    chunks = await collect(tts, "Hello there. This is the second sentence. And a third one!")
    assert len(chunks) == 3
    assert all(len(c) > audio.BYTES_PER_SECOND // 5 and len(c) % 2 == 0 for c in chunks)
    assert await collect(tts, "") == []


@pytest.mark.slow
@needs_espeak
@pytest_twisted.ensureDeferred
async def test_espeak_streams_16khz_chunks(espeak_tts):
    assert ITextToSpeech.providedBy(espeak_tts)
    chunks = await collect(espeak_tts, "Hello there. This is the second sentence.")
    assert len(chunks) == 2
    # espeak-ng at 160 words/min says "Hello there." in roughly a second
    assert 0.5 < audio.duration(chunks[0]) < 2.0


class CountingPool:
    """Passes work to the real pool, counting the jobs."""

    def __init__(self, pool):
        self._pool = pool
        self.jobs: list[tuple] = []
        self._waiting: dict[int, defer.Deferred] = {}

    def submitted(self, n: int) -> defer.Deferred:
        """Fires once the n-th job has been handed to the pool."""
        return self._waiting.setdefault(n, defer.Deferred())

    def run(self, fn, *args, interim=False):
        self.jobs.append(args)
        d = self._pool.run(fn, *args, interim=interim)
        if len(self.jobs) in self._waiting:
            self._waiting.pop(len(self.jobs)).callback(None)
        return d


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_cancelling_the_consumer_stops_synthesis(tts, pool):
    from twisted.internet import reactor

    counting = CountingPool(pool)
    engine = piper.PiperTextToSpeech(tts.voice, tts.syn_config, EngineContext(pool=counting, clock=reactor))
    text = " ".join(f"This is sentence number {n} of a long reply." for n in range(1, 7))
    chunks = []

    async def consume():
        async for chunk in engine.synthesize(text):
            chunks.append(chunk)

    second = counting.submitted(2)
    d = defer.Deferred.fromCoroutine(consume())
    await second
    await task.deferLater(reactor, 0, lambda: None)  # let consume() reach its await
    # the first piece is played and the consumer asked for the second:
    # cancel while its job is in flight (hang-up in the middle of a reply)
    assert len(chunks) == 1 and pool.active == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await task.deferLater(reactor, 0.5, lambda: None)
    assert len(counting.jobs) == 2
    assert len(chunks) == 1
    assert pool.queued == 0


@pytest.mark.slow
def test_silero_model_layout():
    session = silero.factory.build(silero.SileroSettings(), _context()).session
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs["input"][1] == silero.CONTEXT + silero.WINDOW == 576
    assert inputs["h"] == inputs["c"] == [1, 1, 128]
    assert [o.name for o in session.get_outputs()][1:] == ["hn", "cn"]


@pytest.fixture(scope="module", params=["silero", "webrtc"])
def vad(request):
    f = get_factory("vad", request.param)
    built = f.build(f.parse_options({}, "."), _context())
    assert IVoiceActivityDetectorFactory.providedBy(built)
    return built


@pytest.mark.slow
@pytest.mark.parametrize("level", [-50, -35])
@pytest.mark.parametrize("voice", ["piper", "espeak"])
def test_vad_finds_the_speech(vad, voice, level, request):
    speech = request.getfixturevalue(f"{voice}_speech")
    start, end = speech_span(speech)
    detector = vad.new_detector()
    assert IVoiceActivityDetector.providedBy(detector) and detector.frame_bytes == 640
    flags = decisions(detector, on_noisy_line(speech, level))
    hits = [i * 0.02 for i, f in enumerate(flags) if f]
    assert hits, "no speech found"
    assert start - 0.1 <= hits[0] <= start + 0.3
    assert end - 0.5 <= hits[-1] <= end + 0.5
    # most of the span is speech (pauses between words are not)
    assert len(hits) * 0.02 > 0.6 * (end - start)


@pytest.mark.slow
@pytest.mark.parametrize("level", [-50, -35])
def test_vad_ignores_noise(vad, level):
    flags = decisions(vad.new_detector(), audio.noise(5.0, level, seed=7))
    assert sum(flags) <= 0.01 * len(flags)


@pytest.mark.slow
def test_vad_detectors_are_independent(vad, piper_speech):
    speech = on_noisy_line(piper_speech, -50)
    noise = audio.noise(audio.duration(speech), -35, seed=3)
    alone = decisions(vad.new_detector(), speech)
    a, b = vad.new_detector(), vad.new_detector()
    n = len(speech) // 640
    interleaved = []
    for i in range(n):
        interleaved.append(a.is_speech(speech[i * 640:(i + 1) * 640]))
        b.is_speech(noise[i * 640:(i + 1) * 640])
    assert interleaved == alone
    a.reset()
    assert decisions(a, speech) == alone


# ---- one definition of the STT language option (whisper and openai) --------------------

_STT_BASE = {"whisper": {}, "openai": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}


@pytest.mark.parametrize("name", sorted(_STT_BASE))
@pytest.mark.parametrize("text, language", [(None, "en"), ("auto", None), ("AUTO", None), (" DE ", "de"), ("fra", "fra")])
def test_stt_language_is_the_same_option_for_every_stt_engine(name, text, language):
    options = dict(_STT_BASE[name], **({} if text is None else {"language": text}))
    assert get_factory("stt", name).parse_options(options, ".").language == language


@pytest.mark.parametrize("name", sorted(_STT_BASE))
@pytest.mark.parametrize("text", ["English please", "e", "engl", "e1", ""])
def test_stt_language_is_refused_alike(name, text):
    with pytest.raises(EngineOptionError) as e:
        get_factory("stt", name).parse_options(dict(_STT_BASE[name], language=text), ".")
    assert e.value.option == "language"
    assert e.value.message == f"expected a language code like 'en' or 'auto', got {text!r}"


@pytest.mark.parametrize("module,options,option", [
    (silero, {"threshold": "nan"}, "threshold"),
    (piper, {"length_scale": "inf"}, "length_scale"),
    (piper, {"noise_scale": "nan"}, "noise_scale"),
    (whisper, {"beam_size": "9" * 5000}, "beam_size"),
    (webrtc, {"aggressiveness": "1.5"}, "aggressiveness"),
])
def test_numbers_are_finite_and_short(module, options, option):
    with pytest.raises(EngineOptionError) as e:
        module.factory.parse_options(options, ".")
    assert e.value.option == option and len(e.value.message) < 120
