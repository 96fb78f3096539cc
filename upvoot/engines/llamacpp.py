"""``brain = llamacpp``: a GGUF chat model run in the daemon's own process
with llama-cpp-python, for operators who have an instruction-tuned GGUF and
no server to run it on.

The model is loaded once, at build time (in the start-up thread). Each turn
formats the same ``messages`` as ``brain = openai`` (``build_messages``: the
system prompt, then the last ``history_turns`` turns) and streams
``Llama.create_chat_completion(stream=True)``.

Threads: generation never runs on the reactor. It is advanced by jobs on
the shared worker pool (``context.pool``), each job pulling the next few
tokens (up to ``CHUNK_TOKENS``, or as many as came within
``CHUNK_SECONDS`` once there is one) and handing them back to the reactor,
where the reply coroutine reads them. The next job is queued as soon as one
returns, so generation does not stall while the call synthesizes speech;
what is waiting to be read is bounded by ``max_tokens``. No pool thread is
held while the call is busy elsewhere, and the pool's own limits (queue,
``EngineBusy``) apply to the brain like to speech.

One generation at a time per model: a llama.cpp context is not
thread-safe and holds one conversation's KV cache, so turns of different
calls that share the model take turns on a ``DeferredLock`` (a waiting turn
can be cancelled). The lock is released when the worker thread has really
left the model, not merely when the consumer went away.

Cancellation (barge-in, hang-up): cancelling the consuming coroutine sets a
stop flag that the job's token loop checks after every token, so generation
stops within one token (the prompt's evaluation, before the first token,
cannot be interrupted); the generator is closed and the lock released.

A prompt longer than ``n_ctx`` (llama-cpp-python refuses it) is retried with
the oldest turns dropped, down to the caller's last turn.

No ``end_call`` tool: tool calling in llama-cpp-python depends on the chat
format of each model. Calls end on the caller, the agent's limits or the
client's ``end_call``.

Options (``brain.*``): ``model`` (the .gguf file, required, relative to
state_dir), ``n_ctx`` (2048), ``threads`` (1: keep the sum of compute
threads at the number of cores), ``max_tokens`` (200), ``temperature``
(0.7), ``history_turns`` (20), ``chat_format`` (llama-cpp-python's name of
a chat format, e.g. ``chatml``; default: the template in the GGUF).

llama-cpp-python has no Linux wheel on PyPI and builds from source; see
``INSTALL_HINT`` (also in every error about it).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import time
from typing import Any, AsyncIterator, Mapping, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    EngineUnavailable,
    IEngineFactory,
    ILanguageModel,
    ReplyText,
    Turn,
)
from upvoot.engines.openai_llm import build_messages
from upvoot.engines.options import parse_float, parse_int, parse_path, reject_unknown

ENGINE = "brain llamacpp"

#: How to install llama-cpp-python portably (no AMX/native code paths, which
#: crash on some processors; no cached wheel built with other flags).
INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --no-cache-dir 'upvoot[llamacpp]'"
)

#: A pool job returns after this many tokens...
CHUNK_TOKENS = 8
#: ...or once it has at least one token and has run this long.
CHUNK_SECONDS = 0.05


@attrs.frozen
class LlamaCppSettings:
    model: str
    n_ctx: int = 2048
    threads: int = 1
    max_tokens: int = 200
    temperature: float = 0.7
    history_turns: int = 20
    chat_format: str | None = None


def installed() -> bool:
    """Whether llama-cpp-python is there (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _content(chunk: Any) -> str:
    """The text of one streamed chat chunk (``choices[0].delta.content``)."""
    try:
        choice = chunk["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    delta = choice.get("delta") or {}
    text = delta.get("content")
    return text if isinstance(text, str) else ""


def _context_overflow(error: BaseException) -> bool:
    return isinstance(error, ValueError) and "context window" in str(error)


def _trim(messages: list[dict]) -> list[dict] | None:
    """``messages`` without the oldest turn (and without a leading assistant
    turn after it: some templates insist that the user speaks first); None
    when only the last turn is left."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    if len(turns) <= 1:
        return None
    turns = turns[1:]
    while len(turns) > 1 and turns[0]["role"] != "user":
        turns = turns[1:]
    return head + turns


class _Generation:
    """One reply being generated. The reactor side (``next``, ``stop``,
    the job callbacks) runs on the reactor; ``chunks`` (llama-cpp-python's
    generator) is touched by one worker thread at a time, or by the reactor
    when no job is in flight."""

    def __init__(self, messages: list[dict]) -> None:
        self.messages = messages
        self.chunks: Any = None  # the llama-cpp-python stream, once opened
        self.stop_requested = False  # read by the worker thread after every token
        self.tokens = 0  # content pieces generated (worker thread)
        self.trimmed = 0  # turns dropped to fit n_ctx (worker thread)
        self.pieces: collections.deque[str] = collections.deque()
        self.finished = False  # the model is released (generation over)
        self.done = defer.Deferred()  # fires (None) when finished; for tests and logs
        self.error: Failure | None = None
        self.in_flight = False
        self._waiter: defer.Deferred | None = None

    # --- the reader (the reply coroutine)
    def next(self) -> defer.Deferred:
        """Fires with the next text piece, or None at the end."""
        if self.pieces:
            return defer.succeed(self.pieces.popleft())
        if self.finished:
            if self.error is not None:
                error, self.error = self.error, None
                return defer.fail(error)
            return defer.succeed(None)
        self._waiter = defer.Deferred(self._cancelled)
        return self._waiter

    def _cancelled(self, d: defer.Deferred) -> None:
        if self._waiter is d:
            self._waiter = None
        self.stop()

    def wake(self) -> None:
        """Hand the reader what it waits for, if it is there."""
        if self._waiter is None:
            return
        if self.pieces:
            d, self._waiter = self._waiter, None
            d.callback(self.pieces.popleft())
        elif self.finished:
            d, self._waiter = self._waiter, None
            if self.error is not None:
                error, self.error = self.error, None
                d.errback(error)
            else:
                d.callback(None)

    def stop(self) -> None:
        """Ask the worker to stop after the token it is on (idempotent)."""
        self.stop_requested = True


@implementer(ILanguageModel)
class LlamaCppLanguageModel:
    """Streams replies from a GGUF model loaded in this process."""

    _log = Logger()

    def __init__(self, settings: LlamaCppSettings, llama: Any, pool: Any) -> None:
        self.settings = settings
        self.llama = llama
        self.pool = pool
        self.lock = defer.DeferredLock()
        self.last: _Generation | None = None  # the latest generation (tests, diagnostics)

    # ------------------------------------------------------------ reactor side
    async def reply(self, system_prompt: str, history: Sequence[Turn]) -> AsyncIterator[object]:
        s = self.settings
        messages = build_messages(system_prompt, history, s.history_turns)
        await self.lock.acquire()  # cancellable while waiting
        gen = _Generation(messages)
        self.last = gen
        started = time.monotonic()
        self._next_job(gen)
        try:
            while True:
                text = await gen.next()
                if text is None:
                    break
                yield ReplyText(text)
        finally:
            # synchronous only: this also runs when the generator is closed
            # after its consumer was cancelled (no awaiting in here)
            gen.stop()
        if gen.trimmed:
            self._log.info("{engine}: dropped {n} oldest turns to fit n_ctx={n_ctx}", event="brain.history_trimmed",
                           engine=ENGINE, n=gen.trimmed, n_ctx=s.n_ctx)
        self._log.debug("Reply of {tokens} pieces generated in {secs:.3f}s", event="brain.reply_streamed",
                        tokens=gen.tokens, secs=time.monotonic() - started)

    def _next_job(self, gen: _Generation) -> None:
        gen.in_flight = True
        d = self.pool.run(self._pull, gen)
        d.addCallbacks(self._pulled, self._failed, callbackArgs=(gen,), errbackArgs=(gen,))

    def _pulled(self, result: tuple[list[str], bool], gen: _Generation) -> None:
        gen.in_flight = False
        texts, finished = result
        gen.pieces.extend(texts)
        if finished or gen.stop_requested:
            self._finish(gen)
        else:
            self._next_job(gen)
        gen.wake()

    def _failed(self, failure: Failure, gen: _Generation) -> None:
        gen.in_flight = False
        gen.error = failure
        self._finish(gen)
        gen.wake()

    def _finish(self, gen: _Generation) -> None:
        """No job is in flight: close the stream and free the model."""
        if gen.finished:
            return
        if gen.chunks is not None:
            try:
                gen.chunks.close()
            except Exception:
                self._log.failure("Closing a llama.cpp stream failed", event="brain.close_failed")
            gen.chunks = None
        gen.finished = True
        self.lock.release()
        gen.done.callback(None)

    # ---------------------------------------------------------- worker side
    def _pull(self, gen: _Generation) -> tuple[list[str], bool]:
        """On a worker thread: the next few text pieces, and whether the
        generation is over. Checks the stop flag after every token."""
        texts: list[str] = []
        started = time.monotonic()
        while not gen.stop_requested:
            try:
                chunk = next(gen.chunks) if gen.chunks is not None else self._open(gen)
            except StopIteration:
                return texts, True
            text = _content(chunk)
            if text:
                texts.append(text)
                gen.tokens += 1
                if len(texts) >= CHUNK_TOKENS or time.monotonic() - started >= CHUNK_SECONDS:
                    return texts, False
        return texts, True

    def _open(self, gen: _Generation) -> Any:
        """Start the stream and return its first chunk; when the prompt does
        not fit ``n_ctx``, drop the oldest turns and try again."""
        s = self.settings
        messages = gen.messages
        while True:
            stream = self.llama.create_chat_completion(
                messages=messages, stream=True, max_tokens=s.max_tokens, temperature=s.temperature,
            )
            chunks = iter(stream)
            try:
                first = next(chunks)  # evaluates the prompt
            except ValueError as e:
                shorter = _trim(messages) if _context_overflow(e) else None
                if shorter is None:
                    raise
                messages = shorter
                gen.trimmed += 1
                continue
            gen.chunks = chunks
            return first


@implementer(IEngineFactory)
class LlamaCppFactory:
    kind = "brain"
    name = "llamacpp"

    _KNOWN = {"model", "n_ctx", "threads", "max_tokens", "temperature", "history_turns", "chat_format"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> LlamaCppSettings:
        reject_unknown(options, self._KNOWN)
        if not options.get("model", "").strip():
            raise EngineOptionError("model", "is required: the path of an instruction-tuned .gguf model (relative to state_dir)")
        path = parse_path(options, "model", base_dir)
        if not os.path.isfile(path):
            raise EngineOptionError("model", f"{path} is not a file")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise EngineOptionError("model", f"cannot read {path}: {e.strerror}") from None
        if magic != b"GGUF":
            raise EngineOptionError("model", f"{path} is not a GGUF file")
        if not installed():
            raise EngineOptionError("", f"brain = llamacpp needs llama-cpp-python, which is not installed. Install it with: {INSTALL_HINT}")
        s = LlamaCppSettings(path)
        if "n_ctx" in options:
            s = attrs.evolve(s, n_ctx=parse_int(options, "n_ctx", 256, 1 << 20))
        if "threads" in options:
            s = attrs.evolve(s, threads=parse_int(options, "threads", 1, 256))
        if "max_tokens" in options:
            s = attrs.evolve(s, max_tokens=parse_int(options, "max_tokens", 1, 100000))
        if s.max_tokens >= s.n_ctx:
            raise EngineOptionError("max_tokens", f"{s.max_tokens} leaves no room for the prompt in n_ctx={s.n_ctx}")
        if "temperature" in options:
            s = attrs.evolve(s, temperature=parse_float(options, "temperature", 0.0, 2.0))
        if "history_turns" in options:
            s = attrs.evolve(s, history_turns=parse_int(options, "history_turns", 1, 10000))
        if "chat_format" in options:
            s = attrs.evolve(s, chat_format=options["chat_format"].strip() or None)
        return s

    def build(self, settings: LlamaCppSettings, context: EngineContext) -> LlamaCppLanguageModel:
        log = Logger(namespace=__name__)
        try:
            import llama_cpp
        except ImportError as e:
            raise EngineUnavailable(f"{ENGINE}: llama-cpp-python cannot be imported ({e}). Install it with: {INSTALL_HINT}") from None
        if settings.chat_format is not None:
            try:
                llama_cpp.llama_chat_format.get_chat_completion_handler(settings.chat_format)
            except Exception as e:
                raise EngineUnavailable(f"{ENGINE}: chat_format {settings.chat_format!r}: {e}") from None
        started = time.monotonic()
        try:
            llama = llama_cpp.Llama(
                model_path=settings.model, n_ctx=settings.n_ctx, n_threads=settings.threads,
                n_threads_batch=settings.threads, chat_format=settings.chat_format, verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineUnavailable(f"{ENGINE}: cannot load {settings.model}: {e}") from None
        log.info("{engine}: loaded {model} in {secs:.2f}s (chat format {fmt}, n_ctx {n_ctx}, {threads} threads)",
                 event="brain.model_loaded", engine=ENGINE, model=settings.model, secs=time.monotonic() - started,
                 fmt=getattr(llama, "chat_format", None), n_ctx=settings.n_ctx, threads=settings.threads)
        return LlamaCppLanguageModel(settings, llama, context.pool)


factory = LlamaCppFactory()

__all__ = ["factory", "INSTALL_HINT", "LlamaCppSettings", "LlamaCppLanguageModel"]
