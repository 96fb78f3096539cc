"""The words a transcript may not stop on: ``unfinished(text)``, for the
turn policy (``upvoot.call.turns``), which holds a turn open whose
transcript stops where no English sentence stops.

Pure text: imports nothing of UpVoot.
"""

from __future__ import annotations

#: English words no sentence ends on (articles, conjunctions, most prepositions, fillers, "is"/"are";
#: not "was"/"were", which end "... than he was", held 2.5 s on bench/hesitant.py's recordings).
#: "about": "I'm calling about ..." (bench/hesitant.py: "I need to speak to someone about ...", model 0.98).
DANGLING = frozenset(
    "a an the and or but because if when while to for of at with from into than about my your our their is are i "
    "we they uh um er erm".split())


def unfinished(text: str) -> bool:
    """The transcript stops where no sentence stops: on a trailing comma,
    dash or ellipsis, or on a word of ``DANGLING``."""
    text = text.strip()
    if text.endswith((",", "-", "...", "…")):
        return True
    words = text.rstrip(".?!").split()
    return bool(words) and words[-1].strip(",;:\"'").lower() in DANGLING
