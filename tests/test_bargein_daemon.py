"""Barge-in at the caller's ear against the real daemon, over Exotel framing
(16 kHz, so agent audio comes back bit for bit) with a real WebSocket
client that plays the provider (``upvoot.dial``: it plays agent audio in
real time, echoes marks once their audio has played, and on ``clear`` lets
the playing chunk finish). A cough-length noise over the agent: the clear
comes at its onset, the reply resumes from the last acknowledged mark, and
what the caller heard holds every sample of the reply, in order, once.
Prints onset -> clear (Exotel) and onset -> last agent audio (raw)."""

from __future__ import annotations

import os

import pytest

from tests.daemon import Daemon, shipped_ini, synthesize
from tests.test_providers_daemon import ProviderCall
from upvoot import audio
from upvoot.dial import AgentAudio, Cleared, make_sim
from upvoot.testing import speech

pytestmark = pytest.mark.slow

STORY = ("Let me tell you a short story. Once upon a time there was a small village by the sea.\n"
         "    Every morning the fishermen went out in their boats to catch fish for the market.")

AGENTS = f"""
[agent:story]
greeting = Hi.
silence_timeout = 60s
brain.fallback = {STORY}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("bargein"), shipped_ini(max_calls="4") + AGENTS)
    d.start(timeout=240)  # every agent's replies are synthesized at start
    yield d
    d.stop()


def _cough() -> bytes:
    return speech(0.12)  # loud enough for the energy VAD, far below barge_in_min and min_utterance


def _ear(events, clears):
    """What the caller heard: each chunk plays at ``plays_at``; a clear at
    ``tc`` lets the chunk playing finish and drops chunks after it."""
    heard: list[tuple[float, bytes]] = []
    dropped: list[bytes] = []
    for t, e in events:
        cut = None
        for tc in clears:
            if t < tc:
                playing = [p for tt, p in events if tt < tc and p.plays_at <= tc < p.plays_at + audio.duration(p.pcm)]
                cut = playing[0].plays_at + audio.duration(playing[0].pcm) if playing else tc
                break
        if cut is not None and e.plays_at >= cut - 1e-6:
            dropped.append(e.pcm)
        else:
            heard.append((e.plays_at, e.pcm))
    return b"".join(p for _, p in sorted(heard, key=lambda x: x[0])), b"".join(dropped)


def _story_call(daemon, account, cough: bool):
    """One Exotel call: the story asked for, a cough over it (or not);
    returns (call, sim, story events, clear times, cough time, clear time)."""
    key = daemon.key(agent="story", account=account, points=10)
    sim = make_sim("exotel", sample_rate=16000)
    call = ProviderCall(sim.url(daemon.url(f"/voice/{key}")), sim)
    coughed = t_clear = None
    try:
        call.wait_quiet(0.0, quiet=0.8)
        call.play(synthesize("Tell me a story please."))
        t_story, _ = call.wait(AgentAudio, after=call.now(), timeout=30)  # the reply, once the caller is done
        if cough:
            call.pause(1.5)
            coughed = call.now()
            call.play(_cough())
            t_clear, _ = call.wait(Cleared, after=coughed, timeout=5)
        call.wait_quiet(t_story, quiet=1.5, timeout=60)
        call.stop()
        call.wait_closed()
    finally:
        call.close()
    assert sim.violations == []
    story = call.of(AgentAudio, t_story - 0.01)
    return call, story, [t for t, _ in call.of(Cleared, t_story)], coughed, t_clear


def test_exotel_clear_at_onset_and_resume_after_a_cough_loses_and_doubles_nothing(daemon):
    plain_call, plain, clears, _, _ = _story_call(daemon, "bargein-reference", cough=False)
    assert clears == [], plain_call.summary()
    reference = b"".join(e.pcm for _, e in plain)  # the cached reply, as heard uninterrupted
    daemon.call()

    call, story, clears, coughed, t_clear = _story_call(daemon, "bargein-exotel", cough=True)
    load = os.getloadavg()[0]
    print(f"\nexotel 16k: cough sent -> clear received {1000 * (t_clear - coughed):.0f} ms "
          f"(onset is in the cough's first 100 ms media message; load {load:.2f})")
    assert t_clear - coughed < 0.5, "the clear follows the onset, not a confirmation or a discard"
    assert len(clears) == 1
    ear, dropped = _ear(story, clears)
    # every sample of the reply, in order, once (only the last chunk's zero padding may differ)
    assert ear.rstrip(b"\0") == reference.rstrip(b"\0")
    assert audio.duration(ear) > 3.0
    record = daemon.call()
    assert record["barge_ins"] == 0 and record["barge_ins_resumed"] >= 1
    agent = [t for t in record["transcript"] if t["role"] == "agent"]
    assert agent[-1]["text"].endswith("market.") and not agent[-1].get("interrupted")
    kinds = [e["kind"] for e in record["metadata"].get("timeline", [])]
    if kinds:
        assert "clear" in kinds and "resume" in kinds


def test_raw_onset_stops_the_agent_audio_within_the_lead(daemon):
    key = daemon.key(agent="story", account="bargein-raw", points=10)
    sim = make_sim("raw")
    call = ProviderCall(sim.url(daemon.url(f"/voice/{key}")), sim)
    try:
        call.wait_quiet(0.0, quiet=0.8)
        asked = call.now()
        call.play(synthesize("Tell me a story please."))
        t_story, _ = call.wait(AgentAudio, after=asked + 0.3, timeout=30)
        call.pause(1.5)
        coughed = call.now()
        call.play(_cough())
        call.pause(1.5)  # the cough is discarded after the end-of-turn silence: the story resumes
        gap = [t for t, _ in call.of(AgentAudio, coughed - 0.1)]
        call.stop()
    finally:
        call.close()
    # the last frame before the pause: frames keep coming every 20 ms until the agent pauses
    before_gap = [t for t, t2 in zip(gap, gap[1:]) if t2 - t > 0.2]
    stopped = before_gap[0] if before_gap else None
    load = os.getloadavg()[0]
    if stopped is not None:
        print(f"\nraw: cough sent -> last agent frame before the pause {1000 * (stopped - coughed):.0f} ms "
              f"(+ the 100 ms lead at the ear; load {load:.2f})")
    assert stopped is not None and stopped - coughed < 1.0
    record = daemon.call()
    assert record["barge_ins"] == 0 and record["barge_ins_resumed"] >= 1
