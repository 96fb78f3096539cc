"""Measure the offline speech engines on this machine.

Prints: Whisper latency and real-time factor for 2, 5 and 10 s utterances
(spoken by piper; median of a few runs), the cost of an interim decode,
piper's time to first audio and real-time factor, and how late a 20 ms
reactor timer fires while four simulated calls transcribe and synthesize on
the shared pool at once (with a Silero detector per call on the reactor).

Run: python bench/speech.py [--runs N] [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from upvoot._env import set_offline_environment

set_offline_environment()

from twisted.internet import defer, task  # noqa: E402

from upvoot import audio  # noqa: E402
from upvoot.engines import piper, silero, whisper  # noqa: E402
from upvoot.engines.interfaces import EngineContext  # noqa: E402
from upvoot.daemon.workers import WorkerPool  # noqa: E402

LONG_TEXT = (
    "Thank you for calling the city library. Our opening hours are nine to six on weekdays, "
    "and ten to four on Saturdays. If you would like to renew a book, please have your card "
    "number ready. For events and children's activities, visit our website or ask at the front desk."
)
REPLY = "Sure, I can help you with that. Your appointment is on Tuesday at ten in the morning. Is there anything else?"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def timed(d) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = await d
    return time.perf_counter() - t0, result


async def bench_whisper(stt, speech: bytes, runs: int) -> None:
    print("\nWhisper tiny.en (int8, beam 1, cpu_threads 1), idle pool, final decodes:")
    print(f"  {'audio':>6}  {'latency (median)':>16}  {'real-time factor':>16}")
    for seconds in (2, 5, 10):
        pcm = speech[: seconds * audio.BYTES_PER_SECOND]
        times = []
        for _ in range(runs):
            elapsed, _text = await timed(stt.transcribe(pcm, final=True))
            times.append(elapsed)
        med = statistics.median(times)
        print(f"  {seconds:>5}s  {ms(med):>16}  {med / seconds:>16.3f}")
    times = []
    for _ in range(runs):
        elapsed, _ = await timed(stt.transcribe(speech[: audio.BYTES_PER_SECOND], final=False))
        times.append(elapsed)
    print(f"  interim decode of 1 s: {ms(statistics.median(times))} (short window; bench/wer.py compares the padded one)")


async def bench_piper(tts, runs: int) -> None:
    print("\nPiper en_US-joe-medium (threads 1), streamed by sentence:")
    for text in ("Hello, how can I help?", REPLY, LONG_TEXT):
        first, total, dur = [], [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            got = 0
            async for chunk in tts.synthesize(text):
                if not got:
                    first.append(time.perf_counter() - t0)
                got += len(chunk)
            total.append(time.perf_counter() - t0)
            dur.append(audio.duration(got))
        rtf = statistics.median(total) / statistics.median(dur)
        print(
            f"  {len(text.split()):>3} words: first audio {ms(statistics.median(first))}, "
            f"all {ms(statistics.median(total))} for {statistics.median(dur):5.2f} s of audio, real-time factor {rtf:.3f}"
        )


async def bench_load(reactor, stt, tts, vad, speech: bytes, calls: int) -> None:
    """Reactor lateness while ``calls`` calls each do 3 turns of: final
    transcription of 3 s, then a streamed reply."""
    interval = 0.02
    lateness: list[float] = []
    detectors = [vad.new_detector() for _ in range(calls)]
    frames = [speech[i : i + audio.FRAME_BYTES] for i in range(0, len(speech) - audio.FRAME_BYTES + 1, audio.FRAME_BYTES)]
    state = {"start": reactor.seconds(), "ticks": 0}

    def tick(count: int) -> None:
        state["ticks"] += count
        lateness.append(reactor.seconds() - (state["start"] + state["ticks"] * interval))
        frame = frames[state["ticks"] % len(frames)]
        for d in detectors:  # inbound audio of every call, on the reactor
            d.is_speech(frame)

    loop = task.LoopingCall.withCount(tick)
    loop.clock = reactor
    loop_done = loop.start(interval, now=False)
    utterance = speech[: 3 * audio.BYTES_PER_SECOND]
    stt_times: list[float] = []
    tts_first: list[float] = []

    async def call(n: int) -> None:
        for _turn in range(3):
            elapsed, _ = await timed(stt.transcribe(utterance, final=True))
            stt_times.append(elapsed)
            t0 = time.perf_counter()
            first = True
            async for _chunk in tts.synthesize(REPLY):
                if first:
                    tts_first.append(time.perf_counter() - t0)
                    first = False

    t0 = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(call(n)) for n in range(calls)])
    wall = time.perf_counter() - t0
    loop.stop()
    await loop_done
    print(f"\nLoad: {calls} calls x 3 turns (3 s transcription + {len(REPLY.split())}-word reply) on a 2-thread pool, "
          f"Silero per call on the reactor; {wall:.1f} s wall")
    print(f"  20 ms timer lateness: p50 {ms(percentile(lateness, 50))}, p99 {ms(percentile(lateness, 99))}, "
          f"max {ms(max(lateness))} over {len(lateness)} ticks")
    print(f"  transcription latency: p50 {ms(percentile(stt_times, 50))}, max {ms(max(stt_times))}")
    print(f"  reply first audio:     p50 {ms(percentile(tts_first, 50))}, max {ms(max(tts_first))}")


async def main(reactor, args) -> None:
    pool = WorkerPool(reactor, size=2, queue_limit=32)
    pool.start()
    try:
        ctx = EngineContext(pool=pool, clock=reactor)
        t0 = time.perf_counter()
        stt = whisper.factory.build(whisper.factory.parse_options({}, "."), ctx)
        t1 = time.perf_counter()
        tts = piper.factory.build(piper.factory.parse_options({}, "."), ctx)
        t2 = time.perf_counter()
        vad = silero.factory.build(silero.factory.parse_options({}, "."), ctx)
        print(f"load: whisper {ms(t1 - t0)}, piper {ms(t2 - t1)}, silero {ms(time.perf_counter() - t2)}")

        det = vad.new_detector()
        frame = audio.noise(0.02, -40)
        t0 = time.perf_counter()
        for _ in range(5000):
            det.is_speech(frame)
        print(f"silero: {(time.perf_counter() - t0) / 5000 * 1e6:.0f} us per 20 ms frame on the reactor thread")

        speech = b"".join([chunk async for chunk in tts.synthesize(LONG_TEXT)])
        print(f"test speech: {audio.duration(speech):.1f} s by piper")
        await stt.transcribe(speech[: audio.BYTES_PER_SECOND], final=True)  # warm up
        await bench_whisper(stt, speech, args.runs)
        await bench_piper(tts, args.runs)
        await bench_load(reactor, stt, tts, vad, speech, args.calls)
        print(f"\npool refusals: {pool.refused}")
    finally:
        pool.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
