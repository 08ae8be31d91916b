"""Tests for rlm_graph.split: every point of the split_span contract, K01 and K07."""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlm_graph import split
from rlm_graph.errors import ConfigError
from rlm_graph.split import (
    FILE,
    GRAPHEME,
    LINE,
    PARAGRAPH,
    SECTION,
    SENTENCE,
    WORD,
    Boundary,
    split_span,
)

Counter = Callable[[str], int]


@functools.cache
def _cl100k() -> Counter:
    """Return a cl100k token counter read from litellm's bundled copy, offline."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None, "litellm is not installed"
    cache_dir = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
    assert cache_dir.is_dir(), f"no bundled tokenizer files in {cache_dir}"

    import tiktoken

    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        encoding = tiktoken.get_encoding("cl100k_base")
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous

    return lambda text: len(encoding.encode(text, disallowed_special=()))


def cl100k(text: str) -> int:
    """Count tokens as OpenAI's cl100k_base does."""
    return _cl100k()(text)


def lumpy(text: str) -> int:
    """A counter that is not monotone: a text ending in whitespace costs 3 more."""
    return len(text) + (3 if text and text[-1].isspace() else 0)


def cluster_boundaries(text: str) -> list[int]:
    """Return every grapheme-cluster boundary of the whole text, 0 included."""
    boundaries = [0]
    for match in regex.finditer(r"\X", text):
        boundaries.append(match.end())
    return boundaries


def assert_valid_pieces(
    text: str,
    start: int,
    end: int,
    pieces: list[tuple[int, int]],
    *,
    max_tokens: int,
    count_tokens: Counter,
    overlap_tokens: int = 0,
    hard_boundaries: Sequence[int] = (),
) -> None:
    """Assert every point of the split_span contract for one result."""
    boundaries = cluster_boundaries(text)
    boundary_set = set(boundaries)

    # Cover the span, in order.
    assert pieces, "no child spans"
    assert pieces[0][0] == start
    assert pieces[-1][1] == end
    if count_tokens(text[start:end]) <= max_tokens:
        assert pieces == [(start, end)]
        return
    for (s1, e1), (s2, e2) in zip(pieces, pieces[1:], strict=False):
        assert s1 < s2, f"starts not increasing: {(s1, e1)} then {(s2, e2)}"
        assert e1 < e2, f"ends not increasing: {(s1, e1)} then {(s2, e2)}"
        assert s2 <= e1, f"gap between {(s1, e1)} and {(s2, e2)}"
        # With both ends strictly increasing no span can contain another; K07
        # is the case of a tail span inside its predecessor.
        assert not (s1 <= s2 and e2 <= e1)
        assert not (s2 <= s1 and e1 <= e2)

    # Fit the budget, unless one grapheme cluster.
    for s, e in pieces:
        assert s < e
        if count_tokens(text[s:e]) > max_tokens:
            inner = [b for b in boundaries if s < b < e]
            assert not inner, f"{(s, e)} is over budget and could be cut at {inner}"

    # Cut only at grapheme-cluster boundaries.
    for s, e in pieces:
        if s != start:
            assert s in boundary_set, f"start {s} splits a cluster in {text[s-3:s+3]!r}"
        if e != end:
            assert e in boundary_set, f"end {e} splits a cluster in {text[e-3:e+3]!r}"

    # Overlap within its clamped budget; none means adjacent.
    overlap_budget = min(overlap_tokens, max_tokens // 2)
    for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False):
        if overlap_budget == 0:
            assert s2 == e1
        else:
            assert count_tokens(text[s2:e1]) <= overlap_budget

    # Overlap never reaches back across a (usable) hard boundary.
    fences = [b for b in hard_boundaries if start < b < end and b in boundary_set]
    for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False):
        assert not [b for b in fences if s2 < b <= e1]


