"""The OpenAI-compatible engines against a server the tests run themselves.

``FakeOpenAI`` is a twisted.web resource on a loopback ``tcp:0`` port that
speaks the real wire formats: Chat Completions as server-sent events
(``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``), transcriptions as a
multipart upload answered with JSON, speech as a streamed raw PCM body.
Each test scripts what the server does (send, wait, drop, answer 429...)
and the server records every request and whether the client closed it.
"""

from __future__ import annotations

import io
import json
import wave

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.web import resource, server

from upvoot.daemon.agents import Agent
from upvoot.audio import FRAME_BYTES, RATE, tone
from upvoot.call import new_call, state_of
from upvoot.engines import get_factory
from upvoot.engines.interfaces import EngineBusy, EngineContext, EngineOptionError, EngineUnavailable, ReplyEndCall, ReplyText, Turn
from upvoot.engines.openai import OpenAIError
from upvoot.engines.openai_llm import build_messages
from upvoot.engines.sse import Event, SSEParser
from upvoot.call import Pacer
from upvoot.testing import QueueSTT, RecordingOutput, ToneTTS, agent_config, make_agent, quiet, speech

KEY = "sk-test-0123456789"
ENV = "UPVOOT_TEST_OPENAI_KEY"


# ====================================================================== SSE


def test_sse_events_split_across_chunks_anywhere():
    wire = b'data: {"a": 1}\n\ndata: line one\r\ndata: line two\r\n\r\n: comment\nevent: x\ndata:no-space\r\rdata: [DONE]\n\n'
    whole = SSEParser().feed(wire)
    assert whole == [Event('{"a": 1}'), Event("line one\nline two"), Event("no-space", "x"), Event("[DONE]")]
    for size in (1, 2, 3, 5, 7):
        p = SSEParser()
        got = []
        for i in range(0, len(wire), size):
            got += p.feed(wire[i:i + size])
        assert got == whole, size
        assert not p.pending


def test_sse_crlf_split_between_cr_and_lf_and_utf8_split():
    p = SSEParser()
    text = "caf\u00e9 \u2603"
    raw = f"data: {text}\r\n\r\n".encode()
    cut = raw.index(b"\xc3") + 1  # inside the two bytes of é
    assert p.feed(raw[:cut]) == []
    assert p.feed(raw[cut:-3]) == []
    assert p.feed(raw[-3:-2]) == []  # ends with the CR of the first CRLF
    assert p.feed(raw[-2:]) == [Event(text)]


def test_sse_ignores_events_without_data_and_drops_an_unclosed_tail():
    p = SSEParser()
    assert p.feed(b"\xef\xbb\xbfevent: ping\n\nid: 7\nretry: 10\n\ndata: x\n") == []
    assert p.pending
    assert p.feed(b"\n") == [Event("x", "message", "7")]


def test_build_messages_bounds_history_and_keeps_system_first():
    history = [Turn("agent", "Hello")] + [Turn("caller" if i % 2 == 0 else "agent", f"t{i}") for i in range(9)]
    msgs = build_messages("You are kind.", history, 4)
    assert msgs[0] == {"role": "system", "content": "You are kind."}
    assert [m["content"] for m in msgs[1:]] == ["t5", "t6", "t7", "t8"]
    assert msgs[-1]["role"] == "user"
    # runs of one side are joined; an empty prompt sends no system message
    msgs = build_messages("", [Turn("caller", "a"), Turn("caller", "b"), Turn("agent", "c")], 20)
    assert msgs == [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]


# ============================================================ the server


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def token(text: str) -> bytes:
    return sse({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def tool_piece(name: str | None, arguments: str) -> bytes:
    fn = {"arguments": arguments}
    if name:
        fn["name"] = name
    call = {"index": 0, "function": fn}
    if name:
        call.update(id="call_1", type="function")
    return sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]})


