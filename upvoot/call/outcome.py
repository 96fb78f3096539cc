"""How a call ended: the one ``CallOutcome`` a call produces, once.

The call knows what happened (times, turns, barge-ins, transcript,
latencies); it does not know who pays or how much: the ledger turns an
outcome into the call record and its points (``upvoot.ledger.settlement``).
``CallReport`` is what the call keeps for it while it runs: the transcript,
the counts, the per-turn latencies (``split``) and the timeline of events
(``CallReport.event``) the console draws.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
from twisted.logger import Logger

from upvoot.engines.interfaces import Turn


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
    NO_POINTS = "no_points"  # the account's points could not hold the call any longer


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
    timeline: tuple = ()  # dicts: {"t", "kind", ...} (``CallReport.event``)


#: The kinds of timeline event (``CallReport.event``); the console draws them.
EVENT_KINDS = frozenset({
    "caller_start", "caller_end", "agent_start", "agent_end", "interim",
    "barge_in", "barge_in_resumed", "clear", "resume", "silence_prompt", "end",
})
#: At most this many timeline events per call; past it only "end" is kept.
MAX_EVENTS = 2000


#: A turn's latency split (seconds), in the order the stages happen; they
#: sum to ``voice_to_voice`` (the end of the caller's speech to the first
#: audio byte of the reply handed to the line).
STAGES = ("end_of_turn", "turn_model", "transcription", "brain_first_token", "first_audio")
LATENCY_KEYS = STAGES + ("voice_to_voice",)
#: Keys of call records written before the split had a turn model.
_OLD_KEYS = {"endpointing": "end_of_turn", "first_token": "brain_first_token"}


def split(times: dict[str, float], now: float) -> dict[str, float] | None:
    """A turn's latency split from the moments of its turn (on the call's
    clock), the reply's first audio leaving ``now``:

    - ``speech_end``: the caller's last voiced audio;
    - ``paused``: the short silence was reached (the end-of-turn model
      was asked); absent: the same moment as ``decided``;
    - ``decided``: the turn ended (``endpointed``, its old name);
    - ``transcribed``: the final transcript was known (before ``decided``
      when it was started speculatively at the pause);
    - ``first_token``: the brain's first text (absent: ``transcribed``).

    Each stage is the time it added on the way from the end of speech to
    the first audio (the critical path): work done before the turn ended
    costs nothing, so a speculative transcription that was ready at the
    decision is 0. None when the turn has no end of speech (a keypad digit)."""
    decided = times.get("decided", times.get("endpointed"))
    if "speech_end" not in times or decided is None or "transcribed" not in times:
        return None
    speech_end = times["speech_end"]
    paused = min(times.get("paused", decided), decided)
    heard = max(times["transcribed"], decided)
    thought = max(times.get("first_token", heard), heard)
    stages = {
        "end_of_turn": paused - speech_end,
        "turn_model": decided - paused,
        "transcription": heard - decided,
        "brain_first_token": thought - heard,
        "first_audio": now - thought,
        "voice_to_voice": now - speech_end,
    }
    return {k: round(max(0.0, v), 4) for k, v in stages.items()}


def read_latency(turn: dict) -> dict:
    """One turn of a call record's ``metadata.latencies`` with today's keys
    (records written before the split had ``endpointing`` and
    ``first_token``, and no ``turn_model``)."""
    out = {_OLD_KEYS.get(k, k): v for k, v in turn.items()}
    if any(k in turn for k in _OLD_KEYS):
        out.setdefault("turn_model", 0.0)
    return out


class CallReport:
    """What a call keeps for its outcome while it runs: the conversation
    (``history``, for the brain), the transcript (sent to the line as it
    grows), the counts, and the latency of each answered turn.
    ``outcome`` makes the one ``CallOutcome``."""

    _log = Logger()

    def __init__(self, call_id: str, agent_name: str, line: Any, clock: Any, log_transcripts: bool = False) -> None:
        self.call_id = call_id
        self.agent_name = agent_name
        self._line = line
        self._clock = clock
        self.log_transcripts = log_transcripts
        self.t0 = clock.seconds()  # the reactor's seconds() is wall time; task.Clock's is test time
        self.history: list[Turn] = []
        self.transcript: list[dict] = []
        self.latencies: list[dict] = []
        self.timeline: list[dict] = []
        self.turns = 0
        self.barge_ins = 0
        self.barge_ins_resumed = 0
        self.engine_failures = 0

    def elapsed(self) -> float:
        return self._clock.seconds() - self.t0

    # -------------------------------------------------------------- timeline
    def event(self, kind: str, **fields: Any) -> None:
        """Append ``{"t": seconds since the call started (3 dp), "kind": kind,
        **fields}`` to the timeline (a ``t`` in ``fields`` dates an event
        that happened earlier, e.g. the end of speech found after a
        silence). Bounded: past ``MAX_EVENTS`` events only ``end`` is still
        kept (the call's last word)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown timeline event kind {kind!r}")
        if len(self.timeline) >= MAX_EVENTS and kind != "end":
            return
        self.timeline.append({"t": round(max(0.0, self.elapsed()), 3), "kind": kind, **fields})

    # ------------------------------------------------------------ transcript
    def caller_said(self, text: str) -> None:
        self.history.append(Turn("caller", text))
        self.transcript.append({"role": "caller", "text": text, "t": round(self.elapsed(), 3)})
        self._line.transcript("caller", text)

    def agent_said(self, text: str, interrupted: bool = False) -> None:
        if not text:
            return
        self.history.append(Turn("agent", text))
        entry: dict = {"role": "agent", "text": text, "t": round(self.elapsed(), 3)}
        if interrupted:
            entry["interrupted"] = True
        self.transcript.append(entry)
        self._line.transcript("agent", text)

    def log_barge_in(self, heard: str) -> None:
        self._log.info("Barge-in after {heard!r}", event="call.barge_in", call_id=self.call_id,
                       heard=heard if self.log_transcripts else f"{len(heard.split())} words")

    # -------------------------------------------------------------- latency
    def turn_latency(self, times: dict[str, float], playback: Any) -> None:
        """Voice-to-voice latency of a turn whose reply starts playing now,
        split by stage (``split``), logged and kept for the outcome. Where
        the line acknowledges playout, voice-to-voice is corrected to when
        the caller started hearing the reply (``playback.on_first_ack``)."""
        stages = split(times, self._clock.seconds())
        if stages is None:
            return
        self.latencies.append(stages)
        if playback.acknowledged_by_line:
            speech_end = times["speech_end"]
            stages["voice_to_voice_sent"] = stages["voice_to_voice"]

            def heard_from(start: float) -> None:
                stages["voice_to_voice"] = round(max(0.0, start - speech_end), 4)

            playback.on_first_ack = heard_from
        self._log.info(
            "Turn latency {voice_to_voice:.3f}s (end of turn {end_of_turn:.3f}, turn model {turn_model:.3f}, "
            "transcription {transcription:.3f}, brain first token {brain_first_token:.3f}, "
            "first audio {first_audio:.3f})",
            event="call.turn_latency", call_id=self.call_id, **stages,
        )

    # -------------------------------------------------------------- outcome
    def outcome(self, end_reason: EndReason) -> CallOutcome:
        seconds = max(0.0, self.elapsed())
        return CallOutcome(
            call_id=self.call_id,
            agent=self.agent_name,
            started_at=self.t0,
            ended_at=self.t0 + seconds,
            duration=round(seconds, 3),
            end_reason=end_reason,
            turns=self.turns,
            barge_ins=self.barge_ins,
            barge_ins_resumed=self.barge_ins_resumed,
            engine_failures=self.engine_failures,
            latencies=tuple(self.latencies),
            transcript=tuple(self.transcript),
            timeline=tuple(self.timeline),
        )
