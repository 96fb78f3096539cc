"""How a call ended: the one ``CallOutcome`` a call produces, once.

The call knows what happened (times, turns, barge-ins, transcript,
latencies); it does not know who pays or how much: the ledger turns an
outcome into the call record and its points (``upvoot.ledger.settlement``).
"""

from __future__ import annotations

import enum

import attrs


class EndReason(str, enum.Enum):
    """Why a call ended; stored in the call record."""

    HANGUP = "hangup"  # the caller (provider) closed the socket
    END_CALL = "end_call"  # the client sent {"type": "end_call"}
    SILENCE = "silence"  # silence_timeout of caller silence
    MAX_DURATION = "max_duration"
    MAX_TURNS = "max_turns"
    AGENT = "agent"  # the brain decided to end the call
    ERROR = "error"  # engines failed max_failures times in a row
    SHUTDOWN = "shutdown"  # the daemon was stopped


@attrs.frozen
class CallOutcome:
    call_id: str
    agent: str  # the agent's name (its config says how the call is billed)
    started_at: float  # wall clock, seconds since the epoch
    ended_at: float
    duration: float  # seconds, rounded to the millisecond
    end_reason: EndReason
    turns: int
    barge_ins: int
    barge_ins_resumed: int
    engine_failures: int
    latencies: tuple  # one dict of stage -> seconds per answered turn
    transcript: tuple  # dicts: {"role", "text", "t"[, "interrupted"]}