def split_all(
    text: str,
    max_tokens: int,
    *,
    overlap_tokens: int = 0,
    hard_boundaries: Sequence[int] = (),
) -> list[tuple[int, int]]:
    """Split the whole text with count_tokens=len and check the result."""
    pieces = split_span(
        text,
        0,
        len(text),
        max_tokens=max_tokens,
        count_tokens=len,
        overlap_tokens=overlap_tokens,
        hard_boundaries=hard_boundaries,
    )
    assert_valid_pieces(
        text,
        0,
        len(text),
        pieces,
        max_tokens=max_tokens,
        count_tokens=len,
        overlap_tokens=overlap_tokens,
        hard_boundaries=hard_boundaries,
    )
    return pieces


def cuts(pieces: list[tuple[int, int]]) -> list[int]:
    return [e for _, e in pieces[:-1]]


# --- the API -------------------------------------------------------------------


def test_boundary_levels_are_ordered_from_file_to_grapheme() -> None:
    levels = [FILE, SECTION, PARAGRAPH, SENTENCE, LINE, WORD, GRAPHEME]
    assert levels == list(Boundary)
    assert [int(level) for level in levels] == list(range(7))


def test_exported_names_exist() -> None:
    assert len(set(split.__all__)) == len(split.__all__)
    for name in split.__all__:
        assert hasattr(split, name)


@pytest.mark.parametrize(
    ("start", "end"), [(-1, 3), (3, 2), (0, 11), (11, 11)], ids=str
)
def test_span_outside_the_text_is_rejected(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="not inside the text"):
        split_span("0123456789", start, end, max_tokens=5, count_tokens=len)


def test_budgets_below_their_minimum_are_rejected() -> None:
    with pytest.raises(ConfigError, match="max_tokens must be at least 1"):
        split_span("abc", 0, 3, max_tokens=0, count_tokens=len)
    with pytest.raises(ConfigError, match="overlap_tokens must be 0 or more"):
        split_span("abc", 0, 3, max_tokens=2, count_tokens=len, overlap_tokens=-1)


# --- covering, fitting, whole spans --------------------------------------------


@pytest.mark.parametrize("count_tokens", [len, cl100k], ids=["len", "cl100k"])
def test_span_that_fits_is_returned_whole(count_tokens: Counter) -> None:
    text = "Short text.\n\nTwo paragraphs, still short."
    pieces = split_span(text, 0, len(text), max_tokens=100, count_tokens=count_tokens)
    assert pieces == [(0, len(text))]


def test_empty_span_is_returned_whole() -> None:
    assert split_span("abc", 1, 1, max_tokens=1, count_tokens=len) == [(1, 1)]


def test_span_inside_the_text_keeps_absolute_offsets() -> None:
    text = "HEADER " + "word " * 100 + "FOOTER"
    start, end = 7, 7 + 5 * 100
    pieces = split_span(text, start, end, max_tokens=60, count_tokens=len)
    assert_valid_pieces(text, start, end, pieces, max_tokens=60, count_tokens=len)
    assert all(text[e - 1] == " " for _, e in pieces)


def test_tiktoken_pieces_fit_and_cover_the_text() -> None:
    text = " ".join(f"Sentence number {i} says something." for i in range(300))
    pieces = split_span(text, 0, len(text), max_tokens=100, count_tokens=cl100k)
    assert_valid_pieces(
        text, 0, len(text), pieces, max_tokens=100, count_tokens=cl100k
    )
    assert len(pieces) > 10
    # Greedy: every span but the last uses most of the budget.
    assert all(cl100k(text[s:e]) > 50 for s, e in pieces[:-1])


def test_counter_that_is_not_monotone_still_gets_pieces_that_fit() -> None:
    text = "alpha beta gamma delta " * 40
    pieces = split_span(text, 0, len(text), max_tokens=30, count_tokens=lumpy)
    assert_valid_pieces(text, 0, len(text), pieces, max_tokens=30, count_tokens=lumpy)


# --- grapheme clusters ---------------------------------------------------------


def test_single_cluster_over_budget_is_one_piece() -> None:
    cluster = "e" + "\u0301" * 30
    text = "ab" + cluster + "cd"
    pieces = split_all(text, 3)
    assert (2, 2 + len(cluster)) in pieces


