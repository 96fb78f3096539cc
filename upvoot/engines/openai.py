"""What the OpenAI-compatible engines share: options, the API key, the HTTP
client, reading a response body piece by piece, and the error they raise.

The engines themselves are in ``openai_llm`` (``brain = openai``, Chat
Completions streamed as server-sent events) and ``openai_speech``
(``stt = openai``, ``tts = openai``). They speak to any server with the
OpenAI wire format: OpenAI itself, or a local llama.cpp server, vLLM,
Ollama, LocalAI, speaches...

HTTP goes through treq on the reactor, with TLS verification (treq's
default). Connections are pooled per engine so a turn does not pay for a
new TLS handshake. The request timeouts run on the engine context's clock;
cancelling the coroutine that awaits a response (barge-in, hang-up) closes
the connection, so the server stops generating.

The key is read once, at build time, from the environment variable named
by ``api_key_env`` or the file named by ``api_key_file`` (relative to the
state directory). It is sent as ``Authorization: Bearer KEY`` and never
logged. Neither option: no Authorization header (a local server).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from upvoot.engines.interfaces import EngineContext, EngineOptionError, EngineUnavailable
from upvoot.engines.options import parse_path

#: Options every OpenAI-compatible engine takes.
COMMON_OPTIONS = {"base_url", "model", "api_key_env", "api_key_file"}

#: Idle pooled connections are closed before servers usually drop them
#: (a POST on a connection the server has just dropped is not retried).
IDLE_CONNECTION_SECONDS = 50.0

#: How much of an error body goes into a message.
ERROR_EXCERPT = 200

_log = Logger(namespace="upvoot.engines.openai")


class OpenAIError(RuntimeError):
    """A request to an OpenAI-compatible endpoint failed.

    ``status`` is the HTTP status (None when there was no response) and
    ``elapsed`` the seconds since the request was sent."""

    def __init__(self, engine: str, message: str, status: int | None = None, elapsed: float = 0.0) -> None:
        self.engine = engine
        self.status = status
        self.elapsed = elapsed
        self.reason = message
        where = f"HTTP {status}" if status is not None else "no HTTP status"
        super().__init__(f"{engine}: {message} ({where}, after {elapsed:.3f}s)")


@attrs.frozen
class Endpoint:
    """Where and how to reach the server (hashable: engines are shared by settings)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    api_key_file: str | None = None


def parse_endpoint(options: Mapping[str, str], base_dir: str) -> Endpoint:
    for required in ("base_url", "model"):
        if not options.get(required, "").strip():
            raise EngineOptionError(required, "is required")
    base_url = options["base_url"].strip().rstrip("/")
    if not base_url.startswith(("https://", "http://")):
        raise EngineOptionError("base_url", f"expected an http:// or https:// URL, got {base_url!r}")
    env = options.get("api_key_env", "").strip() or None
    path = None
    if options.get("api_key_file", "").strip():
        if env:
            raise EngineOptionError("api_key_file", "give api_key_env or api_key_file, not both")
        path = parse_path(options, "api_key_file", base_dir, must_exist=False)
    return Endpoint(base_url, options["model"].strip(), env, path)


