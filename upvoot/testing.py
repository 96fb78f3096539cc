"""Public test doubles: deterministic engines and a recording call output.

Used by UpVoot's own unit tests and offered to integrators who want to test
their flows against the call machine without models. They implement the
same interfaces as the real engines; nothing here is used by the daemon. Test tooling: it stands above the layers and may build
what any of them uses (``make_agent`` builds a daemon ``Agent``).
"""

from __future__ import annotations

from typing import AsyncIterator, Sequence

from twisted.internet import defer
from twisted.internet.task import deferLater
from zope.interface import implementer

from upvoot.audio import FRAME_BYTES, silence, tone
from upvoot.call.line import ILine
from upvoot.config import AgentConfig, EngineSpec
from upvoot.daemon.agents import Agent, PhraseCache  # an Agent is what a call runs: test tooling builds one
from upvoot.engines.energy import EnergySettings, EnergyVAD
from upvoot.engines.interfaces import ISpeechToText, ITextToSpeech, Turn
from upvoot.engines.scripted import ScriptedBrain, factory as scripted_factory

WORD_SECONDS = 0.25


@implementer(ISpeechToText)
class QueueSTT:
    """Answers finals from a queue of texts; interims with a fixed text.
    ``hold=True`` leaves each final pending until ``release()`` (to test
    what happens while the agent is thinking)."""

    def __init__(self, finals: Sequence[str] = (), interim: str = "", hold: bool = False) -> None:
        self.finals = list(finals)
        self.interim_text = interim
        self.hold = hold
        self.pending: list[defer.Deferred] = []
        self.requests: list[tuple[int, bool]] = []

    def transcribe(self, pcm: bytes, final: bool) -> defer.Deferred:
        self.requests.append((len(pcm), final))
        if not final:
            return defer.succeed(self.interim_text)
        text = self.finals.pop(0) if self.finals else ""
        if self.hold:
            d = defer.Deferred()
            d.addCallback(lambda _: text)
            self.pending.append(d)
            return d
        return defer.succeed(text)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            if not d.called:
                d.callback(None)


@implementer(ITextToSpeech)
class ToneTTS:
    """'Speaks' each word as a quarter second of tone, so durations and cuts
    are exact. Records what it was asked and how many pieces it produced."""

    def __init__(self, freq: float = 440.0, clock=None, work: float = 0.0) -> None:
        self.freq = freq
        self.requests: list[str] = []
        self.chunks = 0
        self.clock = clock
        self.work = work  # simulated synthesis time per word, on ``clock``

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        self.requests.append(text)
        for word in text.split():
            if self.work and self.clock is not None:
                await deferLater(self.clock, self.work, lambda: None)
            self.chunks += 1
            yield tone(self.freq, WORD_SECONDS)


@implementer(ILine)
class RecordingOutput:
    """An ``ILine`` that records everything, in order. By default it
    acknowledges no playout (the raw protocol); ``acknowledges_playout=True``
    makes it a provider's line, whose marks are recorded as ``("mark", name, last)``."""

    def __init__(self, acknowledges_playout: bool = False, min_lead: float = 0.0, mark_every: int = 3200) -> None:
        self.acknowledges_playout = acknowledges_playout
        self.min_lead = min_lead
        self.mark_every = mark_every
        self.primed: list[bytes] = []  # what each resume primed the line with
        self.events: list[tuple] = []
        self.audio_bytes = 0
        self.closed = False

    def audio_start(self) -> None:
        self.events.append(("audio_start",))

    def audio(self, pcm: bytes) -> None:
        self.audio_bytes += len(pcm)
        if not self.events or self.events[-1][0] != "audio":
            self.events.append(("audio", 0))
        self.events[-1] = ("audio", self.events[-1][1] + len(pcm))

    def audio_end(self, interrupted: bool) -> None:
        self.events.append(("audio_end", interrupted))

    def mark(self, name: str, last: bool) -> None:
        self.events.append(("mark", name, last))

    def transcript(self, role: str, text: str) -> None:
        self.events.append(("transcript", role, text))

    def interim(self, text: str) -> None:
        self.events.append(("interim", text))

    def turn_start(self) -> None:
        self.events.append(("turn_start",))

    def clear(self) -> None:
        self.events.append(("clear",))

    def prime(self, pcm: bytes) -> None:
        self.primed.append(bytes(pcm))

    def close(self) -> None:
        self.closed = True
        self.events.append(("close",))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def transcripts(self) -> list[tuple[str, str]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "transcript"]


def agent_config(**overrides) -> AgentConfig:
    """An AgentConfig with the documented defaults, overridable by keyword.
    Brain rules can be given as ``rules={"rule.hours": "hours -> We open at nine."}``."""
    rules = overrides.pop("rules", {"rule.hours": "hours|open -> We are open nine to five.",
                                     "end.bye": "bye|goodbye -> Goodbye then!"})
    values = dict(
        name="test", greeting="Hello there caller", system_prompt="", goodbye="Goodbye from us",
        apology="Sorry about that", max_duration=1800.0, max_turns=20, silence_timeout=10.0,
        silence_prompt="Are you still there", silence_prompt_after=6.0, wrap_up_warning="Almost out of time",
        wrap_up_before=60.0, closing_max_duration="Time is up goodbye", closing_max_turns="Enough turns goodbye",
        closing_silence="No answer goodbye", closing_error="Technical trouble goodbye", max_failures=3,
        closing_no_points="Out of points goodbye",
        turn="silence",  # these agents have no end-of-turn model: a test of turn = smart asks for it
        end_of_turn=0.6, min_utterance=0.25, max_utterance=20.0, barge_in_min=0.3, interim_interval=0.4,
        provider="auto", dtmf_interrupts=True, agent_select="",
        points_per_increment=1, billing_increment=60.0, record=False,
    )
    values.update(overrides)
    settings = scripted_factory.parse_options(rules, ".")
    values["engines"] = {"brain": EngineSpec("brain", "scripted", settings)}
    return AgentConfig(**values)


def make_agent(config: AgentConfig | None = None, stt=None, tts=None, cache: bool = True) -> Agent:
    """An Agent on deterministic engines: energy VAD, QueueSTT, scripted
    brain, ToneTTS; fixed lines cached like the daemon does at start."""
    config = config or agent_config()
    tts = tts or ToneTTS()
    phrases = PhraseCache()
    if cache:
        for line in config.fixed_lines():
            phrases.put(line, b"".join(tone(440.0, WORD_SECONDS) for _ in line.split()))
    brain = ScriptedBrain(config.engines["brain"].settings)
    return Agent(config, EnergyVAD(EnergySettings()), stt or QueueSTT(), brain, tts, phrases)


def speech(seconds: float, freq: float = 300.0, level: float = -15.0) -> bytes:
    """Loud 'speech' for the energy VAD (a tone), a whole number of frames."""
    pcm = tone(freq, seconds, level)
    return pcm[: len(pcm) // FRAME_BYTES * FRAME_BYTES]


def quiet(seconds: float) -> bytes:
    return silence(seconds)


__all__ = ["QueueSTT", "ToneTTS", "RecordingOutput", "agent_config", "make_agent", "speech", "quiet", "Turn"]
