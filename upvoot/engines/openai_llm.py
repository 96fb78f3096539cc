"""``brain = openai``: any OpenAI-compatible Chat Completions endpoint, streamed.

Each turn POSTs ``{base_url}/chat/completions`` with ``stream: true``::

    {"model": ..., "stream": true, "temperature": ..., "max_tokens": ...,
     "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "assistant", "content": "Hello, ..."},   (agent turns)
                  {"role": "user", "content": "what are your hours"}], (caller turns, last)
     "tools": [{"type": "function", "function": {"name": "end_call", ...}}]}

and reads the answer as server-sent events (``upvoot.engines.sse``), one
``data: {json}`` per chunk, ending with ``data: [DONE]``::

    data: {"choices": [{"index": 0, "delta": {"content": "We open"}}]}
    data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
           "function": {"name": "end_call", "arguments": "{\\"good"}}]}}]}
    data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    data: [DONE]

Every content delta is yielded at once as ``ReplyText`` (the call's
sentence splitter decides when there is enough to speak). A call of the
``end_call`` tool (its arguments may arrive in pieces) yields
``ReplyEndCall("agent")`` after the text; if the model called it without
saying anything, its ``goodbye`` argument (or "Goodbye.") is said first, so
the call never ends on silence.

History: the last ``history_turns`` turns are sent, consecutive turns of
one side joined (some chat templates insist on alternating roles), the
system prompt always first.

Timeouts, on the context's clock: the first token (content or tool call)
within ``first_token_timeout`` of sending, the whole reply within
``reply_timeout``. A timeout, a non-2xx answer (401, 429, 500...), a broken
or malformed stream raise ``OpenAIError`` (engine, status, elapsed time),
so the call's own failure handling applies (an apology, and the call ends
after ``max_failures``). Cancelling the consumer closes the connection.

Options (``brain.*``): ``base_url`` and ``model`` (required),
``temperature`` (0.7), ``max_tokens`` (200), ``api_key_env`` or
``api_key_file``, ``history_turns`` (20), ``first_token_timeout`` (5s),
``reply_timeout`` (20s), ``end_call_tool`` (yes).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Mapping, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    IEngineFactory,
    ILanguageModel,
    ReplyEndCall,
    ReplyText,
    Turn,
)
from upvoot.engines.openai import (
    COMMON_OPTIONS,
    HTTP,
    BodyStream,
    Endpoint,
    OpenAIError,
    describe,
    error_excerpt,
    log_failure,
    open_response,
    parse_endpoint,
    reactor_of,
    read_key,
    within,
)
from upvoot.engines.options import parse_bool, parse_float, parse_int, parse_seconds, reject_unknown
from upvoot.engines.sse import SSEParser

ENGINE = "brain openai"

END_CALL_TOOL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": (
            "Hang up the phone call. Use it when the caller says goodbye, has nothing more to ask, "
            "or asks to end the call. Say your goodbye in the same reply."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "goodbye": {"type": "string", "description": "the last words to say before hanging up"},
            },
            "required": [],
        },
    },
}

ROLES = {"caller": "user", "agent": "assistant"}


@attrs.frozen
class OpenAILLMSettings:
    endpoint: Endpoint
    temperature: float = 0.7
    max_tokens: int = 200
    history_turns: int = 20
    first_token_timeout: float = 5.0
    reply_timeout: float = 20.0
    end_call_tool: bool = True


def build_messages(system_prompt: str, history: Sequence[Turn], turns: int) -> list[dict]:
    """The ``messages`` of a request: the system prompt, then the last
    ``turns`` turns, runs of one role joined into one message."""
    messages: list[dict] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt})
    first = len(messages)
    for turn in list(history)[-turns:] if turns else []:
        role = ROLES.get(turn.role, "user")
        text = turn.text.strip()
        if not text:
            continue
        if len(messages) > first and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + text
        else:
            messages.append({"role": role, "content": text})
    return messages


class _Chunks:
    """What the stream has said so far: tool calls (by index) and whether a
    choice finished."""

    def __init__(self) -> None:
        self.tools: dict[int, dict[str, str]] = {}
        self.finished = False

    def parse(self, data: str) -> list[str]:
        """Texts in one ``data:`` payload; raises ``ValueError`` when the
        payload is not a chunk, ``_StreamError`` when it reports an error."""
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("error"):
            raise _StreamError(error_excerpt(json.dumps(obj).encode()))
        texts = []
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise ValueError("choices is not a list")
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                texts.append(content)
            for call in delta.get("tool_calls") or []:
                entry = self.tools.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                name = fn.get("name")
                if name and name != entry["name"]:
                    entry["name"] += name
                entry["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finished = True
        return texts

    def end_call(self) -> dict | None:
        """The arguments of an ``end_call`` tool call, if the model made one."""
        for entry in self.tools.values():
            if entry["name"] == "end_call":
                try:
                    args = json.loads(entry["arguments"] or "{}")
                except ValueError:
                    args = {}
                return args if isinstance(args, dict) else {}
        return None


class _StreamError(Exception):
    pass


@implementer(ILanguageModel)
class OpenAILanguageModel:
    """Streams replies from a Chat Completions endpoint."""

    _log = Logger()

    def __init__(self, settings: OpenAILLMSettings, http: HTTP, clock: Any) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.url = settings.endpoint.base_url + "/chat/completions"

    def request_body(self, system_prompt: str, history: Sequence[Turn]) -> dict:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.endpoint.model,
            "messages": build_messages(system_prompt, history, s.history_turns),
            "stream": True,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        if s.end_call_tool:
            body["tools"] = [END_CALL_TOOL]
        return body

    async def reply(self, system_prompt: str, history: Sequence[Turn]) -> AsyncIterator[object]:
        s = self.settings
        clock = self.clock
        started = clock.seconds()
        body = self.request_body(system_prompt, history)
        try:
            response = await open_response(
                self.http, lambda: self.http.post_json(self.url, body, "text/event-stream"),
                ENGINE, clock, started, s.first_token_timeout,
            )
        except OpenAIError as e:
            log_failure(e)
            raise
        stream = BodyStream.of(response)
        parser = SSEParser()
        chunks = _Chunks()
        spoke = False
        first_seen = False
        complete = False
        status = response.code

        def fail(message: str) -> OpenAIError:
            error = OpenAIError(ENGINE, message, status, clock.seconds() - started)
            log_failure(error)
            return error

        try:
            while not complete:
                if first_seen:
                    deadline, what = started + s.reply_timeout, f"reply not finished within {s.reply_timeout:g}s"
                else:
                    deadline, what = started + min(s.first_token_timeout, s.reply_timeout), f"no first token within {s.first_token_timeout:g}s"
                try:
                    data = await within(stream.next(), clock, deadline - clock.seconds())
                except defer.TimeoutError:
                    raise fail(what) from None
                except defer.CancelledError:
                    raise
                except Exception as e:
                    raise fail(f"connection lost mid-stream ({describe(e)})") from None
                if not data:
                    if chunks.finished:
                        complete = True  # no [DONE], but a finish_reason: accept
                        break
                    raise fail("stream ended before [DONE]")
                for event in parser.feed(data):
                    if event.data.strip() == "[DONE]":
                        complete = True
                        break
                    try:
                        texts = chunks.parse(event.data)
                    except _StreamError as e:
                        raise fail(f"error in stream: {e}") from None
                    except (ValueError, TypeError, AttributeError) as e:
                        raise fail(f"malformed chunk {event.data[:80]!r} ({e})") from None
                    if texts or chunks.tools:
                        first_seen = True
                    for text in texts:
                        spoke = spoke or bool(text.strip())
                        yield ReplyText(text)
        finally:
            if not complete:
                stream.abort()
        args = chunks.end_call()
        if args is not None and s.end_call_tool:
            if not spoke:
                goodbye = args.get("goodbye")
                yield ReplyText(goodbye.strip() if isinstance(goodbye, str) and goodbye.strip() else "Goodbye.")
            yield ReplyEndCall("agent")
        self._log.debug("Reply streamed in {secs:.3f}s", event="brain.reply_streamed", secs=clock.seconds() - started)

    def close(self) -> defer.Deferred:
        return self.http.close()


@implementer(IEngineFactory)
class OpenAILLMFactory:
    kind = "brain"
    name = "openai"

    _KNOWN = COMMON_OPTIONS | {"temperature", "max_tokens", "history_turns", "first_token_timeout", "reply_timeout", "end_call_tool"}

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> OpenAILLMSettings:
        reject_unknown(options, self._KNOWN)
        s = OpenAILLMSettings(parse_endpoint(options, base_dir))
        if "temperature" in options:
            s = attrs.evolve(s, temperature=parse_float(options, "temperature", 0.0, 2.0))
        if "max_tokens" in options:
            s = attrs.evolve(s, max_tokens=parse_int(options, "max_tokens", 1, 100000))
        if "history_turns" in options:
            s = attrs.evolve(s, history_turns=parse_int(options, "history_turns", 1, 10000))
        s = attrs.evolve(
            s,
            first_token_timeout=parse_seconds(options, "first_token_timeout", s.first_token_timeout),
            reply_timeout=parse_seconds(options, "reply_timeout", s.reply_timeout),
        )
        if s.reply_timeout < s.first_token_timeout:
            raise EngineOptionError("reply_timeout", f"{s.reply_timeout:g}s is shorter than first_token_timeout ({s.first_token_timeout:g}s)")
        if "end_call_tool" in options:
            s = attrs.evolve(s, end_call_tool=parse_bool(options, "end_call_tool"))
        return s

    def build(self, settings: OpenAILLMSettings, context: EngineContext) -> OpenAILanguageModel:
        key = read_key(ENGINE, settings.endpoint)
        return OpenAILanguageModel(settings, HTTP(reactor_of(context), key), context.clock)


factory = OpenAILLMFactory()

__all__ = ["factory", "OpenAILLMSettings", "OpenAILanguageModel", "build_messages", "END_CALL_TOOL"]
