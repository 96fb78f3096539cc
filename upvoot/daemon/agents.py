"""Agents at run time: their engines (built once, shared) and their cached lines.

Engines are keyed by (kind, name, settings): two agents with the same
whisper settings share one loaded model. Each agent's fixed lines (greeting,
goodbye, closing lines, prompts) are synthesized once at start and kept, so
a greeting's first frame leaves within milliseconds of the upgrade; so are
the replies of a brain that knows them all beforehand (``IKnownReplies``:
the scripted brain), sentence by sentence as the call speaks them, so such
a reply's first audio leaves as soon as the caller's turn is understood.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from upvoot.config import AgentConfig
from upvoot.engines import get_factory
from upvoot.engines.interfaces import EngineContext, EngineUnavailable, IKnownReplies
from upvoot.engines.sentences import SentenceSplitter


def known_sentences(brain: Any) -> list[str]:
    """The sentences a call will speak of each reply the brain knows
    beforehand, cut as the call cuts them (``SentenceSplitter``)."""
    if not IKnownReplies.providedBy(brain):
        return []
    sentences = []
    for text in brain.known_replies():
        splitter = SentenceSplitter()
        sentences += [*splitter.feed(text), *filter(None, [splitter.flush()])]
    return [s for s in sentences if s.strip()]


class PhraseCache:
    """Text -> synthesized 16 kHz PCM, for lines an agent says verbatim."""

    def __init__(self) -> None:
        self._audio: dict[str, bytes] = {}

    def get(self, text: str) -> bytes | None:
        return self._audio.get(text)

    def put(self, text: str, pcm: bytes) -> None:
        self._audio[text] = pcm

    def __len__(self) -> int:
        return len(self._audio)


@attrs.define
class Agent:
    config: AgentConfig
    vad: Any
    stt: Any
    brain: Any
    tts: Any
    phrases: PhraseCache
    turn_model: Any = None  # IEndOfTurn (smart-turn) for ``turn = smart``, one per process


class AgentRegistry:
    """Builds every configured agent's engines; ``agents[name]`` afterwards."""

    _log = Logger()

    def __init__(self, configs: Mapping[str, AgentConfig], context: EngineContext,
                 run_in_thread: Callable[..., defer.Deferred]) -> None:
        """``run_in_thread``: how the (blocking) model loading leaves the
        reactor: ``upvoot.ledger.threads.reactor_threads(reactor)``."""
        self.configs = configs
        self.context = context
        self._run_in_thread = run_in_thread
        self.agents: dict[str, Agent] = {}
        self._engines: dict[tuple, Any] = {}

    def build_engines(self) -> None:
        """Load models. Blocking: call it from a thread (or a test)."""
        turn_model = None
        for cfg in self.configs.values():
            if cfg.turn == "smart" and turn_model is None:
                from upvoot.engines import smartturn

                self._log.info("Loading the end-of-turn model", event="engine.loading", kind="turn", name="smart-turn")
                try:
                    turn_model = smartturn.load(self.context)
                except EngineUnavailable as e:
                    raise EngineUnavailable(f"[agent:{cfg.name}] turn = smart: {e}") from None
            built = {}
            for kind, spec in cfg.engines.items():
                key = (kind, spec.name, spec.settings)
                if key not in self._engines:
                    self._log.info("Loading {kind} engine {name}", event="engine.loading", kind=kind, name=spec.name)
                    self._engines[key] = get_factory(kind, spec.name).build(spec.settings, self.context)
                built[kind] = self._engines[key]
            self.agents[cfg.name] = Agent(cfg, built["vad"], built["stt"], built["brain"], built["tts"], PhraseCache(),
                                          turn_model if cfg.turn == "smart" else None)

    async def warm_phrases(self) -> None:
        """Synthesize every agent's fixed lines, and the sentences of the
        replies its brain knows beforehand, once (run on the reactor)."""
        for agent in self.agents.values():
            for line in dict.fromkeys([*agent.config.fixed_lines(), *known_sentences(agent.brain)]):
                if agent.phrases.get(line) is not None:
                    continue
                chunks = []
                async for pcm in agent.tts.synthesize(line):
                    chunks.append(pcm)
                agent.phrases.put(line, b"".join(chunks))
            self._log.info("Agent {agent}: {n} lines cached", event="agent.ready", agent=agent.config.name, n=len(agent.phrases))

    def prepare(self) -> defer.Deferred:
        """Build engines in a thread, then warm the phrase caches."""

        async def run() -> None:
            await self._run_in_thread(self.build_engines)
            await self.warm_phrases()

        return defer.Deferred.fromCoroutine(run())
