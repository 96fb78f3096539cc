"""Where a call's outcome becomes its call record and its points: here, and only here.

The call reports what happened (``upvoot.call.outcome.CallOutcome``, no
points in it); the daemon knows who called (key, account, provider, the
call's metadata); the agent's configuration says how the call is billed.
``call_record`` joins the three into the ``store.CallRecord`` that
``store.settle_call`` (or the spool) writes. ``crash_charge`` prices a call
a dead process left open, by the same formula (``billing.points_for``).
"""

from __future__ import annotations

from typing import Any, Mapping

from upvoot.call.outcome import CallOutcome
from upvoot.ledger.billing import points_for
from upvoot.ledger.store import CallRecord


def call_record(outcome: CallOutcome, *, key_prefix: str, account: str, provider: str,
                metadata: Mapping[str, Any], agent_config: Any) -> CallRecord:
    """The record of a finished call. ``metadata`` is what the daemon knows
    about the call (peer, recording, ...); the record's metadata adds the
    call's ``engine_failures``, per-turn ``latencies`` and ``timeline`` to it.
    ``agent_config`` is the agent's ``upvoot.config.AgentConfig``."""
    return CallRecord(
        call_id=outcome.call_id, key_prefix=key_prefix, account=account, agent=outcome.agent,
        provider=provider, started_at=outcome.started_at, ended_at=outcome.ended_at,
        duration=outcome.duration, end_reason=outcome.end_reason.value, turns=outcome.turns,
        barge_ins=outcome.barge_ins, barge_ins_resumed=outcome.barge_ins_resumed,
        points_charged=points_for(outcome.duration, agent_config.billing_increment,
                                  agent_config.points_per_increment),
        transcript=[dict(entry) for entry in outcome.transcript],
        metadata={**metadata, "engine_failures": outcome.engine_failures,
                  "latencies": [dict(turn) for turn in outcome.latencies],
                  "timeline": [dict(event) for event in outcome.timeline]},
    )


def crash_charge(record: CallRecord, agent_configs: Mapping[str, Any]) -> int:
    """Points for a call a dead process left open: the duration its last
    heartbeat proves (``record.duration``), billed like any call of its
    agent; 0 for an agent no longer configured."""
    cfg = agent_configs.get(record.agent)
    if cfg is None:
        return 0
    return points_for(record.duration, cfg.billing_increment, cfg.points_per_increment)