def read_key(engine: str, endpoint: Endpoint) -> str | None:
    """The API key, read at build time. Raises ``EngineUnavailable``."""
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env, "").strip()
        if not key:
            raise EngineUnavailable(f"{engine}: environment variable {endpoint.api_key_env} (api_key_env) is not set or empty")
        _log.info("{engine}: API key from environment variable {env}", event="engine.api_key", engine=engine, env=endpoint.api_key_env)
        return key
    if endpoint.api_key_file:
        try:
            with open(endpoint.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise EngineUnavailable(f"{engine}: cannot read api_key_file {endpoint.api_key_file}: {e.strerror}") from None
        if not key:
            raise EngineUnavailable(f"{engine}: api_key_file {endpoint.api_key_file} is empty")
        _log.info("{engine}: API key from file {path}", event="engine.api_key", engine=engine, path=endpoint.api_key_file)
        return key
    _log.info("{engine}: no API key configured", event="engine.api_key", engine=engine)
    return None


def reactor_of(context: EngineContext) -> Any:
    """The reactor to connect with: the context's clock when it is one
    (the daemon passes its reactor), else the global reactor."""
    if IReactorTCP.providedBy(context.clock):
        return context.clock
    from twisted.internet import reactor

    return reactor


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (treq's default
    producer goes through a cooperator, one reactor turn per 64 KiB)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HTTP:
    """One engine's HTTP client: a treq client over its own connection pool."""

    def __init__(self, reactor: Any, key: str | None, persistent: bool = True) -> None:
        from treq.client import HTTPClient

        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        self.client = HTTPClient(Agent(reactor, pool=self.pool), data_to_body_producer=BytesProducer)
        self._key = key

    def headers(self, accept: str) -> dict[str, str]:
        h = {"Accept": accept, "User-Agent": "upvoot"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def post_json(self, url: str, body: dict, accept: str) -> defer.Deferred:
        return self.client.post(url, json=body, headers=self.headers(accept), unbuffered=True, allow_redirects=False)

    def post_body(self, url: str, body: bytes, content_type: str, accept: str) -> defer.Deferred:
        headers = self.headers(accept)
        headers["Content-Type"] = content_type
        return self.client.post(url, data=body, headers=headers, unbuffered=True, allow_redirects=False)

    def close(self) -> defer.Deferred:
        """Close idle pooled connections (tests; service stop)."""
        return self.pool.closeCachedConnections()


class BodyStream(Protocol):
    """A response body, read one chunk at a time by one awaiting coroutine.

    ``next()`` fires with the next chunk, or ``b""`` at the end of the body;
    it fails with ``ResponseFailed`` if the connection broke. Cancelling its
    Deferred (a timeout, a cancelled consumer) closes the connection, so the
    server sees the request end and stops working on it. The transport is
    paused while more than ``high_water`` bytes wait unread."""

    def __init__(self, high_water: int = 1 << 20) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiting: defer.Deferred | None = None
        self._reason: Failure | None = None
        self.high_water = high_water
        self.aborted = False

    @classmethod
    def of(cls, response: Any, **kw: Any) -> "BodyStream":
        stream = cls(**kw)
        response.deliverBody(stream)
        return stream

    # --- the protocol side
    def dataReceived(self, data: bytes) -> None:
        if self.aborted:
            return
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self.high_water and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._reason = reason
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            self._fire_end(d)

    # --- the reader side
    @property
    def done(self) -> bool:
        return self._reason is not None and not self._chunks

    def next(self) -> defer.Deferred:
        if self._chunks:
            data = self._chunks.popleft()
            self._buffered -= len(data)
            if self._paused and self._buffered <= self.high_water // 2:
                self._paused = False
                self.transport.resumeProducing()
            return defer.succeed(data)
        d = defer.Deferred(lambda _d: self.abort())
        if self._reason is not None:
            self._fire_end(d)
        else:
            self._waiting = d
        return d

    def _fire_end(self, d: defer.Deferred) -> None:
        reason = self._reason
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            d.callback(b"")
        else:
            d.errback(reason)

    def abort(self) -> None:
        """Stop reading and close the connection (idempotent)."""
        if self._reason is None and not self.aborted and self.transport is not None:
            self.aborted = True
            self.transport.stopProducing()
        self.aborted = True
        self._chunks.clear()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(defer.CancelledError())


async def within(d: defer.Deferred, clock: Any, seconds: float) -> Any:
    """Await ``d``, cancelling it after ``seconds`` on ``clock``
    (``defer.TimeoutError``). No timer outlives the await."""
    expired = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    timer = clock.callLater(max(0.0, seconds), expire)
    try:
        return await d
    except Exception:
        # a cancelled request may fail with its own error (ResponseNeverReceived,
        # ConnectingCancelledError), not CancelledError: the timer says what happened
        if expired:
            raise defer.TimeoutError(f"timed out after {seconds:.3f}s") from None
        raise
    finally:
        if timer.active():
            timer.cancel()


async def open_response(http: HTTP, send: Any, engine: str, clock: Any, started: float, seconds: float) -> Any:
    """Send a request (``send()`` returns treq's Deferred) and await the
    response head within ``seconds``; a 2xx response is returned, anything
    else raises ``OpenAIError`` with the status and the server's message.
    A request that died before any response on a reused connection is sent
    once more."""
    for attempt in (1, 2):
        remaining = started + seconds - clock.seconds()
        try:
            response = await within(send(), clock, remaining)
        except defer.TimeoutError:
            raise OpenAIError(engine, f"no response within {seconds:g}s", None, clock.seconds() - started) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            if attempt == 1 and is_stale_connection(e):
                _log.info("{engine}: connection dropped before a response, sending again", event="engine.request_retry", engine=engine)
                continue
            raise OpenAIError(engine, f"request failed: {describe(e)}", None, clock.seconds() - started) from None
        break
    if 200 <= response.code < 300:
        return response
    stream = BodyStream.of(response)
    try:
        body = await within(defer.Deferred.fromCoroutine(read_all(stream, 1 << 16)),
                            clock, max(0.5, started + seconds - clock.seconds()))
        excerpt = error_excerpt(body) or response.phrase.decode("latin-1", errors="replace")
    except defer.CancelledError:
        raise
    except Exception:
        stream.abort()
        excerpt = response.phrase.decode("latin-1", errors="replace")
    raise OpenAIError(engine, f"server answered {response.code}: {excerpt}", response.code, clock.seconds() - started)


def log_failure(error: OpenAIError) -> None:
    """One warning per failed request: engine, status, elapsed time, reason."""
    _log.warn(
        "{engine} request failed: {reason} (status {status}, after {elapsed:.3f}s)",
        event="engine.request_failed", engine=error.engine, status=error.status,
        elapsed=error.elapsed, reason=error.reason,
    )


async def read_all(stream: BodyStream, limit: int = 1 << 24) -> bytes:
    """The rest of a body (bounded: a server cannot fill memory)."""
    parts = []
    total = 0
    while True:
        data = await stream.next()
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limit:
            stream.abort()
            raise ValueError(f"response body larger than {limit} bytes")
        parts.append(data)


def error_excerpt(body: bytes) -> str:
    """The server's own words from an error body: ``error.message`` of a
    JSON error, else the start of the text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
    text = " ".join(text.split())
    return text[:ERROR_EXCERPT] + ("..." if len(text) > ERROR_EXCERPT else "")


def is_stale_connection(exc: BaseException) -> bool:
    """The request died before any response: typically a pooled connection
    the server had just closed. Safe to send once more."""
    from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

    return isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed))


def describe(exc: BaseException) -> str:
    """A short text for a transport-level failure."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return f"{type(exc).__name__}: " + "; ".join(r.getErrorMessage() for r in reasons)
    return f"{type(exc).__name__}: {exc}"


__all__ = [
    "BodyStream", "BytesProducer", "COMMON_OPTIONS", "Endpoint", "HTTP", "OpenAIError", "describe",
    "error_excerpt", "is_stale_connection", "log_failure", "open_response", "parse_endpoint", "read_all", "read_key", "reactor_of", "within",
]
