"""``stt = openai`` and ``tts = openai``: speech engines on an
OpenAI-compatible server (OpenAI, speaches, LocalAI, a whisper.cpp server...).

Transcription: ``POST {base_url}/audio/transcriptions``, multipart form
with ``file`` (the utterance as a 16 kHz WAV), ``model``, ``language`` and
``response_format=json``; the answer is ``{"text": "..."}``. A remote
decode costs a round trip and usually money, so interim decodes are refused
at once with ``EngineBusy`` (the call shows no interim text) unless
``stt.interim = yes``.

Speech: ``POST {base_url}/audio/speech`` with ``{"model", "voice",
"input", "response_format": "pcm"}``; the body streams raw s16le mono at
``tts.sample_rate`` (OpenAI: 24000), resampled to 16 kHz as it arrives
(filter state carried across chunks) and yielded chunk by chunk, so the
caller hears the start of a sentence before the server has finished it.

Timeouts on the context's clock: ``stt.timeout`` bounds a whole
transcription; ``tts.timeout`` bounds the wait for the response and for
each further piece of audio (a stalled stream fails, a long one does not).
Failures raise ``OpenAIError`` (engine, status, elapsed) and are logged
once; cancelling the consumer closes the connection.

Options (``stt.*``): ``base_url``, ``model`` (required), ``language``
(``en``; ``auto`` leaves it to the server), ``api_key_env`` or
``api_key_file``, ``timeout`` (10s), ``interim`` (no).

Options (``tts.*``): ``base_url``, ``model`` (required), ``voice``
(``alloy``), ``sample_rate`` (24000), ``api_key_env`` or ``api_key_file``,
``timeout`` (10s).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Mapping

import attrs
from twisted.internet import defer
from zope.interface import implementer

from upvoot.audio import RATE, StreamResampler, duration, wav_bytes
from upvoot.engines.interfaces import (
    EngineBusy,
    EngineContext,
    EngineOptionError,
    IEngineFactory,
    ISpeechToText,
    ITextToSpeech,
)
from upvoot.engines.openai import (
    COMMON_OPTIONS,
    HTTP,
    BodyStream,
    Endpoint,
    OpenAIError,
    describe,
    log_failure,
    open_response,
    parse_endpoint,
    reactor_of,
    read_all,
    read_key,
    within,
)
from upvoot.engines.options import parse_bool, parse_int, parse_language, parse_seconds, reject_unknown

STT_ENGINE = "stt openai"
TTS_ENGINE = "tts openai"

#: Below this much audio there is nothing worth a round trip.
MIN_SECONDS = 0.1


def multipart(fields: Mapping[str, str], file_field: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its Content-Type header."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode("utf-8") + b"\r\n"
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    out += data + f"\r\n--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------ stt


@attrs.frozen
class OpenAISTTSettings:
    endpoint: Endpoint
    language: str | None = "en"  # None: the server detects it
    timeout: float = 10.0
    interim: bool = False


@implementer(ISpeechToText)
class OpenAISpeechToText:
    """Transcribes an utterance with one HTTP request."""

    def __init__(self, settings: OpenAISTTSettings, http: HTTP, clock: Any) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.url = settings.endpoint.base_url + "/audio/transcriptions"

    def transcribe(self, pcm: bytes, final: bool) -> defer.Deferred:
        if not final and not self.settings.interim:
            return defer.fail(EngineBusy(f"{STT_ENGINE}: interim decodes are off (stt.interim = no)"))
        if duration(pcm) < MIN_SECONDS:
            return defer.succeed("")
        return defer.Deferred.fromCoroutine(self._transcribe(pcm))

    async def _transcribe(self, pcm: bytes) -> str:
        s = self.settings
        clock = self.clock
        started = clock.seconds()
        fields = {"model": s.endpoint.model, "response_format": "json"}
        if s.language:
            fields["language"] = s.language
        body, content_type = multipart(fields, "file", "audio.wav", "audio/wav", wav_bytes(pcm))
        try:
            response = await open_response(
                self.http, lambda: self.http.post_body(self.url, body, content_type, "application/json"),
                STT_ENGINE, clock, started, s.timeout,
            )
            stream = BodyStream.of(response)
            try:
                raw = await within(defer.Deferred.fromCoroutine(read_all(stream, 1 << 20)), clock, started + s.timeout - clock.seconds())
            except defer.TimeoutError:
                raise OpenAIError(STT_ENGINE, f"no transcription within {s.timeout:g}s", response.code, clock.seconds() - started) from None
            except defer.CancelledError:
                raise
            except Exception as e:
                raise OpenAIError(STT_ENGINE, f"reading the answer failed ({describe(e)})", response.code, clock.seconds() - started) from None
            try:
                text = json.loads(raw)["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError) as e:
                raise OpenAIError(STT_ENGINE, f"malformed answer {raw[:80]!r} ({e})", response.code, clock.seconds() - started) from None
        except OpenAIError as e:
            log_failure(e)
            raise
        return text.strip()

    def close(self) -> defer.Deferred:
        return self.http.close()


@implementer(IEngineFactory)
class OpenAISTTFactory:
    kind = "stt"
    name = "openai"

    _KNOWN = COMMON_OPTIONS | {"language", "timeout", "interim"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> OpenAISTTSettings:
        reject_unknown(options, self._KNOWN)
        s = OpenAISTTSettings(parse_endpoint(options, base_dir))
        s = attrs.evolve(s, language=parse_language(options, "language", s.language))
        s = attrs.evolve(s, timeout=parse_seconds(options, "timeout", s.timeout))
        if "interim" in options:
            s = attrs.evolve(s, interim=parse_bool(options, "interim"))
        return s

    def build(self, settings: OpenAISTTSettings, context: EngineContext) -> OpenAISpeechToText:
        key = read_key(STT_ENGINE, settings.endpoint)
        return OpenAISpeechToText(settings, HTTP(reactor_of(context), key), context.clock)


stt_factory = OpenAISTTFactory()


# ------------------------------------------------------------------ tts


@attrs.frozen
class OpenAITTSSettings:
    endpoint: Endpoint
    voice: str = "alloy"
    sample_rate: int = 24000
    timeout: float = 10.0


@implementer(ITextToSpeech)
class OpenAITextToSpeech:
    """Streams 16 kHz s16le speech from one HTTP request per text."""

    def __init__(self, settings: OpenAITTSSettings, http: HTTP, clock: Any) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.url = settings.endpoint.base_url + "/audio/speech"

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        text = text.strip()
        if not text:
            return
        s = self.settings
        clock = self.clock
        started = clock.seconds()
        body = {"model": s.endpoint.model, "voice": s.voice, "input": text, "response_format": "pcm"}
        try:
            response = await open_response(
                self.http, lambda: self.http.post_json(self.url, body, "audio/pcm, */*"),
                TTS_ENGINE, clock, started, s.timeout,
            )
        except OpenAIError as e:
            log_failure(e)
            raise
        stream = BodyStream.of(response, high_water=1 << 20)
        resampler = StreamResampler(s.sample_rate, RATE)
        carry = b""
        complete = False

        def fail(message: str) -> OpenAIError:
            error = OpenAIError(TTS_ENGINE, message, response.code, clock.seconds() - started)
            log_failure(error)
            return error

        try:
            while True:
                try:
                    data = await within(stream.next(), clock, s.timeout)
                except defer.TimeoutError:
                    raise fail(f"audio stalled for {s.timeout:g}s") from None
                except defer.CancelledError:
                    raise
                except Exception as e:
                    raise fail(f"connection lost mid-stream ({describe(e)})") from None
                if not data:
                    complete = True
                    break
                data = carry + data
                cut = len(data) & ~1
                carry = data[cut:]
                out = resampler.feed(data[:cut])
                if out:
                    yield out
        finally:
            if not complete:
                stream.abort()
        tail = resampler.feed(b"", last=True)
        if tail:
            yield tail

    def close(self) -> defer.Deferred:
        return self.http.close()


@implementer(IEngineFactory)
class OpenAITTSFactory:
    kind = "tts"
    name = "openai"

    _KNOWN = COMMON_OPTIONS | {"voice", "sample_rate", "timeout"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> OpenAITTSSettings:
        reject_unknown(options, self._KNOWN)
        s = OpenAITTSSettings(parse_endpoint(options, base_dir))
        if "voice" in options:
            voice = options["voice"].strip()
            if not voice:
                raise EngineOptionError("voice", "empty voice name")
            s = attrs.evolve(s, voice=voice)
        if "sample_rate" in options:
            s = attrs.evolve(s, sample_rate=parse_int(options, "sample_rate", 8000, 48000))
        s = attrs.evolve(s, timeout=parse_seconds(options, "timeout", s.timeout))
        return s

    def build(self, settings: OpenAITTSSettings, context: EngineContext) -> OpenAITextToSpeech:
        key = read_key(TTS_ENGINE, settings.endpoint)
        return OpenAITextToSpeech(settings, HTTP(reactor_of(context), key), context.clock)


tts_factory = OpenAITTSFactory()

__all__ = [
    "OpenAISTTSettings", "OpenAISpeechToText", "OpenAITTSSettings", "OpenAITextToSpeech",
    "multipart", "stt_factory", "tts_factory",
]
