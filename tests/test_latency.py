"""The call's measurements: the timeline of events, the per-turn latency
split (``upvoot.call.outcome``) and their exposure on /metrics and in the
call record."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from upvoot.call.outcome import (
    EVENT_KINDS, LATENCY_KEYS, MAX_EVENTS, STAGES, CallOutcome, CallReport, EndReason, read_latency, split,
)
from upvoot.daemon.metrics import Metrics
from upvoot.ledger.settlement import call_record


class Playback:
    """What turn_latency reads of a reply's playback."""

    def __init__(self, acknowledged: bool = False) -> None:
        self.acknowledged_by_line = acknowledged
        self.on_first_ack = None


def report(clock: Clock) -> CallReport:
    return CallReport("c1", "demo", SimpleNamespace(transcript=lambda role, text: None), clock)


# ------------------------------------------------------------------ timeline
def test_events_carry_seconds_since_the_start_and_their_fields():
    clock = Clock()
    clock.advance(1000.0)
    r = report(clock)
    clock.advance(1.23456)
    r.event("caller_start")
    clock.advance(0.5)
    r.event("interim", text="what are")
    r.event("agent_end", interrupted=True)
    r.event("caller_end", t=1.5)  # dated back: speech ended before the silence that found it
    assert r.timeline == [
        {"t": 1.235, "kind": "caller_start"},
        {"t": 1.735, "kind": "interim", "text": "what are"},
        {"t": 1.735, "kind": "agent_end", "interrupted": True},
        {"t": 1.5, "kind": "caller_end"},
    ]
    outcome = r.outcome(EndReason.HANGUP)
    assert outcome.timeline == tuple(r.timeline) and isinstance(outcome.timeline, tuple)


def test_every_declared_kind_is_accepted_and_an_unknown_one_refused():
    r = report(Clock())
    for kind in sorted(EVENT_KINDS):
        r.event(kind)
    assert {e["kind"] for e in r.timeline} == EVENT_KINDS == {
        "caller_start", "caller_end", "agent_start", "agent_end", "interim", "barge_in", "barge_in_resumed",
        "clear", "resume", "silence_prompt", "end"}
    with pytest.raises(ValueError, match="bargein"):
        r.event("bargein")


def test_the_timeline_is_bounded_but_keeps_the_end():
    clock = Clock()
    r = report(clock)
    for _ in range(MAX_EVENTS + 50):
        clock.advance(0.01)
        r.event("interim", text="x")
    assert len(r.timeline) == MAX_EVENTS
    r.event("end", reason="hangup")
    assert len(r.timeline) == MAX_EVENTS + 1
    assert r.timeline[-1]["kind"] == "end" and r.timeline[-1]["reason"] == "hangup"


def test_the_call_record_stores_the_timeline():
    r = report(Clock())
    r.event("caller_start")
    r.event("end", reason="hangup")
    agent = SimpleNamespace(billing_increment=60.0, points_per_increment=1)
    record = call_record(r.outcome(EndReason.HANGUP), key_prefix="uvk_x", account="acme", provider="raw",
                         metadata={"peer": "p"}, agent_config=agent)
    assert record.metadata["timeline"] == [{"t": 0.0, "kind": "caller_start"},
                                           {"t": 0.0, "kind": "end", "reason": "hangup"}]
    assert record.metadata["peer"] == "p"


# -------------------------------------------------------------------- split
def test_the_split_of_a_turn_with_an_end_of_turn_model():
    clock = Clock()
    r = report(clock)
    times = {"speech_end": 10.0, "paused": 10.2, "decided": 10.27, "transcribed": 10.42, "first_token": 10.43}
    clock.advance(10.6)
    r.turn_latency(times, Playback())
    (lat,) = r.latencies
    assert lat == pytest.approx({"end_of_turn": 0.2, "turn_model": 0.07, "transcription": 0.15,
                                 "brain_first_token": 0.01, "first_audio": 0.17, "voice_to_voice": 0.6})
    assert set(lat) == set(LATENCY_KEYS)
    assert sum(lat[k] for k in STAGES) == pytest.approx(lat["voice_to_voice"])


