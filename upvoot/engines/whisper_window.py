"""Short-window Whisper decoding: encode a window fit for the clip, not 30 s.

faster-whisper pads every input to Whisper's 30 s window, so a 2 s question
costs as much to encode as a 30 s one. CTranslate2's Whisper (the engine
under faster-whisper, ``WhisperModel.model``) accepts shorter inputs: here
the log-mel features of the clip (faster-whisper's own ``FeatureExtractor``)
are padded with zero features (what faster-whisper pads with, only less
of it): ``PAD_SECONDS`` after the clip, and up to ``MIN_WINDOW_SECONDS`` in
all; then decoded directly with the prompt faster-whisper builds (``<|startoftranscript|>``, the language and task tokens of a
multilingual model, ``<|notimestamps|>``).

Whisper was trained on 30 s windows and a short one can make it loop or
invent words, so every result passes guards; a result that fails one is
decoded again the padded way (``WhisperSpeechToText`` does that):

- a token cap from the duration (``TOKENS_PER_SECOND`` x seconds +
  ``TOKENS_EXTRA``; reaching it means the decoder did not stop by itself);
- ``no_repeat_ngram_size`` in the decoder (the same n tokens never twice);
- Whisper's own quality checks: gzip compression ratio above 2.4 (too
  repetitive), average log-probability below -1.0 (unsure);
- a repeated-words check (words said twice in a row, or the same 4 words
  twice), which catches the short loops the compression ratio is blind to;
- no words at all (silence or noise: the padded decode has the last word).

This module is pure computation on the caller's thread (the worker pool);
it never imports the call, daemon, framing, ledger or dial packages.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import attrs
import numpy as np

#: Zero features appended after the clip (the decoder needs to see the end).
PAD_SECONDS = 0.5
#: The shortest window. In a window of a second or two Whisper loops ("yes
#: yes yes", "Front Center. Front Center."): bench/wer.py measured 30 % of
#: clips falling back with no minimum, 13 % at 5 s, 3 % at 8 and 10 s, where
#: the word error was lowest too. The encoder's cost grows with the window,
#: but 10 s is a third of the 30 s one and a fallback costs both.
MIN_WINDOW_SECONDS = 10.0
#: A final whose short window fails a guard is decoded once more in a window
#: of at least this much before the padded one: on 8 kHz phone audio the
#: 10 s window's average log-probability falls under the limit now and then
#: ("two nine three four zero": -1.13) where 15 s passes it (-0.87, the same
#: words), for 316 ms against the padded decode's 1.0-1.2 s (its temperature
#: ladder) on 2 cores.
WIDE_WINDOW_SECONDS = 15.0
#: The longest clip decoded in a short window; longer ones take the padded path.
MAX_SECONDS = 29.0
#: Token cap: a fast talker says ~3 words (4-5 tokens) a second.
TOKENS_PER_SECOND = 6.0
TOKENS_EXTRA = 8
#: Whisper's own thresholds (faster-whisper's defaults).
COMPRESSION_RATIO_MAX = 2.4
AVG_LOGPROB_MIN = -1.0
#: Decoder guard: no 5 tokens are ever generated twice (a loop is cut short;
#: the same word error as without it on bench/wer.py's clips).
NO_REPEAT_NGRAM_SIZE = 5
#: Repeated-words check: an n-gram of this many words twice is a loop (and
#: so is any run of words said twice in a row).
REPEAT_NGRAM_WORDS = 4

FRAMES_PER_SECOND = 100  # Whisper's 10 ms hop
_WORD = re.compile(r"[a-z0-9']+")


@attrs.frozen
class WindowResult:
    """One short-window decode and its checks; ``bad`` names the failed
    guard (``None``: the text can be used)."""

    text: str
    tokens: int
    cap: int
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    bad: str | None


def token_cap(seconds: float) -> int:
    return int(TOKENS_PER_SECOND * seconds + TOKENS_EXTRA)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_words(text: str) -> bool:
    """True when ``text`` repeats itself the way a looping decoder does:
    words said again at once ("yes yes", "thank you thank you", "hello.
    hello."), or the same ``REPEAT_NGRAM_WORDS`` words twice anywhere.
    People do say "bye bye": that costs a padded decode, never a word."""
    w = words_of(text)
    for unit in range(1, len(w) // 2 + 1):
        for i in range(len(w) - 2 * unit + 1):
            if w[i : i + unit] == w[i + unit : i + 2 * unit]:
                return True
    n = REPEAT_NGRAM_WORDS
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) < len(grams)


def judge(text: str, tokens: int, cap: int, avg_logprob: float) -> str | None:
    """The name of the first guard ``text`` fails, or ``None``."""
    if not words_of(text):
        return "empty"  # silence, noise, or a window too short to read: ask the padded decode
    if tokens >= cap:
        return "token_cap"
    if compression_ratio(text) > COMPRESSION_RATIO_MAX:
        return "compression_ratio"
    if avg_logprob < AVG_LOGPROB_MIN:
        return "avg_logprob"
    if repeated_words(text):
        return "repeated_words"
    return None


class ShortWindowDecoder:
    """Decodes a clip of up to ``MAX_SECONDS`` in a window of its own length.

    ``model`` is a loaded ``faster_whisper.WhisperModel``; its CTranslate2
    model, tokenizer and feature extractor are shared (all thread-safe:
    the feature extractor is only called without ``chunk_length``, which
    would change it)."""

    def __init__(
        self,
        model: Any,
        language: str | None,
        beam_size: int,
        min_window: float = MIN_WINDOW_SECONDS,
        pad: float = PAD_SECONDS,
        no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
    ) -> None:
        from faster_whisper.transcribe import get_suppressed_tokens

        self.model = model
        self.beam_size = beam_size
        self.min_window = min_window
        self.pad = pad
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self._multilingual = model.model.is_multilingual
        if language is None and not self._multilingual:
            language = "en"
        self._language = language
        self._tokenizers: dict[str, Any] = {}
        tok = self._tokenizer(language or "en")
        self._suppress = list(get_suppressed_tokens(tok, [-1]))

    def _tokenizer(self, language: str):
        tok = self._tokenizers.get(language)
        if tok is None:
            from faster_whisper.tokenizer import Tokenizer

            tok = Tokenizer(self.model.hf_tokenizer, self._multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tok
        return tok

    def features(self, audio: np.ndarray) -> np.ndarray:
        """[1, n_mels, frames]: the clip's log-mel features plus the pad
        (an even number of frames: the encoder's convolution halves it)."""
        feats = self.model.feature_extractor(audio)
        frames = max(feats.shape[-1] + int(self.pad * FRAMES_PER_SECOND), int(self.min_window * FRAMES_PER_SECOND))
        frames += frames % 2
        feats = np.pad(feats, ((0, 0), (0, frames - feats.shape[-1])))
        return np.ascontiguousarray(feats[None], dtype=np.float32)

    def decode(self, audio: np.ndarray) -> WindowResult:
        """Blocking; ``audio`` is float32 at 16 kHz, at most ``MAX_SECONDS``."""
        import ctranslate2

        seconds = audio.size / 16000
        if seconds > MAX_SECONDS:
            raise ValueError(f"a short window holds at most {MAX_SECONDS} s, got {seconds:.1f} s")
        ct2 = self.model.model
        feats = ctranslate2.StorageView.from_array(self.features(audio))
        language = self._language
        if language is None:  # auto: ask the encoder, as faster-whisper does
            feats = ct2.encode(feats)
            language = ct2.detect_language(feats)[0][0][0][2:-2]
        tok = self._tokenizer(language)
        prompt = self.model.get_prompt(tok, [], without_timestamps=True)
        cap = token_cap(seconds)
        result = ct2.generate(
            feats,
            [prompt],
            beam_size=self.beam_size,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            # CTranslate2 4.x generates at most max_length // 2 tokens; ask
            # for room past the cap so reaching the cap is seen by judge()
            max_length=min(len(prompt) + 2 * cap + 2, self.model.max_length),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppress,
        )[0]
        ids = result.sequences_ids[0]
        # as faster-whisper: the score is the cumulative log-prob over the
        # length (length_penalty 1); the average counts the end token too
        avg_logprob = result.scores[0] * len(ids) / (len(ids) + 1)
        text = tok.decode(ids).strip()
        return WindowResult(
            text=text,
            tokens=len(ids),
            cap=cap,
            avg_logprob=avg_logprob,
            compression_ratio=compression_ratio(text),
            no_speech_prob=result.no_speech_prob,
            bad=judge(text, len(ids), cap, avg_logprob),
        )


__all__ = ["ShortWindowDecoder", "WindowResult", "judge", "repeated_words", "token_cap"]