@pytest.mark.parametrize(
    "unit",
    [
        "\r\n",
        "👍🏽",
        "👨\u200d👩\u200d👧\u200d👦",
        "🇺🇸🇫🇷",
        "e\u0301\u0323",
        "\u0915\u094d\u0937",
        "\u1100\u1161\u11a8",
        "\u0600\u0661",
    ],
    ids=[
        "crlf",
        "skin-tone",
        "zwj-family",
        "flags",
        "marks",
        "conjunct",
        "jamo",
        "prepend",
    ],
)
def test_hard_cuts_never_split_a_cluster(unit: str) -> None:
    text = ("x" + unit) * 40
    for max_tokens in (1, 2, 3, 5, 7):
        split_all(text, max_tokens)


def test_hard_boundary_inside_a_cluster_is_ignored() -> None:
    text = "x" * 60 + "e\u0301" + "y" * 100
    inside = text.index("\u0301")
    pieces = split_all(text, 100, hard_boundaries=[inside])
    assert inside not in cuts(pieces)


# --- boundary preference -------------------------------------------------------


def test_paragraph_beats_a_later_sentence_end() -> None:
    text = "A" * 50 + ". " + "B" * 20 + ".\n\n" + "C" * 10 + ". " + "D" * 100
    assert cuts(split_all(text, 100))[0] == text.index("\n\n") + 2


def test_heading_beats_a_later_paragraph() -> None:
    text = "x" * 55 + "\n\n# Heading\n" + "y" * 10 + "\n\n" + "z" * 100
    assert cuts(split_all(text, 100))[0] == text.index("#")


@pytest.mark.parametrize(
    "line",
    ["CHAPTER X", "Chapter 12", "Chapter 12: The Storm", "BOOK", "PART", "Part One"],
)
def test_chapter_lines_are_sections(line: str) -> None:
    text = "x" * 55 + "\n" + line + "\n" + "y" * 10 + "\n\n" + "z" * 100
    assert cuts(split_all(text, 100))[0] == 56


@pytest.mark.parametrize("line", ["Part of the plan", "Chapter 3 of the report"])
def test_prose_starting_like_a_chapter_is_not_a_section(line: str) -> None:
    text = "x" * 55 + "\n" + line + "\n" + "y" * 5 + "\n\n" + "z" * 100
    assert cuts(split_all(text, 100))[0] == text.index("\n\n") + 2


def test_three_line_breaks_are_a_section() -> None:
    text = "a" * 55 + "\n\n\n" + "b" * 10 + "\n\n" + "c" * 100
    assert cuts(split_all(text, 100))[0] == 58


def test_hard_boundary_beats_a_later_section() -> None:
    text = "a" * 60 + "b" * 25 + "\n\n# Next\n" + "c" * 100
    assert cuts(split_all(text, 100, hard_boundaries=[60]))[0] == 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 60 + ". " + "b" * 20 + "\n" + "c" * 100, 62),  # sentence > line
        ("a" * 60 + "\n" + "b b b b b" + "c" * 100, 61),  # line > word
        ("a" * 60 + " " + "b" * 100, 61),  # word > grapheme
        ("a" * 150, 100),  # grapheme: a hard cut, as large as fits
        ("你" * 60 + "。" + "好" * 100, 61),  # CJK sentence end needs no space
        ("你" * 60 + "」。」" + "好" * 100, 63),  # closing brackets stay before the cut
        ("a" * 60 + "\r\n\r\n" + "b" * 20 + ". " + "c" * 100, 64),  # CRLF paragraph
        ("a" * 60 + "\r\r" + "b" * 20 + ". " + "c" * 100, 62),  # CR paragraph
        ("a" * 60 + "\r\n" + "b b b" + "c" * 100, 62),  # CRLF line
    ],
    ids=[
        "sentence",
        "line",
        "word",
        "grapheme",
        "cjk",
        "cjk-closer",
        "crlf",
        "cr",
        "crlf-line",
    ],
)
def test_best_level_in_the_second_half_wins(text: str, expected: int) -> None:
    assert cuts(split_all(text, 100))[0] == expected


def test_boundary_in_the_first_half_is_not_used() -> None:
    # A heading 10 characters in would make a tiny piece; a word boundary near the
    # end of the window is taken instead.
    text = "x" * 10 + "\n# Early\n" + "word " * 40
    first_end = cuts(split_all(text, 100))[0]
    assert 90 <= first_end <= 100


