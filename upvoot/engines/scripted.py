"""The scripted brain: replies chosen by rules written in the agent's section.

It needs no model and no network, so a receptionist or IVR-like agent runs
with nothing else installed, and every test has a deterministic brain.

Options (``brain.*``), tried in the order they are written:
- ``brain.rule.NAME = PATTERN -> REPLY``: when the caller's turn matches
  PATTERN, say REPLY.
- ``brain.end.NAME = PATTERN -> REPLY``: say REPLY, then end the call
  (end reason ``agent``).
- ``brain.fallback = REPLY``: what to say when nothing matches.

PATTERN is either ``re:REGEX`` (a Python regular expression, searched
case-insensitively) or keyword phrases separated by ``|``, each matched
case-insensitively as whole words (``hours|opening time``).
"""

from __future__ import annotations

import re
from typing import AsyncIterator, Mapping, Sequence

import attrs
from zope.interface import implementer

from upvoot.engines.interfaces import (
    EngineContext,
    EngineOptionError,
    IEngineFactory,
    IKnownReplies,
    ILanguageModel,
    ReplyEndCall,
    ReplyText,
    Turn,
)


@attrs.frozen
class Rule:
    name: str
    pattern: str
    reply: str
    ends_call: bool

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text, re.IGNORECASE) is not None


@attrs.frozen
class ScriptedSettings:
    rules: tuple[Rule, ...]
    fallback: str


def _compile(option: str, pattern: str) -> str:
    pattern = pattern.strip()
    if pattern.startswith("re:"):
        regex = pattern[3:].strip()
    else:
        words = [w.strip() for w in pattern.split("|") if w.strip()]
        if not words:
            raise EngineOptionError(option, "empty pattern")
        regex = r"\b(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in words) + r")\b"
    try:
        re.compile(regex)
    except re.error as e:
        raise EngineOptionError(option, f"bad regular expression: {e}") from None
    return regex


@implementer(ILanguageModel, IKnownReplies)
class ScriptedBrain:
    def __init__(self, settings: ScriptedSettings) -> None:
        self.settings = settings

    def choose(self, text: str) -> tuple[str, bool]:
        for rule in self.settings.rules:
            if rule.matches(text):
                return rule.reply, rule.ends_call
        return self.settings.fallback, False

    def known_replies(self) -> tuple[str, ...]:
        return (*(rule.reply for rule in self.settings.rules), self.settings.fallback)

    async def reply(self, system_prompt: str, history: Sequence[Turn]) -> AsyncIterator[object]:
        last = next((t.text for t in reversed(history) if t.role == "caller"), "")
        text, ends = self.choose(last)
        yield ReplyText(text)
        if ends:
            yield ReplyEndCall("agent")


@implementer(IEngineFactory)
class ScriptedFactory:
    kind = "brain"
    name = "scripted"

    def parse_options(self, options: Mapping[str, str], base_dir: str) -> ScriptedSettings:
        rules = []
        fallback = "Sorry, I can't help with that. Could you put it another way?"
        for key, value in options.items():
            value = " ".join(value.split())
            if key == "fallback":
                if not value:
                    raise EngineOptionError(key, "empty reply")
                fallback = value
                continue
            kind, dot, name = key.partition(".")
            if kind not in ("rule", "end") or not dot or not name:
                raise EngineOptionError(key, "unknown option (expected rule.NAME, end.NAME or fallback)")
            pattern, arrow, reply = value.partition("->")
            if not arrow or not reply.strip():
                raise EngineOptionError(key, "expected 'PATTERN -> REPLY'")
            rules.append(Rule(name, _compile(key, pattern), reply.strip(), kind == "end"))
        return ScriptedSettings(tuple(rules), fallback)

    def build(self, settings: ScriptedSettings, context: EngineContext) -> ScriptedBrain:
        return ScriptedBrain(settings)


factory = ScriptedFactory()
