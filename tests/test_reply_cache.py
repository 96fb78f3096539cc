"""Instant scripted replies: a brain that knows every reply beforehand
(``IKnownReplies``) has them synthesized at start, sentence by sentence as
the call speaks them, so a turn's first audio byte needs no synthesis."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from tests.test_call import Harness
from upvoot.daemon.agents import AgentRegistry, known_sentences
from upvoot.engines.interfaces import EngineContext, IKnownReplies
from upvoot.engines.scripted import ScriptedBrain
from upvoot.ledger.threads import synchronous
from upvoot.testing import QueueSTT, ToneTTS, agent_config, make_agent

RULES = {"rule.hours": "hours|open -> We are open nine to five. Monday to Friday, that is!",
         "end.bye": "bye|goodbye -> Goodbye then!",
         "fallback": "Sorry, I did not catch that. Could you say it again?"}


def registry_with(agent) -> AgentRegistry:
    registry = AgentRegistry({agent.config.name: agent.config}, EngineContext(pool=None, clock=None), synchronous)
    registry.agents = {agent.config.name: agent}
    return registry


def test_the_scripted_brain_tells_its_replies():
    brain = make_agent(agent_config(rules=RULES)).brain
    assert isinstance(brain, ScriptedBrain) and verifyObject(IKnownReplies, brain)
    assert set(brain.known_replies()) == {"We are open nine to five. Monday to Friday, that is!", "Goodbye then!",
                                          "Sorry, I did not catch that. Could you say it again?"}


def test_known_replies_are_cut_into_the_sentences_a_call_speaks():
    brain = make_agent(agent_config(rules=RULES)).brain
    assert known_sentences(brain) == ["We are open nine to five.", "Monday to Friday, that is!", "Goodbye then!",
                                      "Sorry, I did not catch that.", "Could you say it again?"]
    assert known_sentences(object()) == [], "a brain that does not know its replies has none"


@pytest_twisted.ensureDeferred
async def test_start_synthesizes_each_known_sentence_once_beside_the_fixed_lines():
    tts = ToneTTS()
    agent = make_agent(agent_config(rules=RULES), tts=tts, cache=False)
    await defer.ensureDeferred(registry_with(agent).warm_phrases())
    for line in [*agent.config.fixed_lines(), *known_sentences(agent.brain)]:
        assert agent.phrases.get(line), line
    assert len(tts.requests) == len(set(tts.requests)), "each line synthesized once"


def test_a_scripted_reply_plays_from_the_cache_without_synthesis():
    tts = ToneTTS()
    h = Harness(config=agent_config(rules=RULES), stt=QueueSTT(["what are your opening hours"]), tts=tts)
    for line in known_sentences(h.agent.brain):  # what the daemon did at start
        h.agent.phrases.put(line, b"\0\0" * 16000)
    h.start()
    h.until("listening")
    asked = list(tts.requests)
    h.say(1.0)
    h.until("speaking")
    h.until("listening")
    assert tts.requests == asked, "the reply was not synthesized during the call"
    assert ("agent", "We are open nine to five. Monday to Friday, that is!") in h.out.transcripts()
    (latency,) = h.report.latencies
    assert latency["first_audio"] == 0.0, latency