def test_speculative_work_done_before_the_decision_costs_nothing():
    # transcription started at the pause and ready before the model said yes
    lat = split({"speech_end": 5.0, "paused": 5.2, "decided": 5.28, "transcribed": 5.25, "first_token": 5.26}, 5.3)
    assert lat == pytest.approx({"end_of_turn": 0.2, "turn_model": 0.08, "transcription": 0.0,
                                 "brain_first_token": 0.0, "first_audio": 0.02, "voice_to_voice": 0.3})


def test_the_split_of_a_fixed_silence_turn_and_of_old_times():
    # silence policy: the pause is the decision; "endpointed" is the old name of "decided"
    for times in ({"speech_end": 1.0, "decided": 1.6, "transcribed": 2.4},
                  {"speech_end": 1.0, "endpointed": 1.6, "transcribed": 2.4}):
        lat = split(times, 2.75)
        assert lat == pytest.approx({"end_of_turn": 0.6, "turn_model": 0.0, "transcription": 0.8,
                                     "brain_first_token": 0.0, "first_audio": 0.35, "voice_to_voice": 1.75})


def test_no_split_without_an_end_of_speech():
    assert split({"transcribed": 3.0, "first_token": 3.1}, 3.2) is None
    r = report(Clock())
    r.turn_latency({"transcribed": 3.0}, Playback())
    assert r.latencies == []


def test_an_acknowledging_line_corrects_voice_to_voice_to_the_ear():
    clock = Clock()
    r = report(clock)
    playback = Playback(acknowledged=True)
    clock.advance(2.5)
    r.turn_latency({"speech_end": 1.0, "paused": 1.2, "decided": 1.3, "transcribed": 1.5}, playback)
    (lat,) = r.latencies
    assert lat["voice_to_voice_sent"] == lat["voice_to_voice"] == pytest.approx(1.5)
    playback.on_first_ack(2.62)
    assert lat["voice_to_voice"] == pytest.approx(1.62) and lat["voice_to_voice_sent"] == pytest.approx(1.5)


def test_old_records_read_with_todays_keys():
    old = {"endpointing": 0.6, "transcription": 0.8, "first_token": 0.01, "first_audio": 0.3, "voice_to_voice": 1.71}
    assert read_latency(old) == {"end_of_turn": 0.6, "turn_model": 0.0, "transcription": 0.8,
                                 "brain_first_token": 0.01, "first_audio": 0.3, "voice_to_voice": 1.71}
    new = {"end_of_turn": 0.2, "turn_model": 0.07, "voice_to_voice": 0.5, "voice_to_voice_sent": 0.45}
    assert read_latency(new) == new


# ------------------------------------------------------------------ metrics
def outcome(latencies: tuple) -> CallOutcome:
    return CallOutcome(call_id="c1", agent="demo", started_at=0.0, ended_at=10.0, duration=10.0,
                       end_reason=EndReason.HANGUP, turns=len(latencies), barge_ins=0, barge_ins_resumed=0,
                       engine_failures=0, latencies=latencies, transcript=())


def test_metrics_expose_one_histogram_series_per_stage():
    metrics = Metrics()
    now = {"end_of_turn": 0.2, "turn_model": 0.07, "transcription": 0.15, "brain_first_token": 0.01,
           "first_audio": 0.0, "voice_to_voice": 0.43, "voice_to_voice_sent": 0.4}
    old = {"endpointing": 0.6, "transcription": 0.8, "first_token": 0.02, "first_audio": 0.3, "voice_to_voice": 1.72}
    metrics.call_ended(outcome((now, old)), "exotel")
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    samples = families["upvoot_stage_latency_seconds"].samples
    counts = {s.labels["stage"]: s.value for s in samples if s.name.endswith("_count")}
    assert counts == {stage: 2 for stage in LATENCY_KEYS}  # not voice_to_voice_sent; old keys read as new
    sums = {s.labels["stage"]: s.value for s in samples if s.name.endswith("_sum")}
    assert sums["end_of_turn"] == pytest.approx(0.8) and sums["voice_to_voice"] == pytest.approx(2.15)
    buckets = {(s.labels["stage"], s.labels["le"]): s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets[("voice_to_voice", "0.5")] == 1 and buckets[("voice_to_voice", "0.8")] == 1
    assert buckets[("first_audio", "0.005")] == 1
