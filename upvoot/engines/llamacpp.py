"""``brain = llamacpp``: a GGUF chat model run in the daemon's own process
with llama.cpp, through the ``xllamacpp`` binding (a prebuilt wheel: nothing
is compiled at install).

The model is loaded once, at build time (in the start-up thread), into an
``xllamacpp.Server``: llama.cpp's own server loop, in its own thread, without
an HTTP listener. Each turn formats the same ``messages`` as ``brain =
openai`` (``build_messages``: the system prompt, then the last
``history_turns`` turns) and streams a Chat Completions request through
``Server.handle_chat_completions``, which applies the model's chat template.

Threads: generation never runs on the reactor. llama.cpp computes in its
server thread with ``threads`` compute threads; the streaming call that
waits for its chunks is a job on the shared worker pool (``context.pool``),
so the pool's limits (queue, ``EngineBusy``) apply to the brain like to
speech. Each text piece is handed to the reactor as it comes
(``callFromThread``), where the reply coroutine reads it.

One generation at a time per model (the server has one slot): turns of
different calls that share the model take turns on a ``DeferredLock`` (a
waiting turn can be cancelled). The lock is released when the job has
really left the model, not merely when the consumer went away.

Cancellation (barge-in, hang-up): cancelling the consuming coroutine sets a
stop flag that the stream's callback returns after every token, so llama.cpp
cancels the generation within one token (the prompt's evaluation, before the
first token, cannot be interrupted).

A prompt longer than ``n_ctx`` (the server refuses it) is retried with the
oldest turns dropped, down to the caller's last turn.

``end_call``: the same tool as ``brain = openai`` is offered to the model
when ``end_call_tool`` says so: ``auto`` (the default) offers it when the
GGUF's own chat template handles tools (it mentions ``tools``), ``yes``
always (llama.cpp then describes the tool in a generic way), ``no`` never.
A built-in ``chat_format`` has no tool support.

Compute threads: llama.cpp's CPU backend uses OpenMP, whose workers spin
while they wait; more threads than free cores (the default on some builds)
slows generation by an order of magnitude on a busy machine. ``threads``
sets llama.cpp's thread count and, before the binding is first imported,
``OMP_NUM_THREADS`` (unless the operator set it).

Options (``brain.*``, documented in etc/upvoot.ini): ``model``, ``n_ctx``,
``threads``, ``max_tokens``, ``temperature``, ``history_turns``,
``chat_format`` (a llama.cpp built-in template), ``end_call_tool``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, AsyncIterator, Mapping, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from upvoot.engines.generation import Generation
from upvoot.engines.gguf import GGUFError, chat_template
from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    EngineUnavailable,
    IEngineFactory,
    ILanguageModel,
    ReplyEndCall,
    ReplyText,
    Turn,
)
from upvoot.engines.openai_llm import END_CALL_TOOL, _Chunks, _StreamError, build_messages
from upvoot.engines.options import parse_bool, parse_float, parse_int, parse_path, reject_unknown

ENGINE = "brain llamacpp"

#: How to install the binding: an ordinary extra, a prebuilt wheel.
INSTALL_HINT = "pip install 'upvoot[llamacpp]'"

#: llama.cpp's built-in chat templates (``chat_format``), for models whose
#: GGUF carries none or a wrong one.
BUILTIN_FORMATS = (
    "chatglm3", "chatglm4", "chatml", "command-r", "deepseek", "deepseek2", "deepseek3", "exaone3", "falcon3",
    "gemma", "gigachat", "granite", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3",
    "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "monarch", "openchat",
    "orion", "phi3", "phi4", "rwkv-world", "vicuna", "vicuna-orca", "zephyr",
)

@attrs.frozen
class LlamaCppSettings:
    model: str
    n_ctx: int = 2048
    threads: int = 1
    max_tokens: int = 200
    temperature: float = 0.7
    history_turns: int = 20
    chat_format: str | None = None
    end_call_tool: str = "auto"


def installed() -> bool:
    """Whether the binding is there (without importing it)."""
    return importlib.util.find_spec("xllamacpp") is not None


class _ContextOverflow(Exception):
    """The server refused the prompt: it does not fit ``n_ctx``."""


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


@implementer(ILanguageModel)
class LlamaCppLanguageModel:
    """Streams replies from a GGUF model loaded in this process.

    ``server`` is an ``xllamacpp.Server`` (or anything with its
    ``handle_chat_completions(json_str, callback)``: the callback gets each
    streamed chunk as a JSON string and returns True to stop)."""

    _log = Logger()

    def __init__(self, settings: LlamaCppSettings, server: Any, pool: Any, reactor: Any, tools: bool = False) -> None:
        self.settings = settings
        self.server = server
        self.pool = pool
        self.reactor = reactor  # IReactorFromThreads: pieces are handed over with callFromThread
        self.tools = tools
        self.lock = defer.DeferredLock()
        self.last: Generation | None = None  # the latest generation (tests, diagnostics)

    # ------------------------------------------------------------ reactor side
    async def reply(self, system_prompt: str, history: Sequence[Turn]) -> AsyncIterator[object]:
        s = self.settings
        body: dict = {
            "messages": build_messages(system_prompt, history, s.history_turns),
            "stream": True, "max_tokens": s.max_tokens, "temperature": s.temperature,
        }
        if self.tools:
            body["tools"] = [END_CALL_TOOL]
        await self.lock.acquire()  # cancellable while waiting
        gen = Generation(body)
        self.last = gen
        started = time.monotonic()
        job = self.pool.run(self._generate, gen)
        job.addCallbacks(self._generated, self._failed, callbackArgs=(gen,), errbackArgs=(gen,))
        spoke = False
        try:
            while True:
                text = await gen.next()
                if text is None:
                    break
                spoke = spoke or bool(text.strip())
                yield ReplyText(text)
        finally:
            # synchronous only: this also runs when the generator is closed
            # after its consumer was cancelled (no awaiting in here)
            gen.stop()
        if gen.end_call is not None:
            if not spoke:
                goodbye = gen.end_call.get("goodbye")
                yield ReplyText(goodbye.strip() if isinstance(goodbye, str) and goodbye.strip() else "Goodbye.")
            yield ReplyEndCall("agent")
        if gen.trimmed:
            self._log.info("{engine}: dropped {n} oldest turns to fit n_ctx={n_ctx}", event="brain.history_trimmed",
                           engine=ENGINE, n=gen.trimmed, n_ctx=s.n_ctx)
        self._log.debug("Reply of {tokens} pieces generated in {secs:.3f}s", event="brain.reply_streamed",
                        tokens=gen.tokens, secs=time.monotonic() - started)

    def _generated(self, end_call: dict | None, gen: Generation) -> None:
        gen.end_call = end_call if self.tools else None
        if gen.stopped_early:
            self._log.info("{engine}: generation stopped after {tokens} tokens (barge-in or hang-up)",
                           event="brain.generation_stopped", engine=ENGINE, tokens=gen.tokens)
        self._finish(gen)

    def _failed(self, failure: Failure, gen: Generation) -> None:
        gen.error = failure
        self._finish(gen)

    def _finish(self, gen: Generation) -> None:
        """The job has left the model: free it for the next turn."""
        if gen.finished:
            return
        gen.finished = True
        self.lock.release()
        gen.wake()
        gen.done.callback(None)

    # ---------------------------------------------------------- worker side
    def _generate(self, gen: Generation) -> dict | None:
        """On a worker thread: stream the whole reply, handing each piece to
        the reactor; returns the ``end_call`` tool's arguments, if called.
        When the prompt does not fit ``n_ctx``, drop the oldest turns and
        try again."""
        while not gen.stop_requested:
            try:
                return self._stream(gen)
            except _ContextOverflow:
                shorter = _trim(gen.body["messages"])
                if shorter is None:
                    raise
                gen.body = {**gen.body, "messages": shorter}
                gen.trimmed += 1
        return None

    def _stream(self, gen: Generation) -> dict | None:
        chunks = _Chunks()
        errors: list[str] = []

        def on_chunk(data: str) -> bool:
            try:
                obj = json.loads(data)
                if isinstance(obj, dict) and obj.get("error"):
                    errors.append(_error_text(obj["error"]))
                    return True
                texts = chunks.parse(data)
            except _StreamError as e:
                errors.append(str(e))
                return True
            except (ValueError, TypeError, AttributeError) as e:
                errors.append(f"malformed chunk {data[:80]!r} ({e})")
                return True
            for text in texts:
                gen.tokens += 1
                self.reactor.callFromThread(gen.add, text)
            if gen.stop_requested:
                gen.stopped_early = True
            return gen.stop_requested

        self.server.handle_chat_completions(json.dumps(gen.body), on_chunk)
        if errors:
            if "context size" in errors[0] or "context window" in errors[0]:
                raise _ContextOverflow(errors[0])
            raise RuntimeError(f"{ENGINE}: {errors[0]}")
        return chunks.end_call()


def _error_text(error: Any) -> str:
    return str(error.get("message") or error if isinstance(error, dict) else error)[:300]


@implementer(IEngineFactory)
class LlamaCppFactory:
    kind = "brain"
    name = "llamacpp"

    _KNOWN = {"model", "n_ctx", "threads", "max_tokens", "temperature", "history_turns", "chat_format",
              "end_call_tool"}

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
            raise EngineOptionError("", f"brain = llamacpp needs xllamacpp, which is not installed. Install it with: {INSTALL_HINT}")
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
        if options.get("chat_format", "").strip():
            name = options["chat_format"].strip()
            if name not in BUILTIN_FORMATS:
                raise EngineOptionError("chat_format", f"unknown chat format {name!r} (choose from: {', '.join(BUILTIN_FORMATS)})")
            s = attrs.evolve(s, chat_format=name)
        if "end_call_tool" in options:
            if options["end_call_tool"].strip().lower() == "auto":
                s = attrs.evolve(s, end_call_tool="auto")
            else:
                s = attrs.evolve(s, end_call_tool="yes" if parse_bool(options, "end_call_tool") else "no")
        return s

    def offers_tool(self, settings: LlamaCppSettings) -> bool:
        """Whether the model is offered the ``end_call`` tool."""
        if settings.end_call_tool != "auto":
            return settings.end_call_tool == "yes"
        if settings.chat_format is not None:
            return False
        try:
            template = chat_template(settings.model)
        except GGUFError:
            return False
        return template is not None and "tools" in template

    def build(self, settings: LlamaCppSettings, context: EngineContext) -> LlamaCppLanguageModel:
        log = Logger(namespace=__name__)
        # before the first import: OpenMP reads it when the library loads
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))
        try:
            import xllamacpp
        except ImportError as e:
            raise EngineUnavailable(f"{ENGINE}: xllamacpp cannot be imported ({e}). Install it with: {INSTALL_HINT}") from None
        params = xllamacpp.CommonParams()
        params.model.path = settings.model
        params.n_ctx = settings.n_ctx
        params.n_parallel = 1  # one generation at a time per model
        params.n_predict = settings.max_tokens
        params.cpuparams.n_threads = settings.threads
        params.cpuparams_batch.n_threads = settings.threads
        params.warmup = False
        params.verbosity = -1  # llama.cpp writes its own log to stderr otherwise
        if settings.chat_format is not None:
            params.use_jinja = False
            params.chat_template = settings.chat_format
        else:
            params.use_jinja = True  # the GGUF's own Jinja template (tool calls need it)
        tools = self.offers_tool(settings)
        started = time.monotonic()
        try:
            server = xllamacpp.Server(params)
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineUnavailable(f"{ENGINE}: cannot load {settings.model}: {e}") from None
        log.info("{engine}: loaded {model} in {secs:.2f}s (chat format {fmt}, n_ctx {n_ctx}, {threads} threads, "
                 "end_call tool {tools})", event="brain.model_loaded", engine=ENGINE, model=settings.model,
                 secs=time.monotonic() - started, fmt=settings.chat_format or "from the GGUF", n_ctx=settings.n_ctx,
                 threads=settings.threads, tools="offered" if tools else "not offered")
        return LlamaCppLanguageModel(settings, server, context.pool, context.clock, tools=tools)


factory = LlamaCppFactory()

__all__ = ["factory", "INSTALL_HINT", "BUILTIN_FORMATS", "LlamaCppSettings", "LlamaCppLanguageModel"]
