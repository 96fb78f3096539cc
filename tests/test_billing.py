"""upvoot.ledger.billing.points_for: the one points formula."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from upvoot.ledger.billing import points_for

durations = st.floats(min_value=0.0, max_value=86400.0, allow_nan=False)
increments = st.floats(min_value=1.0, max_value=3600.0, allow_nan=False)
points = st.integers(min_value=0, max_value=10**6)


def test_the_documented_examples():
    assert points_for(0.0, 60.0, 5) == 0
    assert points_for(0.001, 60.0, 5) == 5, "a started increment is charged"
    assert points_for(60.0, 60.0, 5) == 5
    assert points_for(60.001, 60.0, 5) == 10
    assert points_for(-3.0, 60.0, 5) == 0
    assert points_for(3 * 0.1, 0.1, 1) == 3, "float noise at a boundary bills no extra increment"


@given(increments, points)
def test_nothing_at_zero_or_below(increment, per):
    assert points_for(0.0, increment, per) == 0
    assert points_for(-1.0, increment, per) == 0


@given(durations, durations, increments, points)
def test_monotone_in_the_duration(a, b, increment, per):
    low, high = sorted((a, b))
    assert points_for(low, increment, per) <= points_for(high, increment, per)


@given(st.integers(min_value=1, max_value=10_000), increments, points)
def test_exact_at_the_boundaries(k, increment, per):
    assert points_for(k * increment, increment, per) == k * per
    assert points_for(k * increment + 0.001, increment, per) == (k + 1) * per
    below = k * increment - 0.001
    assume(below > 0)
    assert points_for(below, increment, per) == k * per


@given(durations, increments, points)
def test_a_whole_number_of_increments_times_the_points(duration, increment, per):
    charged = points_for(duration, increment, per)
    assert isinstance(charged, int)
    assert charged == points_for(duration, increment, 1) * per
    if duration > 0:
        assert charged >= per
        assert points_for(duration, increment, 1) <= max(1, math.ceil(duration / increment))


@pytest.mark.parametrize("args", [(1.0, 0.0, 1), (1.0, -60.0, 1), (1.0, float("nan"), 1),
                                  (1.0, 60.0, -1), (float("inf"), 60.0, 1), (float("nan"), 60.0, 1)])
def test_nonsense_is_refused(args):
    with pytest.raises(ValueError):
        points_for(*args)


# ---- settlement: the outcome becomes the record, here only -------------------------------

from upvoot.call.outcome import CallOutcome, EndReason  # noqa: E402
from upvoot.ledger import settlement  # noqa: E402
from upvoot.ledger.store import CallRecord  # noqa: E402
from upvoot.testing import agent_config  # noqa: E402


def _outcome(**kw):
    fields = dict(
        call_id="c" * 32, agent="demo", started_at=1000.0, ended_at=1125.5, duration=125.5,
        end_reason=EndReason.MAX_TURNS, turns=4, barge_ins=2, barge_ins_resumed=1, engine_failures=1,
        latencies=({"voice_to_voice": 0.8, "first_audio": 0.3},),
        transcript=({"role": "agent", "text": "Hello", "t": 0.1}, {"role": "caller", "text": "Hi", "t": 2.0}),
    )
    fields.update(kw)
    return CallOutcome(**fields)


def test_an_outcome_becomes_its_record_with_its_points():
    cfg = agent_config(billing_increment=60.0, points_per_increment=3)
    record = settlement.call_record(_outcome(), key_prefix="uvk_AbCdEfGh", account="acme", provider="twilio",
                                    metadata={"peer": "tcp4:1.2.3.4:5", "recording": "r/c.wav"}, agent_config=cfg)
    assert record == CallRecord(
        call_id="c" * 32, key_prefix="uvk_AbCdEfGh", account="acme", agent="demo", provider="twilio",
        started_at=1000.0, ended_at=1125.5, duration=125.5, end_reason="max_turns", turns=4, barge_ins=2,
        barge_ins_resumed=1, points_charged=9,
        transcript=[{"role": "agent", "text": "Hello", "t": 0.1}, {"role": "caller", "text": "Hi", "t": 2.0}],
        metadata={"peer": "tcp4:1.2.3.4:5", "recording": "r/c.wav", "engine_failures": 1,
                  "latencies": [{"voice_to_voice": 0.8, "first_audio": 0.3}], "timeline": []},
    )
    assert type(record.end_reason) is str


def test_a_call_of_no_duration_costs_nothing():
    cfg = agent_config(points_per_increment=3)
    record = settlement.call_record(_outcome(duration=0.0, ended_at=1000.0), key_prefix="p", account="a",
                                    provider="raw", metadata={}, agent_config=cfg)
    assert record.points_charged == 0


def test_a_crash_is_charged_by_the_same_formula():
    agents = {"demo": agent_config(billing_increment=30.0, points_per_increment=2)}
    record = settlement.call_record(_outcome(), key_prefix="p", account="a", provider="raw", metadata={},
                                    agent_config=agents["demo"])
    assert settlement.crash_charge(record, agents) == record.points_charged == points_for(125.5, 30.0, 2) == 10
    assert settlement.crash_charge(record, {}) == 0, "an agent no longer configured"