def test_last_boundary_of_the_winning_level_is_taken() -> None:
    text = ("Sentence here. " * 12) + "z" * 100
    first_end = cuts(split_all(text, 100))[0]
    assert first_end == 90  # six sentences of 15 characters


# --- overlap -------------------------------------------------------------------


def test_no_overlap_gives_adjacent_pieces() -> None:
    text = "one two three four five six seven eight nine ten " * 20
    pieces = split_all(text, 40)
    assert all(e1 == s2 for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False))


def test_overlap_starts_at_a_word_and_stays_within_budget() -> None:
    text = "one two three four five six seven eight nine ten " * 20
    pieces = split_all(text, 40, overlap_tokens=10)
    for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False):
        assert 0 < e1 - s2 <= 10
        assert text[s2 - 1] == " "


def test_overlap_is_clamped_to_half_the_budget() -> None:
    text = "abcdefghij" * 50
    pieces = split_all(text, 40, overlap_tokens=1000)
    overlaps = [e1 - s2 for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False)]
    assert max(overlaps) == 20


def test_overlap_never_reaches_back_across_a_file_start() -> None:
    files = ["first file text " * 5, "second file text " * 5, "third file " * 9]
    starts = [0, len(files[0]), len(files[0]) + len(files[1])]
    text = "".join(files)
    pieces = split_all(text, 90, overlap_tokens=30, hard_boundaries=starts)
    for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False):
        crossed = [b for b in starts if s2 < b <= e1]
        assert not crossed, f"overlap {s2}-{e1} reaches back across {crossed}"


def test_overlap_with_tiktoken_stays_within_budget() -> None:
    text = " ".join(f"Item {i} costs {i * 3} coins." for i in range(400))
    pieces = split_span(
        text, 0, len(text), max_tokens=80, count_tokens=cl100k, overlap_tokens=15
    )
    assert_valid_pieces(
        text,
        0,
        len(text),
        pieces,
        max_tokens=80,
        count_tokens=cl100k,
        overlap_tokens=15,
    )
    assert all(e1 > s2 for (_, e1), (s2, _) in zip(pieces, pieces[1:], strict=False))


# --- known failures ------------------------------------------------------------


def _k01_page(with_newlines: bool = True, with_spaces: bool = True) -> str:
    words = "the river ran past the mill and under the old stone bridge".split()
    lines, line, size = [], [], 0
    while size < 5000:
        word = words[len(line) % len(words)]
        line.append(word)
        size += len(word) + 1
        if len(line) == 9:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    text = ("\n" if with_newlines else " ").join(lines)
    if not with_spaces:
        text = text.replace(" ", "").replace("\n", "")
        text = (text * 2)[:5000]
    return text[:5000]


@pytest.mark.parametrize(
    ("with_newlines", "with_spaces", "cut_after"),
    [(True, True, "\n"), (False, True, " "), (False, False, None)],
    ids=["lines", "words", "hard-cut"],
)
def test_k01_no_paragraph_break_falls_back_and_terminates(
    with_newlines: bool, with_spaces: bool, cut_after: str | None
) -> None:
    text = _k01_page(with_newlines, with_spaces)
    assert len(text) == 5000 and "\n\n" not in text

    began = time.perf_counter()
    pieces = split_all(text, 1000)
    assert time.perf_counter() - began < 1.0

    assert "".join(text[s:e] for s, e in pieces) == text
    for cut in cuts(pieces):
        if cut_after is None:
            assert cut % 1000 == 0
        else:
            assert text[cut - 1] == cut_after


@pytest.mark.parametrize(
    "text",
    [
        "x" * 556,
        " ".join(["lorem", "ipsum", "dolor", "sit", "amet", "elit"] * 30)[:556],
    ],
    ids=["no-boundaries", "words"],
)
def test_k07_no_tail_piece_inside_the_previous_one(text: str) -> None:
    assert len(text) == 556
    pieces = split_all(text, 200, overlap_tokens=20)
    assert len(pieces) == 3
    assert pieces[-1][1] == 556
    if text == "x" * 556:
        assert pieces == [(0, 200), (180, 380), (360, 556)]


