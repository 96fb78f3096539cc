"""Text-to-speech with the espeak-ng command: robotic, tiny, no model files.

Useful where piper's 100 MB is too much, for tests, and as a second voice.
Needs the Debian/Ubuntu ``espeak-ng`` package (piper's bundled espeak data
does not provide the command).

Each sentence is one ``espeak-ng --stdout`` process run on the worker pool
(text goes in on stdin, so text starting with ``-`` is never an option);
its 22,050 Hz WAV is resampled to 16 kHz. As with piper, cancelling the
consumer stops the sentences not yet started.

Options (``tts.*`` in an agent section):
- ``voice`` (default ``en-us``): an espeak-ng voice (``espeak-ng --voices``).
- ``rate`` (default 160): words per minute, 80-450.
- ``executable`` (default ``espeak-ng``): command name or path.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from typing import AsyncIterator, Mapping

import attrs
from zope.interface import implementer

from upvoot.audio import RATE, resample
from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    EngineUnavailable,
    IEngineFactory,
    ITextToSpeech,
)
from upvoot.engines.options import parse_int, reject_unknown
from upvoot.engines.sentences import split_sentences

#: A hung synthesizer must not hold a worker thread forever.
TIMEOUT_SECONDS = 30.0


@attrs.frozen
class EspeakSettings:
    voice: str = "en-us"
    rate: int = 160
    executable: str = "espeak-ng"


class EspeakError(RuntimeError):
    pass


def parse_wav(data: bytes) -> tuple[int, bytes]:
    """(sample rate, s16le mono samples) of espeak-ng's streamed WAV.

    Its header's size fields are placeholders (it writes to a pipe), so the
    data chunk is taken as everything after its header."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise EspeakError("espeak-ng did not write a WAV file")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
            if fmt != 1 or channels != 1 or bits != 16:
                raise EspeakError(f"unexpected WAV format from espeak-ng ({channels} ch, {bits} bit)")
        elif cid == b"data":
            if rate is None:
                raise EspeakError("WAV data before format")
            pcm = data[body:]
            return rate, pcm[: len(pcm) // 2 * 2]
        pos = body + size + (size & 1)
    raise EspeakError("no audio in espeak-ng output")


@implementer(ITextToSpeech)
class EspeakTextToSpeech:
    """Streams 16 kHz s16le speech, one espeak-ng process per sentence."""

    def __init__(self, executable: str, settings: EspeakSettings, context: EngineContext) -> None:
        self.executable = executable
        self.settings = settings
        self._pool = context.pool

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        for piece in split_sentences(text):
            pcm = await self._pool.run(self.synthesize_sync, piece)
            if pcm:
                yield pcm

    def synthesize_sync(self, text: str) -> bytes:
        """Blocking: run espeak-ng for one piece of text (on a worker)."""
        s = self.settings
        proc = subprocess.run(
            [self.executable, "--stdout", "--stdin", "-v", s.voice, "-s", str(s.rate)],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()
            raise EspeakError(f"espeak-ng failed (exit {proc.returncode}): {err}")
        rate, pcm = parse_wav(proc.stdout)
        return resample(pcm, rate, RATE)


@implementer(IEngineFactory)
class EspeakFactory:
    kind = "tts"
    name = "espeak"

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> EspeakSettings:
        reject_unknown(options, {"voice", "rate", "executable"})
        s = EspeakSettings()
        if "voice" in options:
            voice = options["voice"].strip()
            if not re.fullmatch(r"[A-Za-z0-9_+\-/.]+", voice) or voice.startswith("-"):
                raise EngineOptionError("voice", f"not a voice name: {options['voice']!r}")
            s = attrs.evolve(s, voice=voice)
        if "rate" in options:
            s = attrs.evolve(s, rate=parse_int(options, "rate", 80, 450))
        if "executable" in options:
            exe = options["executable"].strip()
            if not exe:
                raise EngineOptionError("executable", "must not be empty")
            s = attrs.evolve(s, executable=exe)
        return s

    def build(self, settings: EspeakSettings, context: EngineContext) -> EspeakTextToSpeech:
        exe = shutil.which(settings.executable)
        if exe is None:
            raise EngineUnavailable(
                f"{settings.executable} not found: install the espeak-ng package "
                "(apt-get install espeak-ng) or set tts.executable"
            )
        engine = EspeakTextToSpeech(exe, settings, context)
        try:
            engine.synthesize_sync("ok")  # checks the voice exists, at start-up
        except (OSError, subprocess.SubprocessError, EspeakError) as e:
            raise EngineUnavailable(f"espeak-ng cannot speak with voice {settings.voice!r}: {e}") from None
        return engine


factory = EspeakFactory()

__all__ = ["factory", "EspeakSettings", "EspeakTextToSpeech"]
