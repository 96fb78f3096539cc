"""How a call ended: the one ``CallOutcome`` a call produces, once.

The call knows what happened (times, turns, barge-ins, transcript,
latencies); it does not know who pays or how much: the ledger turns an
outcome into the call record and its points (``upvoot.ledger.settlement``).
``CallReport`` is what the call keeps for it while it runs: the transcript,
the counts and the per-turn latencies.
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
        self.turns = 0
        self.barge_ins = 0
        self.barge_ins_resumed = 0
        self.engine_failures = 0

    def elapsed(self) -> float:
        return self._clock.seconds() - self.t0

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
        split by stage (seconds). ``times``: speech_end, endpointed,
        transcribed[, first_token] on the call's clock. Where the line
        acknowledges playout, voice-to-voice is corrected to when the caller
        started hearing the reply (``playback.on_first_ack``)."""
        if not {"speech_end", "endpointed", "transcribed"} <= times.keys():
            return
        now = self._clock.seconds()
        first_token = times.get("first_token", times["transcribed"])
        stages = {
            "endpointing": times["endpointed"] - times["speech_end"],
            "transcription": times["transcribed"] - times["endpointed"],
            "first_token": first_token - times["transcribed"],
            "first_audio": now - first_token,
            "voice_to_voice": now - times["speech_end"],
        }
        stages = {k: round(max(0.0, v), 4) for k, v in stages.items()}
        self.latencies.append(stages)
        if playback.acknowledged_by_line:
            speech_end = times["speech_end"]
            stages["voice_to_voice_sent"] = stages["voice_to_voice"]

            def heard_from(start: float) -> None:
                stages["voice_to_voice"] = round(max(0.0, start - speech_end), 4)

            playback.on_first_ack = heard_from
        self._log.info(
            "Turn latency {voice_to_voice:.3f}s (endpointing {endpointing:.3f}, transcription {transcription:.3f}, "
            "first token {first_token:.3f}, first audio {first_audio:.3f})",
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
        )
