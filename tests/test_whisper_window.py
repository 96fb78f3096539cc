"""Short-window Whisper (``upvoot.engines.whisper_window``) and its guards.

The guards' rules are checked without a model; the slow tests load tiny.en
once: a sentence is heard right in a short window, clips that make a short
window loop or invent words are caught and decoded the padded way, and on a
few clips (synthetic and recorded, clean and phone band) the short path's
word errors are no more than the padded decode's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import pytest_twisted

from upvoot import audio
from upvoot.engines import espeak, piper, whisper
from upvoot.engines.interfaces import EngineContext, EngineOptionError, ISpeechToText
from upvoot.engines.whisper_window import judge, repeated_words, token_cap
from upvoot.framing.g711 import ulaw_decode, ulaw_encode
from upvoot.daemon.workers import WorkerPool

SPEECH = Path(__file__).resolve().parent.parent.parent / "shared" / "speech"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def edits(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def phone_band(pcm: bytes) -> bytes:
    narrow = audio.resample(pcm, audio.RATE, 8000)
    return audio.resample(ulaw_decode(ulaw_encode(narrow)).astype("<i2").tobytes(), 8000, audio.RATE)


# ---------------------------------------------------------------------------
# the guards (no model)

def test_repeated_words():
    assert repeated_words("yes yes yes yes")
    assert repeated_words("Thank you. Thank you. Thank")
    assert repeated_words("Hello. Hello.")
    assert repeated_words("What time do you open tomorrow? What time do you open")
    assert repeated_words("I want to go there, and I want to go home")  # the same 4 words twice
    assert not repeated_words("I would like to book a table for four people on Friday evening, please.")
    assert not repeated_words("Yes.")
    assert not repeated_words("two nine three four zero")


def test_judge_names_the_failed_guard():
    assert judge("What time do you open tomorrow?", 7, token_cap(1.5), -0.2) is None
    assert judge("", 0, token_cap(1.0), -0.1) == "empty"
    assert judge("...", 1, token_cap(1.0), -0.1) == "empty"
    assert judge("one two three four", token_cap(0.5), token_cap(0.5), -0.1) == "token_cap"
    assert judge("la " * 60, 30, 200, -0.1) == "compression_ratio"
    assert judge("I'm gonna get it.", 6, 14, -2.2) == "avg_logprob"
    assert judge("no no no", 3, 14, -0.3) == "repeated_words"


def test_token_cap_grows_with_the_clip():
    assert token_cap(0.5) < token_cap(2.0) < token_cap(10.0)
    assert token_cap(10.0) < 224  # below what one decode may generate


def test_window_option():
    assert whisper.factory.parse_options({}, ".").window == "short"
    assert whisper.factory.parse_options({"window": "padded"}, ".").window == "padded"
    with pytest.raises(EngineOptionError) as e:
        whisper.factory.parse_options({"window": "30s"}, ".")
    assert e.value.option == "window"


# ---------------------------------------------------------------------------
# the real model (slow)

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
def say(context):
    tts = piper.factory.build(piper.factory.parse_options({"noise_scale": "0", "noise_w_scale": "0"}, "."), context)
    return lambda text: audio.silence(0.2) + tts.synthesize_sync(text) + audio.silence(0.3)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_short_window_hears_a_sentence(stt, say):
    text = "I would like to book a table for four people on Friday evening, please."
    pcm = say(text)
    result = stt.short_window.decode(audio.to_float32(pcm))
    assert result.bad is None, result
    assert words(result.text) == words(text)
    assert stt.decode_sync(pcm).path == "short"
    # through the interface, on the worker pool, as the call uses it
    assert ISpeechToText.providedBy(stt)
    assert words(await stt.transcribe(pcm, final=True)) == words(text)


@pytest.mark.slow
@pytest.mark.parametrize("clip,then", [("syllables", "fallback"), ("noise", "fallback"),
                                       ("a word in silence", "wide")])
def test_a_clip_that_fools_a_short_window_is_decoded_again(stt, say, clip, then):
    pcm, heard = {
        # repeated syllables: a short window writes "Blah, blah, blah, blah."
        "syllables": lambda: (say("la la la la la la la la"), None),
        # a line's loud hiss: a short window hears "You", unsure of it
        "noise": lambda: (audio.noise(1.0, -15, seed=3), []),
        # a word between 3 s silences: a short window hears it twice
        "a word in silence": lambda: (audio.silence(3.0) + say("Hello.") + audio.silence(3.0), ["hello"]),
    }[clip]()
    short = stt.short_window.decode(audio.to_float32(pcm))
    assert short.bad is not None, short
    decoded = stt.decode_sync(pcm)
    # once more in the 15 s window; if that fails a guard too, the padded way
    assert decoded.path == then and decoded.reason == short.bad
    wide = stt.wide_window.decode(audio.to_float32(pcm))
    assert (wide.bad is None) == (then == "wide"), wide
    if heard is not None:  # (the padded decode of the syllables samples at a temperature: it varies)
        assert words(decoded.text) == heard
    # an interim is only a preview: no padded decode for it, no text either
    padded_before = stt.counts["padded"] + stt.counts["fallback"] + stt.counts["wide"]
    assert stt.interim_sync(pcm) == ""
    assert stt.counts["padded"] + stt.counts["fallback"] + stt.counts["wide"] == padded_before
    assert stt.counts["interim_dropped:" + short.bad] >= 1


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_interim_is_the_short_window_text(stt, say):
    text = "What time do you open tomorrow?"
    assert words(await stt.transcribe(say(text), final=False)) == words(text)


def _spot_clips(say):
    texts = ("What time do you open tomorrow?", "No, thanks.")
    clips = [(t, say(t)) for t in texts]
    clips.append((texts[0], phone_band(clips[0][1])))
    if shutil.which("espeak-ng"):
        tts = espeak.factory.build(espeak.factory.parse_options({}, "."), EngineContext(pool=None, clock=None))
        t = "Please send me the details by email."
        clips.append((t, audio.silence(0.2) + tts.synthesize_sync(t) + audio.silence(0.3)))
    manifest = SPEECH / "manifest.json"
    if manifest.exists():
        for u in json.loads(manifest.read_text())["utterances"]:
            if u["id"] == "ps_librivox_0880":
                clips.append((u["text"], audio.read_wav(str(SPEECH / u["files"]["phone"]))))
    return clips


@pytest.mark.slow
def test_word_errors_are_no_worse_than_padded(stt, say):
    short_errors = padded_errors = 0
    for ref, pcm in _spot_clips(say):
        ref_words = words(ref)
        short_errors += edits(ref_words, words(stt.decode_sync(pcm).text))
        padded_errors += edits(ref_words, words(stt.padded_sync(pcm)))
    assert short_errors <= padded_errors
