"""Cut text into speakable pieces: sentences, and a short first clause.

Text-to-speech engines synthesize one piece per worker job, so the first
piece decides how soon the caller hears the agent: piper needs ~50 ms for 3
words but ~330 ms for 30. A long first sentence is therefore cut at its first
clause mark (comma, semicolon, colon, dash) once the head holds a few words.

The same rules serve a language model's token stream (``SentenceSplitter``)
and a whole reply (``split_sentences``); the whole-text function is the
incremental one fed at once, so both always agree. A boundary is decided only
when the character after it has arrived ("3." may still become "3.5"), which
keeps the result the same however the text is chunked.

Pure Python, no I/O: cheap enough to run on the reactor thread.
"""

from __future__ import annotations

import re

#: Words that end with a period without ending a sentence ("Dr. Who").
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs approx dept est fig inc ltd co corp
    e.g i.e cf al ca""".split()
)

# A sentence end: terminators, optional closing quotes/brackets, whitespace,
# then the next visible character (required, so chunking cannot change the
# decision).
_SENTENCE_END = re.compile(r"([.!?\u2026]+[\"'\u201d\u2019)\]]*)\s+(?=(\S))")
# A line break ends a piece whatever precedes it (lists, paragraphs).
_LINE_END = re.compile(r"\n\s*(?=\S)")
# A clause mark where a long first sentence may be cut.
_CLAUSE_END = re.compile(r"(?:([,;:])|\s[\u2014\u2013-])\s+")
_WORD = re.compile(r"\w[\w'\u2019-]*")


class SentenceSplitter:
    """Incremental splitter for streamed text (one per reply).

    ``feed(text)`` returns the pieces completed by ``text``; ``flush()``
    returns what is left at the end of the reply (possibly ``""``) and
    resets the splitter for the next reply.
    """

    def __init__(self, first_clause_words: int = 5, max_chars: int = 250) -> None:
        """``first_clause_words``: the first piece is cut at a clause mark
        once it has this many words (0 disables). ``max_chars``: a piece with
        no boundary is cut at a space before it grows past this."""
        self.first_clause_words = first_clause_words
        self.max_chars = max_chars
        self._buf = ""
        self._first = True

    def feed(self, text: str) -> list[str]:
        self._buf += text
        pieces: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return pieces
            end, start = cut
            piece = self._buf[:end].strip()
            self._buf = self._buf[start:]
            if piece:
                pieces.append(piece)
                self._first = False

    def flush(self) -> str:
        rest = self._buf.strip()
        self._buf = ""
        self._first = True
        return rest

    # internals -----------------------------------------------------------
    def _find_cut(self) -> tuple[int, int] | None:
        """(end of piece, start of the rest) for the earliest cut, or None."""
        buf = self._buf
        best: tuple[int, int] | None = None
        for m in _SENTENCE_END.finditer(buf):
            if _is_sentence_end(buf, m):
                best = (m.end(1), m.end())
                break
        m = _LINE_END.search(buf)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.end())
        if self._first and self.first_clause_words:
            limit = best[0] if best else len(buf)
            for m in _CLAUSE_END.finditer(buf, 0, limit):
                if len(_WORD.findall(buf, 0, m.start())) >= self.first_clause_words:
                    best = (_clause_end(m), m.end())
                    break
        if best is not None and best[0] <= self.max_chars:
            return best
        if len(buf) > self.max_chars:
            return _forced_cut(buf, self.max_chars)
        return None


def _is_sentence_end(buf: str, m: re.Match) -> bool:
    terminators = m.group(1)
    if terminators[0] not in ".\u2026":
        return True  # "!" and "?" always end a sentence
    if m.group(2).islower():
        return False  # "approx. five", "5 p.m. tomorrow", "wait... what"
    if terminators.startswith("..") or terminators[0] == "\u2026":
        return True
    words = buf[: m.start(1)].split()
    if not words:
        return True
    word = words[-1].lstrip("\"'(\u201c\u2018[").lower()
    if word in ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isalpha():
        return False  # an initial: "J. Smith"
    return True


def _clause_end(m: re.Match) -> int:
    """Keep a comma with its clause; drop a dash (it is not spoken)."""
    return m.end(1) if m.group(1) else m.start()


def _forced_cut(buf: str, max_chars: int) -> tuple[int, int]:
    """Cut a run-on piece at its last clause mark or space before max_chars."""
    head = buf[: max_chars + 1]
    clauses = list(_CLAUSE_END.finditer(head))
    if clauses:
        m = clauses[-1]
        return (_clause_end(m), m.end())
    space = head.rfind(" ")
    if space > 0:
        return (space, space + 1)
    return (max_chars, max_chars)


def split_sentences(text: str, first_clause_words: int = 5, max_chars: int = 250) -> list[str]:
    """Split a whole text into speakable pieces (see ``SentenceSplitter``)."""
    splitter = SentenceSplitter(first_clause_words, max_chars)
    pieces = splitter.feed(text)
    rest = splitter.flush()
    if rest:
        pieces.append(rest)
    return pieces


__all__ = ["SentenceSplitter", "split_sentences", "ABBREVIATIONS"]
