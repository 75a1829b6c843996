"""Token-aware chunks with overlap, cut on paragraph and sentence boundaries.

Text is first split into units that cover it exactly (no character is dropped): paragraphs
end at blank lines, sentences at `.!?` followed by a space or at `。！？；` (Chinese needs no
space), and lines end at newlines (code, lists). Units are packed greedily up to
`max_tokens`; a chunk prefers to end at a paragraph once it is two-thirds full. The next
chunk starts with the last units of the previous one, up to `overlap_tokens`, so a fact cut
by a boundary is whole in at least one chunk. A single unit longer than `max_tokens` (a
minified line, a sentence without punctuation) is cut at whitespace, or between characters
for Chinese, into pieces that fit.

Token counts come from a callable (EdgeQwen.tokenize's length), so chunk sizes are the
model's own tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# One unit ends after: a blank line (paragraph), Chinese/fullwidth sentence punctuation with
# any closing quotes, Latin sentence punctuation followed by whitespace, or a newline.
_BOUNDARY = re.compile(
    r"\n[ \t]*\n\s*"                                    # paragraph end (1)
    r"|[。！？；!?]+[”’」』）\)\"']*[ \t]*\n?"            # Chinese sentence end (no space needed)
    r"|(?<=[^\s.])[.!?]+[\"'”’)\]]*(?:[ \t]+|\n|$)"      # Latin sentence end
    r"|\n"                                              # line end
)

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Chunk:
    """A piece of a section's text: [start, end) character offsets into it and its token count."""

    text: str
    start: int
    end: int
    n_tokens: int


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    n_tokens: int
    para_end: bool


def split_units(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, ends_paragraph) spans covering `text` exactly, cut at sentence and line ends."""
    spans: list[tuple[int, int, bool]] = []
    pos = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if end > pos:
            spans.append((pos, end, m.group().count("\n") >= 2 or m.group().startswith("\n\n")))
            pos = end
    if pos < len(text):
        spans.append((pos, len(text), True))
    return spans


def _cut_long(text: str, start: int, end: int, count: TokenCounter, max_tokens: int) -> list[_Unit]:
    """Cut text[start:end], longer than max_tokens, into pieces that fit (at whitespace when it can)."""
    out: list[_Unit] = []
    pos = start
    while pos < end:
        rest = text[pos:end]
        n = count(rest)
        if n <= max_tokens:
            out.append(_Unit(pos, end, n, False))
            break
        # Characters per token of this text, then shrink until the piece fits.
        size = max(1, int(len(rest) * max_tokens / n * 0.9))
        while True:
            cut = pos + size
            space = text.rfind(" ", pos + size // 2, cut)
            if space > pos:
                cut = space + 1
            n_piece = count(text[pos:cut])
            if n_piece <= max_tokens or size == 1:
                break
            size = max(1, int(size * 0.8))
        out.append(_Unit(pos, cut, n_piece, False))
        pos = cut
    return out


def chunk_text(text: str, count: TokenCounter, max_tokens: int = 400, overlap_tokens: int = 50) -> list[Chunk]:
    """Chunks of `text`, each at most `max_tokens` tokens (as `count` measures them, summed per unit),
    consecutive chunks sharing up to `overlap_tokens` of whole units.

    The chunks, without their overlaps, cover `text` exactly.
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens={max_tokens} is too small for a chunk; use at least 8")
    if not 0 <= overlap_tokens < max_tokens // 2 + 1:
        raise ValueError(f"overlap_tokens={overlap_tokens} must be between 0 and half of max_tokens={max_tokens}")
    units: list[_Unit] = []
    for s, e, para in split_units(text):
        n = count(text[s:e])
        if n > max_tokens:
            pieces = _cut_long(text, s, e, count, max_tokens)
            pieces[-1] = _Unit(pieces[-1].start, pieces[-1].end, pieces[-1].n_tokens, para)
            units.extend(pieces)
        else:
            units.append(_Unit(s, e, n, para))
    chunks: list[Chunk] = []
    i = 0
    while i < len(units):
        j, total = i, 0
        while j < len(units) and total + units[j].n_tokens <= max_tokens:
            total += units[j].n_tokens
            j += 1
            if units[j - 1].para_end and total >= max_tokens * 2 // 3:
                break  # a paragraph end late in the chunk is a better cut than a mid-paragraph one
        j = max(j, i + 1)
        s, e = units[i].start, units[j - 1].end
        chunks.append(Chunk(text[s:e], s, e, sum(u.n_tokens for u in units[i:j])))
        if j >= len(units):
            break
        # Overlap: step back over whole trailing units, never back to i (progress guaranteed).
        k, back = j, 0
        while k - 1 > i and back + units[k - 1].n_tokens <= overlap_tokens:
            back += units[k - 1].n_tokens
            k -= 1
        i = k
    return [c for c in chunks if c.text.strip()]


def line_of(text: str, offset: int) -> int:
    """1-based line number of a character offset."""
    return text.count("\n", 0, offset) + 1
