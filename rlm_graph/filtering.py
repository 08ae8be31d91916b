"""The pre-filter: a regular expression that lets a span be skipped unread.

A filter may come from the user (``--filter``) or from the planning model. A
pattern with nested repeats such as ``(\\s*\\w+\\s*)*:::`` can backtrack for
hours on text it almost matches, so every search runs with a time cap (the
``regex`` engine stops itself and raises :class:`TimeoutError`; it also lets
Ctrl-C in between). Matches that lie inside the ``=== file: NAME ===`` header
lines the loader adds are not the source's words and do not count.
"""

from __future__ import annotations

import regex

from rlm_graph.source import FILE_HEADER_MARK

__all__ = ["FILTER_SECONDS", "compile_filter", "filter_matches"]

FILTER_SECONDS = 2.0
"""Time cap for one filter search (of the whole source when the plan is checked,
of one span while running)."""


def compile_filter(pattern: str) -> regex.Pattern[str]:
    """Compile a filter (case-insensitive); raises ``regex.error`` when invalid."""
    return regex.compile(pattern, regex.IGNORECASE)


def filter_matches(
    compiled: regex.Pattern[str], text: str, start: int = 0, end: int | None = None,
    *, timeout: float | None = None,
) -> bool:
    """Whether the filter matches ``text[start:end]`` outside file header lines.

    Raises:
        TimeoutError: the search took longer than ``timeout`` seconds
            (default :data:`FILTER_SECONDS`).
    """
    end = len(text) if end is None else end
    cap = FILTER_SECONDS if timeout is None else timeout
    for match in compiled.finditer(text, start, end, timeout=cap):
        if not _in_header(text, match.start(), match.end()):
            return True
    return False


def _in_header(text: str, start: int, end: int) -> bool:
    line_start = text.rfind("\n", 0, start) + 1
    if not text.startswith(FILE_HEADER_MARK, line_start):
        return False
    line_end = text.find("\n", start)
    return end <= (len(text) if line_end < 0 else line_end)
