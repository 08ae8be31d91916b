"""Span splitting: cut a span of the source into child spans that fit a token budget.

This module owns one decision: where to cut. It reads no files, calls no model and
keeps no state between calls; :func:`split_span` is a pure function of its arguments
(and of ``count_tokens``, which it calls a few times per child span).

How a cut is chosen, for each child span in turn, starting at offset ``s``:

1. **Window.** Find ``w``, the end of the longest prefix ``text[s:w]`` that
   ``count_tokens`` puts at or under ``max_tokens``. The search guesses ``w`` from a
   running characters-per-token estimate and refines it (interpolation, then
   bisection); it stops as soon as the count is within 2 % of ``max_tokens``, so
   ``w`` may fall short of the longest prefix by up to 2 % of the budget. When the
   rest of the span fits, the child span runs to the span's end and the split is
   done.
2. **Region.** The cut must lie in the second half of the window's new text: at or
   after ``f + ceil((w - f) / 2)`` and at or before ``w``, where ``f`` is where the
   previous child span ended (the span start for the first one; ``f == s`` without
   overlap). This keeps child spans large: a good boundary early in the window is
   not worth a small child span.
3. **Level.** Boundary levels are tried in the order of :class:`Boundary`: FILE,
   SECTION, PARAGRAPH, SENTENCE, LINE, WORD. The first level with a boundary in the
   region wins, and its last boundary in the region (the one closest to ``w``) is
   the cut. If no level has one, the cut is the last grapheme-cluster boundary at or
   before ``w`` (GRAPHEME, a hard cut). At every level only grapheme-cluster
   boundaries count.
4. **Progress.** If there is no cluster boundary after ``f`` and at or before ``w``,
   the overlap (if any) is dropped and the search repeats from ``f``; failing that,
   the child span is the single grapheme cluster at ``s``, even when it is over
   budget, because it cannot be cut.
5. **Check.** The chosen child span is counted again. BPE counts are not monotone
   (a prefix can count more tokens than a longer text), so a child span found over
   budget makes the window shorter and steps 1-4 run again.

Overlap: the next child span starts before the cut, at a position ``q`` such that
``count_tokens(text[q:cut])`` is at most the overlap budget (``overlap_tokens``,
clamped to ``max_tokens // 2``). ``q`` is moved forward to the start of a word (after
whitespace) or a CJK sentence end, else to a grapheme-cluster boundary; it always
lies after the previous child span's start. The overlap never reaches back across a
hard boundary: nothing straddles a file start. With no overlap, child spans are
adjacent.

The budget is the caller's to choose: ``max_tokens`` must already leave room for
the instructions, the answer and a safety margin for a tokenizer that only
approximates the model's own (KNOWN-FAILURES K14, K18).

What the levels match (positions are where the next child span would begin):

- FILE: the ``hard_boundaries`` offsets given by the caller.
- SECTION: the start of a heading line (markdown ``#`` to ``######``, or a short
  line such as ``CHAPTER XII``, ``Chapter 12: Title``, ``BOOK``, ``Part One``,
  ``VOLUME II``), or the end of a run of three or more line breaks.
- PARAGRAPH: the end of a run of two or more line breaks (a blank line; lines of
  spaces and tabs count as blank).
- SENTENCE: after ``.``, ``!`` or ``?`` (repeated), closing quotes or brackets and
  at least one whitespace character; or after ``。``, ``！``, ``？`` and closing
  brackets, with or without whitespace.
- LINE: after a line break (``\\n``, ``\\r\\n`` or ``\\r``; never between ``\\r``
  and ``\\n``).
- WORD: after a run of whitespace (no-break spaces do not count).
- GRAPHEME: any extended grapheme-cluster boundary (Unicode UAX #29, as the
  ``regex`` module's ``\\X`` finds them).

The heading and sentence rules are heuristics: ``Mr. Smith`` counts as a sentence
end, and setext (underlined) headings are not recognised.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections.abc import Callable, Sequence

import regex

from rlm_graph.errors import ConfigError

__all__ = [
    "FILE",
    "GRAPHEME",
    "LINE",
    "PARAGRAPH",
    "SECTION",
    "SENTENCE",
    "WORD",
    "Boundary",
    "split_span",
]

logger = logging.getLogger(__name__)

# The window search stops once a prefix counts at least 98 % of the budget. On 3 MB
# of the texts in benchmarks/split_speed.py (max_tokens=2000), an exact search
# counted 5.4x (prose) and 80x (CJK) the text's length; 2 % counted 3.6x and 3.5x;
# 5 % saved 3 % of that counting but made 1 % more child spans, that is, more calls.
_FIT_TOLERANCE = 0.02
_INTERPOLATION_STEPS = 8
_MAX_FIT_STEPS = 64
_MAX_OVERLAP_STEPS = 4

# Boundary patterns look this far around the region they search: a blank-line run or
# a heading line that starts before the region, or a heading's text after its start.
_CONTEXT_BEFORE_CHARS = 64
_CONTEXT_AFTER_CHARS = 256
# Boundaries are searched for from the end of the region, in slices this long and
# then four times longer each time.
_FIRST_SLICE_CHARS = 512


class Boundary(enum.IntEnum):
    """A kind of place where a span may be cut; a lower value is preferred."""

    FILE = 0
    """A caller-given hard boundary, such as the start of a file."""
    SECTION = 1
    """A heading line, or three or more line breaks in a row."""
    PARAGRAPH = 2
    """A blank line."""
    SENTENCE = 3
    """The end of a sentence."""
    LINE = 4
    """A line break."""
    WORD = 5
    """The start of a word, after whitespace."""
    GRAPHEME = 6
    """Any grapheme-cluster boundary: a hard cut."""


FILE = Boundary.FILE
SECTION = Boundary.SECTION
PARAGRAPH = Boundary.PARAGRAPH
SENTENCE = Boundary.SENTENCE
LINE = Boundary.LINE
WORD = Boundary.WORD
GRAPHEME = Boundary.GRAPHEME

_NEWLINE = r"(?:\r\n|\r(?!\n)|\n)"
_LINE_START = r"(?:(?<=\n)|(?<=\r)(?!\n))"
_SPACE = r"[^\S\xa0\u2007\u202f]"
_CLOSERS = r"[\"'\u201d\u2019)\]}\u00bb]"
_CJK_STOPS = r"[\u3002\uff01\uff1f\uff61]"
_CJK_CLOSERS = r"[\u300d\u300f\u201d\u2019\uff09\u3011\u3015\u300b\u3009\"')\]}]"
_NUMBER = (
    r"(?:[IVXLCDM]+|[0-9]+|(?i:one|two|three|four|five|six|seven|eight|nine|ten"
    r"|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen"
    r"|nineteen|twenty|first|second|third|fourth|fifth|sixth|seventh|eighth"
    r"|ninth|tenth|last))"
)
_HEADING = (
    r"[ \t]{0,3}#{1,6}(?:[ \t]|\r|\n|\Z)"
    r"|[ \t]*(?:CHAPTER|Chapter|BOOK|Book|PART|Part|VOLUME|Volume)"
    rf"(?:[ \t]+{_NUMBER}\b(?:[ \t]*[.:\-\u2013\u2014][^\r\n]{{0,80}}"
    r"|[ \t]+[^\r\na-z]{1,80})?)?[ \t]*[.:]?[ \t]*(?:\r|\n|\Z)"
)

# Each pattern's match end is a candidate cut.
_LEVEL_PATTERNS = {
    SECTION: regex.compile(
        rf"{_NEWLINE}(?:[ \t]*{_NEWLINE}){{2,}}|{_LINE_START}(?=(?:{_HEADING}))"
    ),
    PARAGRAPH: regex.compile(rf"{_NEWLINE}(?:[ \t]*{_NEWLINE})+"),
    SENTENCE: regex.compile(
        rf"[.!?]+{_CLOSERS}*{_SPACE}+|{_CJK_STOPS}+{_CJK_CLOSERS}*{_SPACE}*"
    ),
    LINE: regex.compile(_NEWLINE),
    WORD: regex.compile(rf"{_SPACE}+"),
}
_OVERLAP_SNAP = regex.compile(rf"{_SPACE}+|{_CJK_STOPS}+{_CJK_CLOSERS}*")

_CLUSTER = regex.compile(r"\X")
# Characters whose Grapheme_Cluster_Break value lets them join a neighbour. Every
# UAX #29 rule that forbids a break has one of these on one side of it (CR before LF,
# Prepend before anything, Extend/ZWJ/SpacingMark after anything, Hangul jamo and
# syllables, regional indicators, ZWJ or an Indic linker before a letter). Between two
# other characters there is always a boundary, so \X only runs near these.
_JOINING_RUN = regex.compile(
    r"[\p{GCB=CR}\p{GCB=Prepend}\p{GCB=Extend}\p{GCB=ZWJ}\p{GCB=SpacingMark}"
    r"\p{GCB=Regional_Indicator}\p{GCB=L}\p{GCB=V}\p{GCB=T}\p{GCB=LV}\p{GCB=LVT}]+"
)


def split_span(
    text: str,
    start: int,
    end: int,
    *,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    overlap_tokens: int = 0,
    hard_boundaries: Sequence[int] = (),
) -> list[tuple[int, int]]:
    """Split ``text[start:end]`` into child spans that each fit ``max_tokens``.

    The cut points follow the rule in this module's docstring: as large as fits,
    at the best natural boundary in the second half of what fits.

    Args:
        text: The whole decoded source. Offsets are indices into it.
        start: Where the span begins. Should be a grapheme-cluster boundary of
            ``text`` (0, a file start, or an offset this function returned);
            otherwise cluster boundaries are those of ``text[start:end]`` alone.
        end: Where the span ends (exclusive).
        max_tokens: Most tokens a child span may count, at least 1: the model's
            window less the instructions, the answer and a safety margin.
        count_tokens: Counts the tokens of a string. It is called once on the
            whole span, then on prefixes of each window: two to four calls per
            child span (benchmarks/split_speed.py), never once per character.
        overlap_tokens: Most tokens consecutive child spans share; clamped to
            ``max_tokens // 2``. 0 makes them adjacent.
        hard_boundaries: Offsets preferred over any other cut, such as file starts.
            Offsets outside the span, or inside a grapheme cluster (a file that
            begins with a combining mark), are ignored.

    Returns:
        ``(start_i, end_i)`` pairs, in order: the first starts at ``start``, the
        last ends at ``end``, starts and ends both strictly increase, and each
        child span begins at or before the previous one's end. Each child span
        counts at most ``max_tokens`` unless it is one grapheme cluster. If the
        whole span fits (or is empty), the list is ``[(start, end)]``.

    Raises:
        ValueError: ``start`` and ``end`` do not delimit a span of ``text``.
        ConfigError: ``max_tokens`` is below 1 or ``overlap_tokens`` below 0.
    """
    _check_arguments(text, start, end, max_tokens, overlap_tokens)

    total = count_tokens(text[start:end])
    if total <= max_tokens or start == end:
        return [(start, end)]

    splitter = _SpanSplitter(
        text,
        start,
        end,
        max_tokens=max_tokens,
        count_tokens=count_tokens,
        overlap_tokens=min(overlap_tokens, max_tokens // 2),
        hard_boundaries=sorted({b for b in hard_boundaries if start < b < end}),
        chars_per_token=(end - start) / total,
    )
    children = splitter.split()
    logger.debug(
        "split span %d-%d (%d tokens) into %d child spans",
        start,
        end,
        total,
        len(children),
    )

    return children


def _check_arguments(
    text: str, start: int, end: int, max_tokens: int, overlap_tokens: int
) -> None:
    if not 0 <= start <= end <= len(text):
        msg = (
            f"Span {start}-{end} is not inside the text (length {len(text)}); "
            "pass offsets with 0 <= start <= end <= len(text)."
        )
        raise ValueError(msg)
    if max_tokens < 1:
        msg = (
            f"max_tokens must be at least 1, got {max_tokens}: no room is left for "
            "source text once the instructions and the answer are reserved. Use a "
            "model with a larger window or shorter instructions."
        )
        raise ConfigError(msg)
    if overlap_tokens < 0:
        msg = f"overlap_tokens must be 0 or more, got {overlap_tokens}."
        raise ConfigError(msg)


class _SpanSplitter:
    """The working state of one :func:`split_span` call; used once, then dropped."""

    def __init__(
        self,
        text: str,
        start: int,
        end: int,
        *,
        max_tokens: int,
        count_tokens: Callable[[str], int],
        overlap_tokens: int,
        hard_boundaries: list[int],
        chars_per_token: float,
    ) -> None:
        self._text = text
        self._start = start
        self._end = end
        self._max_tokens = max_tokens
        self._count_tokens = count_tokens
        self._overlap_tokens = overlap_tokens
        self._hard = hard_boundaries
        self._chars_per_token = chars_per_token

    def split(self) -> list[tuple[int, int]]:
        """Cut the whole span, child span by child span."""
        children: list[tuple[int, int]] = []
        start = floor = self._start
        while True:
            found = self._next_end(start, floor)
            if found is None:
                start = floor
                continue
            cut, clusters = found
            children.append((start, cut))
            if cut == self._end:
                return children
            start, floor = self._overlap_start(start, cut, clusters), cut

    def _next_end(self, start: int, floor: int) -> tuple[int, _Clusters] | None:
        """Return the end of the child span at ``start``; it lies after ``floor``.

        Returns None when nothing after ``floor`` fits and ``start`` lies before
        ``floor``, that is, when the overlap leaves no room.
        """
        clusters: _Clusters | None = None
        too_long = self._end + 1
        while True:
            window = self._fit_window(start, too_long)
            if clusters is None:
                clusters = _Clusters(self._text, start, window, self._end)
            if window == self._end:
                return window, clusters

            cut = self._choose_cut(window, floor, clusters)
            if cut is None and start < floor:
                return None
            if cut is None:
                return _first_cluster_end(self._text, start, self._end), clusters
            if cut == window or self._count(start, cut) <= self._max_tokens:
                return cut, clusters
            too_long = cut

    def _fit_window(self, start: int, too_long: int) -> int:
        """Return ``w < too_long`` with ``text[start:w]`` within budget, near the most.

        Returns ``start`` when not even one character fits.
        """
        fits = start
        overshot = False
        guess = start + max(1, int(self._max_tokens * self._chars_per_token))
        for step in range(_MAX_FIT_STEPS):
            if too_long - fits <= 1:
                break
            if guess >= too_long > self._end:
                window = self._end
            elif step >= _INTERPOLATION_STEPS or not fits < guess < too_long:
                window = (fits + too_long) // 2
            else:
                window = guess

            tokens = self._count(start, window)
            if tokens > 0:
                self._chars_per_token = (window - start) / tokens
            if tokens > self._max_tokens:
                too_long, overshot = window, True
            else:
                fits = window
                full = tokens >= self._max_tokens * (1 - _FIT_TOLERANCE)
                if full or window == self._end:
                    break

            # After one overshoot, aim a little low: landing inside the tolerance
            # costs one count, landing over the budget costs at least two.
            aim = self._max_tokens * (1 - _FIT_TOLERANCE / 2 if overshot else 1)
            guess = start + int(aim * self._chars_per_token)

        return fits

    def _choose_cut(self, window: int, floor: int, clusters: _Clusters) -> int | None:
        """Return the cut in ``(floor, window]`` by the level rule, or None."""
        if window <= floor:
            return None

        low = floor + (window - floor + 1) // 2
        for level in (FILE, SECTION, PARAGRAPH, SENTENCE, LINE, WORD):
            cut = self._last_boundary(level, low, window, clusters)
            if cut is not None:
                logger.debug("cut at %d (%s)", cut, level.name)
                return cut

        cut = clusters.floor(window)
        if cut <= floor:
            return None
        logger.debug("cut at %d (%s)", cut, GRAPHEME.name)
        return cut

    def _last_boundary(
        self, level: Boundary, low: int, high: int, clusters: _Clusters
    ) -> int | None:
        """Return the last ``level`` boundary in ``[low, high]``, if any."""
        if level == FILE:
            index = bisect.bisect_right(self._hard, high)
            while index > 0 and self._hard[index - 1] >= low:
                index -= 1
                if clusters.is_boundary(self._hard[index]):
                    return self._hard[index]
            return None

        # Scan backwards in growing slices: the last boundary is usually near
        # `high`, and a word-level scan of the whole region would build hundreds
        # of match objects per cut.
        size = _FIRST_SLICE_CHARS
        while True:
            slice_low = max(low, high - size)
            found = self._last_match_end(level, slice_low, high, clusters)
            if found is not None or slice_low == low:
                return found
            high, size = slice_low - 1, size * 4

    def _last_match_end(
        self, level: Boundary, low: int, high: int, clusters: _Clusters
    ) -> int | None:
        last = None
        scan_from = max(self._start, low - _CONTEXT_BEFORE_CHARS)
        scan_to = min(self._end, high + _CONTEXT_AFTER_CHARS)
        for match in _LEVEL_PATTERNS[level].finditer(self._text, scan_from, scan_to):
            position = match.end()
            if position > high:
                break
            if position >= low and clusters.is_boundary(position):
                last = position

        return last

    def _overlap_start(self, start: int, cut: int, clusters: _Clusters) -> int:
        """Return where the child span after ``cut`` starts: in ``(start, cut]``."""
        if self._overlap_tokens == 0:
            return cut
        # Overlap carries text that straddles a cut; nothing straddles a file
        # start, so the overlap never reaches back across one.
        fence = self._last_boundary(FILE, start + 1, cut, clusters)
        if fence == cut:
            return cut
        earliest = start + 1 if fence is None else fence

        guess = cut - int(self._overlap_tokens * self._chars_per_token)
        for _ in range(_MAX_OVERLAP_STEPS):
            low = max(guess, earliest)
            begin = low if low == fence else self._snap_overlap(low, cut, clusters)
            if begin >= cut:
                return cut
            tokens = self._count(begin, cut)
            if tokens <= self._overlap_tokens:
                return begin
            shorter = (cut - begin) * self._overlap_tokens // tokens
            guess = max(begin + 1, cut - shorter)

        return cut

    def _snap_overlap(self, low: int, cut: int, clusters: _Clusters) -> int:
        """Return the first word start or CJK sentence end at or after ``low``.

        Falls back to the first grapheme-cluster boundary at or after ``low``.
        """
        scan_from = max(self._start, low - 1)
        for match in _OVERLAP_SNAP.finditer(self._text, scan_from, cut):
            position = match.end()
            if low <= position < cut and clusters.is_boundary(position):
                return position

        return clusters.ceil(low)

    def _count(self, begin: int, end: int) -> int:
        return self._count_tokens(self._text[begin:end])


class _Clusters:
    """Grapheme-cluster boundaries of ``text`` between a known boundary and a limit.

    Positions in ``[start, limit]`` are answered exactly; ``start`` must itself be
    a boundary. Only clusters longer than one character are stored.
    """

    def __init__(self, text: str, start: int, limit: int, end: int) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        for run_start, run_end in _joining_runs(text, start, min(end, limit + 1)):
            # A run starts two or more characters after the previous one ended, so
            # the character before it starts a cluster (or is the known boundary).
            scan_from = max(start, run_start - 1)
            for match in _CLUSTER.finditer(text, scan_from, end):
                first, last = match.span()
                if last - first > 1:
                    self._firsts.append(first)
                    self._lasts.append(last)
                if last >= run_end:
                    break

    def is_boundary(self, position: int) -> bool:
        """Whether no cluster spans ``position``."""
        return self._enclosing(position) < 0

    def floor(self, position: int) -> int:
        """Return the last boundary at or before ``position``."""
        index = self._enclosing(position)
        return position if index < 0 else self._firsts[index]

    def ceil(self, position: int) -> int:
        """Return the first boundary at or after ``position``."""
        index = self._enclosing(position)
        return position if index < 0 else self._lasts[index]

    def _enclosing(self, position: int) -> int:
        index = bisect.bisect_left(self._firsts, position) - 1
        if index >= 0 and self._lasts[index] > position:
            return index
        return -1


def _joining_runs(text: str, start: int, stop: int) -> list[tuple[int, int]]:
    """Return runs of joining characters in ``text[start:stop]``, merged when close.

    Runs less than two characters apart are merged, so that a cluster that ends
    one character after a run cannot reach into the next run.
    """
    if text[start:stop].isascii() and text.find("\r", start, stop) < 0:
        return []

    runs: list[tuple[int, int]] = []
    for match in _JOINING_RUN.finditer(text, start, stop):
        run_start, run_end = match.span()
        if runs and run_start - runs[-1][1] < 2:
            runs[-1] = (runs[-1][0], run_end)
        else:
            runs.append((run_start, run_end))

    return runs


def _first_cluster_end(text: str, start: int, end: int) -> int:
    match = _CLUSTER.match(text, start, end)
    assert match is not None  # start < end, and \X matches any character
    return match.end()