def finish(reason: str = "stop") -> bytes:
    return sse({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


DONE = b"data: [DONE]\n\n"


class Seen:
    """One request as the server saw it."""

    def __init__(self, request) -> None:
        self.path = request.path.decode()
        self.headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.args = request.args
        self.closed_by_client = defer.Deferred()  # fires if the client went away first
        self.finished = False


class FakeOpenAI(resource.Resource):
    """Scripted OpenAI-compatible endpoints. A script is a list of steps:
    ``bytes`` (write them), a float (wait that long), ``("status", code,
    body)``, ``"drop"`` (close the connection) or ``"hold"`` (wait for the
    client to give up). The script of the next request on a path is popped
    from ``scripts[path]`` (the last one stays)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, list[list]] = {}
        self.seen: list[Seen] = []
        self.bodies: list[bytes] = []

    def script(self, path: str, *steps) -> None:
        self.scripts.setdefault(path, []).append(list(steps))

    def render_POST(self, request):
        seen = Seen(request)
        body = request.content.read()
        self.seen.append(seen)
        self.bodies.append(body)
        queue = self.scripts.get(seen.path) or [[("status", 404, b'{"error": {"message": "no such path"}}')]]
        steps = queue.pop(0) if len(queue) > 1 else queue[0]
        ctype = {"/v1/chat/completions": b"text/event-stream", "/v1/audio/speech": b"application/octet-stream"}.get(seen.path, b"application/json")
        request.setHeader(b"content-type", ctype)
        run = defer.Deferred.fromCoroutine(self._run(request, seen, steps))
        run.addErrback(lambda f: f.trap(defer.CancelledError))

        def gone(f):
            if not seen.finished:
                seen.closed_by_client.callback(True)
            run.cancel()

        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET

    async def _run(self, request, seen: Seen, steps) -> None:
        for step in steps:
            if isinstance(step, bytes):
                request.write(step)
            elif isinstance(step, float):
                await deferLater(reactor, step, lambda: None)
            elif step == "hold":
                await defer.Deferred()  # until cancelled by the client going away
            elif step == "drop":
                seen.finished = True
                request.transport.abortConnection()
                return
            elif step[0] == "status":
                request.setResponseCode(step[1])
                request.write(step[2])
        seen.finished = True
        request.finish()

    def json(self, i: int = -1) -> dict:
        return json.loads(self.bodies[i])


@pytest_twisted.async_yield_fixture
async def api():
    fake = FakeOpenAI()
    site = server.Site(fake, timeout=None)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    fake.base_url = f"http://127.0.0.1:{port.getHost().port}/v1"
    fake.engines = []
    try:
        yield fake
    finally:
        # a body that has just ended puts its connection back into the pool
        # a moment later: let it, then close the pools (and their idle timers)
        await deferLater(reactor, 0.02, lambda: None)
        for engine in fake.engines:
            await engine.close()
        await port.stopListening()
        # let the server side see the client connections close
        await deferLater(reactor, 0.01, lambda: None)


def build(api, kind: str, clock=None, **options):
    """Build the ``openai`` engine of ``kind`` against the fake server."""
    opts = {"base_url": api.base_url, "model": "test-model", "api_key_env": ENV}
    opts.update({k: str(v) for k, v in options.items()})
    opts = {k: v for k, v in opts.items() if v != "None"}
    f = get_factory(kind, "openai")
    engine = f.build(f.parse_options(opts, "."), EngineContext(pool=None, clock=clock or reactor))
    api.engines.append(engine)
    return engine


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


HISTORY = [Turn("agent", "Hello, city library."), Turn("caller", "When do you open?")]


async def collect(brain, history=HISTORY, prompt="You are the library's receptionist."):
    items = []
    async for item in brain.reply(prompt, history):
        items.append(item)
    return items


# ================================================================= brain


@pytest_twisted.ensureDeferred
async def test_tokens_stream_as_separate_pieces_before_the_stream_ends(api):
    api.script("/v1/chat/completions", token("We "), token("open "), 0.05, token("at nine."), 0.3, finish(), DONE)
    brain = build(api, "brain")
    got = []
    times = []
    async for item in brain.reply("You are the library's receptionist.", HISTORY):
        got.append(item)
        times.append(reactor.seconds())
    assert got == [ReplyText("We "), ReplyText("open "), ReplyText("at nine.")]
    assert api.seen[0].finished
    # the last token arrived well before the stream's end, and was yielded then
    assert reactor.seconds() - times[-1] >= 0.25
    body = api.json()
    assert body["model"] == "test-model" and body["stream"] is True
    assert body["temperature"] == 0.7 and body["max_tokens"] == 200
    assert body["messages"][0] == {"role": "system", "content": "You are the library's receptionist."}
    assert body["messages"][-1] == {"role": "user", "content": "When do you open?"}
    assert [t["function"]["name"] for t in body["tools"]] == ["end_call"]
    assert api.seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert api.seen[0].headers["accept"] == "text/event-stream"


@pytest_twisted.ensureDeferred
async def test_history_is_bounded_and_options_are_sent(api):
    api.script("/v1/chat/completions", token("Ok."), DONE)
    brain = build(api, "brain", history_turns=3, temperature=0.2, max_tokens=50, end_call_tool="no")
    history = [Turn("caller" if i % 2 else "agent", f"turn {i}") for i in range(11)]
    await collect(brain, history)
    body = api.json()
    assert [m["content"] for m in body["messages"]] == ["You are the library's receptionist.", "turn 8", "turn 9", "turn 10"]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 50 and "tools" not in body


@pytest_twisted.ensureDeferred
async def test_end_call_tool_with_streamed_arguments_ends_after_the_text(api):
    api.script(
        "/v1/chat/completions",
        token("Thank you, goodbye!"), tool_piece("end_call", '{"good'), tool_piece(None, 'bye": "Bye'),
        tool_piece(None, '!"}'), finish("tool_calls"), DONE,
    )
    items = await collect(build(api, "brain"))
    assert items == [ReplyText("Thank you, goodbye!"), ReplyEndCall("agent")]


@pytest_twisted.ensureDeferred
async def test_end_call_without_text_says_the_goodbye_argument(api):
    api.script("/v1/chat/completions", tool_piece("end_call", '{"goodbye": "Take care!"}'), finish("tool_calls"), DONE)
    items = await collect(build(api, "brain"))
    assert items == [ReplyText("Take care!"), ReplyEndCall("agent")]


@pytest_twisted.ensureDeferred
async def test_slow_first_token_times_out(api):
    api.script("/v1/chat/completions", sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}), "hold")
    brain = build(api, "brain", first_token_timeout="150ms")
    t0 = reactor.seconds()
    with pytest.raises(OpenAIError) as e:
        await collect(brain)
    assert 0.14 <= reactor.seconds() - t0 < 1.0
    assert "no first token within 0.15s" in str(e.value) and e.value.status == 200
    assert await api.seen[0].closed_by_client  # the connection was closed


@pytest_twisted.ensureDeferred
async def test_reply_timeout_bounds_the_whole_reply(api):
    api.script("/v1/chat/completions", token("We"), *[x for _ in range(20) for x in (0.05, token(" la"))], DONE)
    brain = build(api, "brain", first_token_timeout="0.1", reply_timeout="0.3")
    got = []
    with pytest.raises(OpenAIError, match="reply not finished within 0.3s"):
        async for item in brain.reply("", HISTORY):
            got.append(item)
    assert 3 <= len(got) < 10


@pytest_twisted.ensureDeferred
async def test_connection_dropped_mid_stream_fails_after_the_tokens_so_far(api):
    api.script("/v1/chat/completions", token("We open"), 0.02, "drop")
    got = []
    with pytest.raises(OpenAIError, match="connection lost mid-stream"):
        async for item in build(api, "brain").reply("", HISTORY):
            got.append(item)
    assert got == [ReplyText("We open")]


@pytest_twisted.ensureDeferred
async def test_error_event_mid_stream_fails(api):
    api.script("/v1/chat/completions", token("We"), sse({"error": {"message": "The server had an error", "type": "server_error"}}), DONE)
    with pytest.raises(OpenAIError, match="error in stream: The server had an error"):
        await collect(build(api, "brain"))


@pytest.mark.parametrize("code, message", [
    (401, "Incorrect API key provided"),
    (429, "Rate limit reached"),
    (500, "The server had an error"),
])
@pytest_twisted.ensureDeferred
async def test_error_statuses_fail_with_status_and_message(api, code, message):
    api.script("/v1/chat/completions", ("status", code, json.dumps({"error": {"message": message}}).encode()))
    events = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(events.append)
    try:
        with pytest.raises(OpenAIError) as e:
            await collect(build(api, "brain"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert e.value.status == code
    assert f"server answered {code}: {message}" in str(e.value) and "brain openai" in str(e.value)
    (logged,) = [ev for ev in events if ev.get("event") == "engine.request_failed"]
    assert logged["status"] == code and logged["engine"] == "brain openai" and logged["elapsed"] >= 0
    assert not any(KEY in repr(ev) for ev in events), "the key is never logged"


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", sse([1, 2]), sse({"choices": "nope"})])
@pytest_twisted.ensureDeferred
async def test_malformed_chunks_fail(api, bad):
    api.script("/v1/chat/completions", token("Hi"), bad, DONE)
    with pytest.raises(OpenAIError, match="malformed chunk"):
        await collect(build(api, "brain"))


@pytest_twisted.ensureDeferred
async def test_stream_ending_without_done_or_finish_fails(api):
    api.script("/v1/chat/completions", token("Hi"))
    with pytest.raises(OpenAIError, match=r"stream ended before \[DONE\]"):
        await collect(build(api, "brain"))


@pytest_twisted.ensureDeferred
async def test_barge_in_cancels_the_consumer_and_closes_the_connection(api):
    api.script("/v1/chat/completions", token("One "), token("two "), "hold")
    brain = build(api, "brain")
    got = []
    two = defer.Deferred()

    async def consume():
        async for item in brain.reply("", HISTORY):
            got.append(item)
            if len(got) == 2:
                two.callback(None)

    d = defer.Deferred.fromCoroutine(consume())
    await two
    await deferLater(reactor, 0.01, lambda: None)  # a barge-in comes from the reactor, not from inside the loop
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    closed = api.seen[0].closed_by_client
    closed.addTimeout(2.0, reactor)
    assert await closed is True
    assert got == [ReplyText("One "), ReplyText("two ")]


@pytest_twisted.ensureDeferred
async def test_abandoned_reply_closes_the_connection(api):
    """The consumer stopped iterating while doing something else (speaking)."""
    api.script("/v1/chat/completions", token("One "), "hold")
    gen = build(api, "brain").reply("", HISTORY)
    assert await gen.__anext__() == ReplyText("One ")
    await gen.aclose()
    closed = api.seen[0].closed_by_client
    closed.addTimeout(2.0, reactor)
    assert await closed is True


@pytest_twisted.ensureDeferred
async def test_connection_is_reused_between_turns(api):
    api.script("/v1/chat/completions", token("A."), finish(), DONE)
    brain = build(api, "brain")
    await collect(brain)
    await collect(brain)
    assert len(api.seen) == 2
    assert len(brain.http.pool._connections) == 1


def test_options_are_validated(tmp_path):
    f = get_factory("brain", "openai")
    with pytest.raises(EngineOptionError) as e:
        f.parse_options({"model": "m"}, ".")
    assert e.value.option == "base_url"
    with pytest.raises(EngineOptionError) as e:
        f.parse_options({"base_url": "ftp://x", "model": "m"}, ".")
    assert e.value.option == "base_url"
    with pytest.raises(EngineOptionError) as e:
        f.parse_options({"base_url": "https://x/v1", "model": "m", "api_key_env": "A", "api_key_file": "k"}, ".")
    assert e.value.option == "api_key_file"
    with pytest.raises(EngineOptionError) as e:
        f.parse_options({"base_url": "https://x/v1", "model": "m", "first_token_timeout": "10s", "reply_timeout": "5s"}, ".")
    assert e.value.option == "reply_timeout"
    with pytest.raises(EngineOptionError) as e:
        f.parse_options({"base_url": "https://x/v1", "model": "m", "temprature": "1"}, ".")
    assert e.value.option == "temprature"
    s = f.parse_options({"base_url": "https://x/v1/", "model": "m", "api_key_file": "key.txt", "first_token_timeout": "1500ms"}, str(tmp_path))
    assert s.endpoint.base_url == "https://x/v1" and s.first_token_timeout == 1.5
    assert s.endpoint.api_key_file == str(tmp_path / "key.txt")
    # the key is read at build time
    with pytest.raises(EngineUnavailable, match="cannot read api_key_file"):
        f.build(s, EngineContext(pool=None, clock=Clock()))
    (tmp_path / "key.txt").write_text(KEY + "\n")
    brain = f.build(s, EngineContext(pool=None, clock=Clock()))
    assert brain.http.headers("x")["Authorization"] == f"Bearer {KEY}"
    unset = f.parse_options({"base_url": "https://x/v1", "model": "m", "api_key_env": "UPVOOT_NO_SUCH_VAR"}, ".")
    with pytest.raises(EngineUnavailable, match="UPVOOT_NO_SUCH_VAR"):
        f.build(unset, EngineContext(pool=None, clock=Clock()))


_BASE = {"base_url": "https://x/v1", "model": "m"}
DURATIONS = [
    # (kind, option, text, seconds or None for refused): the ini's own duration grammar
    ("stt", "timeout", "1500ms", 1.5), ("stt", "timeout", "0.5m", 30.0), ("stt", "timeout", "1h", 3600.0),
    ("stt", "timeout", "7", 7.0), ("tts", "timeout", "2s", 2.0), ("brain", "reply_timeout", "1h", 3600.0),
    ("stt", "timeout", "2h", None), ("stt", "timeout", "1d", None), ("tts", "timeout", "0", None),
    ("brain", "first_token_timeout", "soon", None), ("stt", "timeout", "10 S", None),
]


@pytest.mark.parametrize("kind, option, text, seconds", DURATIONS, ids=[f"{k}.{o}={t}" for k, o, t, _ in DURATIONS])
def test_engine_durations_use_the_config_grammar(kind, option, text, seconds):
    f = get_factory(kind, "openai")
    if seconds is None:
        with pytest.raises(EngineOptionError) as e:
            f.parse_options(dict(_BASE, **{option: text}), ".")
        assert e.value.option == option
        assert "out of range (1ms..1h)" in e.value.message or "expected a duration like 600ms" in e.value.message
    else:
        assert getattr(f.parse_options(dict(_BASE, **{option: text}), "."), option) == pytest.approx(seconds)


# ================================================================ speech


@pytest_twisted.ensureDeferred
async def test_transcription_uploads_a_wav_and_returns_text(api):
    api.script("/v1/audio/transcriptions", json.dumps({"text": " What are your hours? "}).encode())
    stt = build(api, "stt", language="de")
    pcm = tone(300.0, 1.0)
    assert await stt.transcribe(pcm, True) == "What are your hours?"
    args = api.seen[0].args
    assert args[b"model"] == [b"test-model"] and args[b"language"] == [b"de"] and args[b"response_format"] == [b"json"]
    with wave.open(io.BytesIO(args[b"file"][0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        assert w.readframes(w.getnframes()) == pcm
    assert api.seen[0].headers["authorization"] == f"Bearer {KEY}"


@pytest_twisted.ensureDeferred
async def test_interim_transcriptions_are_refused_at_once_unless_enabled(api):
    api.script("/v1/audio/transcriptions", b'{"text": "what"}')
    stt = build(api, "stt")
    with pytest.raises(EngineBusy):
        await stt.transcribe(tone(300.0, 1.0), False)
    assert api.seen == []
    stt = build(api, "stt", interim="yes")
    assert await stt.transcribe(tone(300.0, 1.0), False) == "what"


@pytest_twisted.ensureDeferred
async def test_transcription_failures(api):
    api.script("/v1/audio/transcriptions", ("status", 429, b'{"error": {"message": "slow down"}}'))
    api.script("/v1/audio/transcriptions", b'{"txt": 1}')
    api.script("/v1/audio/transcriptions", "hold")
    stt = build(api, "stt", timeout="0.2s")
    with pytest.raises(OpenAIError, match="server answered 429: slow down"):
        await stt.transcribe(tone(300.0, 1.0), True)
    with pytest.raises(OpenAIError, match="malformed answer"):
        await stt.transcribe(tone(300.0, 1.0), True)
    with pytest.raises(OpenAIError, match="no response within 0.2s"):
        await stt.transcribe(tone(300.0, 1.0), True)
    closed = api.seen[-1].closed_by_client
    closed.addTimeout(2.0, reactor)
    assert await closed is True


def pcm24(seconds: float) -> bytes:
    return tone(440.0, seconds, rate=24000)


@pytest_twisted.ensureDeferred
async def test_speech_streams_24k_pcm_resampled_to_16k_as_it_arrives(api):
    audio = pcm24(1.0)
    pieces = [audio[i:i + 4801] for i in range(0, len(audio), 4801)]  # odd sizes: a sample split across pieces
    steps = [x for p in pieces for x in (p, 0.02)]
    api.script("/v1/audio/speech", *steps)
    tts = build(api, "tts", voice="nova")
    chunks = []
    async for pcm in tts.synthesize("Hello there."):
        chunks.append(pcm)
    assert len(chunks) >= 5, "yielded as the body arrives"
    out = b"".join(chunks)
    assert len(out) % 2 == 0
    assert abs(len(out) // 2 - RATE) <= 2  # one second at 16 kHz
    assert api.json() == {"model": "test-model", "voice": "nova", "input": "Hello there.", "response_format": "pcm"}


@pytest_twisted.ensureDeferred
async def test_speech_failures_and_cancellation(api):
    api.script("/v1/audio/speech", ("status", 500, b"boom"))
    api.script("/v1/audio/speech", pcm24(0.1), "hold")
    api.script("/v1/audio/speech", pcm24(0.1), "hold")
    tts = build(api, "tts", timeout="0.2")
    with pytest.raises(OpenAIError, match="server answered 500: boom"):
        async for _ in tts.synthesize("Hi."):
            pass
    got = []
    with pytest.raises(OpenAIError, match="audio stalled for 0.2s"):
        async for pcm in tts.synthesize("Hi."):
            got.append(pcm)
    assert got, "audio before the stall was yielded"

    async def consume():
        async for _ in tts.synthesize("Hi."):
            pass

    d = defer.Deferred.fromCoroutine(consume())
    await deferLater(reactor, 0.05, lambda: None)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    closed = api.seen[-1].closed_by_client
    closed.addTimeout(2.0, reactor)
    assert await closed is True


# ============================================================ a whole call


@pytest_twisted.ensureDeferred
async def test_a_call_with_the_openai_brain_ends_by_its_tool(api):
    """The call machine on task.Clock, the brain over real HTTP on the reactor."""
    api.script("/v1/chat/completions", token("We open "), token("at nine. "), token("Goodbye!"),
               tool_piece("end_call", "{}"), finish("tool_calls"), DONE)
    cfg = agent_config(system_prompt="You are the library's receptionist.", interim_interval=0.0)
    base = make_agent(cfg, stt=QueueSTT(["when do you open"]), tts=ToneTTS())
    agent = Agent(base.config, base.vad, base.stt, build(api, "brain"), base.tts, base.phrases)
    clock = Clock()
    clock.advance(1000.0)
    out = RecordingOutput()
    ended: list[dict] = []
    call = new_call(agent, out, clock, Pacer(clock), lambda outcome: ended.append(attrs.asdict(outcome, recurse=False)))

    def step(audio: bytes = b"") -> None:
        frame = audio[:FRAME_BYTES] or quiet(0.02)
        if state_of(call) != "ended":
            call.caller_audio(frame)
        clock.advance(0.02)

    call.start()
    while state_of(call) != "listening":
        step()
    said = speech(0.8)
    for i in range(0, len(said), FRAME_BYTES):
        step(said[i:i + FRAME_BYTES])
    heard_at = out.audio_bytes
    for _ in range(1000):  # real time for HTTP, clock time for the call
        if ended:
            break
        await deferLater(reactor, 0.002, lambda: None)
        step()
    (summary,) = ended
    assert summary["end_reason"] == "agent"
    assert out.audio_bytes - heard_at >= 4 * 8000  # "We open at nine. Goodbye!": five words of tone
    assert agent.tts.requests == ["We open at nine.", "Goodbye!"]
    body = api.json()
    assert body["messages"][0] == {"role": "system", "content": "You are the library's receptionist."}
    assert body["messages"][-1] == {"role": "user", "content": "when do you open"}
    assert out.transcripts()[-1] == ("agent", "We open at nine. Goodbye!")
    assert clock.getDelayedCalls() == []