# --- speed -----------------------------------------------------------------------


def test_tokens_are_counted_a_few_times_per_piece_not_per_character() -> None:
    text = "\n\n".join(
        " ".join(f"Fact {i}.{j} is stated here." for j in range(8))
        for i in range(1200)
    )
    calls, chars = [0], [0]

    def counting(piece: str) -> int:
        calls[0] += 1
        chars[0] += len(piece)
        return cl100k(piece)

    pieces = split_span(text, 0, len(text), max_tokens=500, count_tokens=counting)

    assert len(pieces) > 50
    assert calls[0] <= 4 * len(pieces) + 1
    assert chars[0] <= 5 * len(text)


# --- properties ----------------------------------------------------------------

_FRAGMENTS = [
    "a", "word", "Mr.", " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\r\n\r\n",
    "\r\r", "\n\n\n", ". ", "!", "? ", '." ', ")", "\xa0", "\u3000",
    "你", "好", "世界", "。", "！", "？", "」",
    "👍", "👍🏽", "🏽", "👨\u200d👩\u200d👧", "\u200d", "🇺🇸", "🇫🇷", "🇺",
    "e\u0301", "\u0301", "\u0915\u094d\u0937", "\u0600", "한국", "\u1100\u1161\u11a8",
    "# Title\n", "CHAPTER X\n", "Chapter 12\n", "BOOK\n", "Part One\n",
]  # fmt: skip

adversarial_text = st.one_of(
    st.lists(st.sampled_from(_FRAGMENTS), max_size=120).map("".join),
    st.text(max_size=150),
    st.text(alphabet="你好世界中文字的是了。！？「」", max_size=300),
    st.lists(st.sampled_from(["lorem", "ipsum", "dolor", " "]), max_size=150).map(
        "".join
    ),
    st.text(alphabet=" \t\n\r\u3000\xa0", max_size=80),
)
counters = st.sampled_from([len, cl100k, lumpy])


class Case(NamedTuple):
    """One drawn split_span call."""

    text: str
    start: int
    end: int
    max_tokens: int
    count_tokens: Counter
    overlap_tokens: int
    hard_boundaries: list[int]


@st.composite
def split_cases(draw: st.DrawFn) -> Case:
    text = draw(adversarial_text)
    boundaries = cluster_boundaries(text)
    first = draw(st.integers(0, len(boundaries) - 1))
    last = draw(st.integers(first, len(boundaries) - 1))
    max_tokens = draw(st.integers(1, 50))
    return Case(
        text=text,
        start=boundaries[first],
        end=boundaries[last],
        max_tokens=max_tokens,
        count_tokens=draw(counters),
        overlap_tokens=draw(st.integers(0, max_tokens)),
        hard_boundaries=draw(st.lists(st.integers(0, len(text)), max_size=5)),
    )


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(split_cases())
def test_any_input_gives_valid_pieces(case: Case) -> None:
    pieces = split_span(
        case.text,
        case.start,
        case.end,
        max_tokens=case.max_tokens,
        count_tokens=case.count_tokens,
        overlap_tokens=case.overlap_tokens,
        hard_boundaries=case.hard_boundaries,
    )
    assert_valid_pieces(
        case.text,
        case.start,
        case.end,
        pieces,
        max_tokens=case.max_tokens,
        count_tokens=case.count_tokens,
        overlap_tokens=case.overlap_tokens,
        hard_boundaries=case.hard_boundaries,
    )


@settings(max_examples=800, deadline=None)
@given(st.one_of(adversarial_text, st.text(max_size=400)), st.data())
def test_cluster_index_agrees_with_regex_x(text: str, data: st.DataObject) -> None:
    boundaries = cluster_boundaries(text)
    start = data.draw(st.sampled_from(boundaries))
    expected = {b for b in boundaries if b >= start}

    clusters = split._Clusters(text, start, len(text), len(text))

    found = {p for p in range(start, len(text) + 1) if clusters.is_boundary(p)}
    assert found == expected
    for p in range(start, len(text) + 1):
        assert clusters.floor(p) == max(b for b in expected if b <= p)
        assert clusters.ceil(p) == min(b for b in expected if b >= p)
