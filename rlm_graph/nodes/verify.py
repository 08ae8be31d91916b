"""Verify: check a leaf answer before it is used.

A leaf's reply must be complete (not cut off by the output limit), must not be
empty or a refusal, must parse into the answer kind, and every quote it offers
as evidence must occur in the leaf's own span. A quote is searched exactly
first, then tolerant of whitespace, case and quote-mark style; a found quote
becomes :class:`Evidence` with exact offsets. A failed check comes back with a
reason the model can act on when it is asked again.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import regex
from pydantic import BaseModel, ValidationError

from rlm_graph.models import Completion
from rlm_graph.nodes.prompts import JOIN_MAX_MATCHES, LIST_MAX_ITEMS, evidence_field
from rlm_graph.nodes.types import Answer, Evidence, Item, Kind, Match, Record, Row, Task, entity_key
from rlm_graph.source import FILE_HEADER_MARK

__all__ = ["Claims", "Verdict", "locate_quote", "question_overlap", "verify_leaf"]

MIN_QUOTE_CHARS = 8
# Straight, curly and typewriter-style quote marks are interchangeable in a quote.
_QUOTE_MARKS = "'\u2018\u2019`\"\u201c\u201d"
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i cannot|i can'?t|i won'?t|i am unable|i'm unable|"
    r"as an ai)\b",
    re.IGNORECASE,
)


_NOT_STATED = re.compile(r"^\W*(not stated|unknown|none|n/?a|no answer)\W*$", re.IGNORECASE)
_SENTENCE = regex.compile(
    r"(?:[^.!?\n]|\n(?![ \t]*\n))+(?:[.!?]+['\"\u2019\u201d]*|(?=\n[ \t]*\n)|$)", regex.V1
)
_SENTENCE_END = regex.compile(r"[.!?]+['\"\u2019\u201d)\]]*(?=\s|$)")
_LINE = regex.compile(r"[^\n]+")
LINE_ORIENTED_ENDS = 0.1
"""A span with fewer sentence ends than this per non-blank line is
line-oriented (logs, CSV, lists): its sentences never run across a line break."""
MAX_SENTENCE_CHARS = 600
"""A "sentence" of prose longer than this that runs across line breaks is
split at them (unpunctuated text would otherwise make one blob of many lines)."""
_STOP_WORDS = frozenset(
    "the and was were for that this with from are his her she him they them their "
    "what who which when where why how did does not but had has have been into "
    "there then than its it's you your our out about would could should answer "
    "text excerpt question".split()
)
# Words that carry no answer on their own: articles, pronouns, prepositions,
# conjunctions and auxiliaries (short ones included, unlike _STOP_WORDS).
# Quantifiers and "no" are left out: "all", "none" or "no" can be an answer.
_FUNCTION_WORDS = _STOP_WORDS | frozenset(
    "a an of in on at to by as if or so up it he me my we us i is am be do "
    "nor yet also just only very too here these those whom whose this that "
    "mine yours hers ours theirs himself herself itself themselves "
    "onto upon over under after before between through during without within "
    "because while since until unless whether "
    "being having doing done will shall can may might must".split()
)
# A unit alone answers no "how long / how much" question: the value is missing.
_BARE_UNITS = frozenset(
    "ms msec s sec secs second seconds min mins minute minutes h hr hrs hour hours "
    "day days kb mb gb tb bytes kg g mg km m cm mm percent pct".split()
)
# Past forms of common verbs, so "took" is seen as the question's "take".
_IRREGULAR = {
    form: base
    for base, forms in {
        "take": "took taken", "go": "went gone", "come": "came", "make": "made",
        "give": "gave given", "get": "got gotten", "say": "said", "see": "saw seen",
        "know": "knew known", "find": "found", "tell": "told", "think": "thought",
        "feel": "felt", "keep": "kept", "meet": "met", "pay": "paid", "send": "sent",
        "spend": "spent", "stand": "stood", "begin": "began begun", "run": "ran",
        "write": "wrote written", "buy": "bought", "bring": "brought", "hold": "held",
        "lose": "lost", "sell": "sold", "win": "won", "eat": "ate eaten",
        "fall": "fell fallen", "grow": "grew grown", "draw": "drew drawn",
        "choose": "chose chosen", "speak": "spoke spoken", "break": "broke broken",
        "build": "built", "catch": "caught", "teach": "taught", "sit": "sat",
        "drive": "drove driven", "fly": "flew flown", "become": "became",
        "mean": "meant", "hear": "heard", "do": "did done", "be": "was were been",
        "have": "had", "sing": "sang sung", "drink": "drank drunk", "swim": "swam swum",
    }.items()
    for form in forms.split()
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verify decided about one leaf reply."""

    ok: bool
    code: str
    """ok, truncated, empty, refused, malformed (not the kind's shape),
    restated, no-evidence (a quote is not in the span), unbacked (a count its
    quotes do not add up to), too-many (a reply holding exactly its schema's cap
    of items or quotes, or counting more than it may quote: what did not fit
    may be missing, so the span is split, never taken as complete)."""
    answer: Answer | None = None
    feedback: str | None = None
    """Why the reply was rejected, worded for the model."""
    focus: Evidence | None = None
    """For a rejected short answer that only restated the question: the sentence
    of the span it was copied from, where the answer probably is."""


def verify_leaf(
    text: str,
    task: Task,
    kind: Kind,
    completion: Completion,
    record_schema: dict[str, Any] | None = None,
    *,
    record_model: type[BaseModel] | None = None,
    conditions: int = 0,
) -> Verdict:
    """Check a leaf's reply against its span and turn it into a typed answer.

    Args:
        text: the joined source text (the span is ``text[task.start:task.end]``).
        task: the leaf task.
        kind: the answer kind the plan asked for.
        completion: the model's reply.
        record_schema: the user's schema of one record (``schema`` kind only).
        record_model: the user's pydantic class of one record, when given: a
            record its validators reject is malformed, with their message.
        conditions: how many conditions a ``join`` plan has.
    """
    if completion.finish_reason == "length":
        return Verdict(False, "truncated", feedback="Your reply was cut off. Answer briefly.")
    if completion.refusal or _REFUSAL.match(completion.text or ""):
        return Verdict(False, "refused", feedback="Answer from the excerpt; it is safe to read.")
    if not (completion.text or "").strip():
        return Verdict(False, "empty", feedback="Your reply was empty. Reply with the JSON object.")

    data = parse_json_reply(completion.text)
    if data is None:
        return Verdict(False, "malformed", feedback="Reply with one JSON object only.")
    if not isinstance(data, dict):
        return Verdict(False, "malformed", feedback="Reply with one JSON object only.")
    try:
        if kind == "schema":
            return _check_schema(
                text, task, data, record_schema or {"type": "object"}, record_model
            )
        if kind == "join":
            return _check_join(text, task, data, conditions)
        return _CHECKS[kind](text, task, data)
    except _Malformed as exc:
        return Verdict(False, "malformed", feedback=str(exc))
    except (TypeError, ValueError, KeyError, AttributeError):
        return Verdict(False, "malformed", feedback="Your JSON did not follow the schema.")


def locate_quote(
    text: str, start: int, end: int, quote: str, claims: Claims | None = None
) -> Evidence | None:
    """Find ``quote`` inside ``text[start:end]`` and return it with exact offsets.

    Exact matches first; then matches tolerant of whitespace runs, letter case
    and quote-mark style. Leading and trailing quote marks and ellipses are
    ignored. Quotes shorter than :data:`MIN_QUOTE_CHARS` characters are not
    evidence.

    Args:
        claims: the places earlier quotes of the same reply took. The quote is
            placed at the first occurrence that overlaps none of them, and
            claims it: two equal quotes map to two distinct occurrences, and a
            quote with no free occurrence left is not found.
    """
    cleaned = quote.strip().strip(_QUOTE_MARKS).strip().removesuffix("...").removeprefix("...")
    cleaned = cleaned.strip()
    if len(cleaned) < MIN_QUOTE_CHARS or FILE_HEADER_MARK in cleaned:
        # Short quotes are too common to place; file headers are ours, not the source's.
        return None

    # Occurrences before where this quote was last placed are all taken (claims
    # are never released): resume there, so n equal quotes cost n searches, not n².
    resume = claims.resume.get(cleaned, start) if claims is not None else start
    places = _occurrences(text, start, end, cleaned, exact_from=resume)
    for found_start, found_end in places:
        if claims is not None and claims.overlaps(found_start, found_end):
            continue
        if FILE_HEADER_MARK in text[found_start:found_end]:
            continue
        if claims is not None:
            claims.add(found_start, found_end)
            if text.startswith(cleaned, found_start):
                claims.resume[cleaned] = found_end
        quoted = text[found_start:found_end]
        return Evidence(quote=quoted, start=found_start, end=found_end)
    return None


class Claims:
    """Disjoint places in the source that one reply's quotes already took."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.resume: dict[str, int] = {}
        """Per quote text: where its exact occurrences may still be free."""

    def overlaps(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` shares a character with a claimed place."""
        index = bisect.bisect_right(self._starts, start)
        before = index > 0 and self._ends[index - 1] > start
        after = index < len(self._starts) and self._starts[index] < end
        return before or after

    def add(self, start: int, end: int) -> None:
        """Claim ``[start, end)`` (it must overlap no claimed place)."""
        index = bisect.bisect_right(self._starts, start)
        self._starts.insert(index, start)
        self._ends.insert(index, end)


def _occurrences(
    text: str, start: int, end: int, cleaned: str, *, exact_from: int
) -> Iterator[tuple[int, int]]:
    """Where a quote occurs in a span: exact matches (from ``exact_from``) in
    order, then the matches only the tolerant pattern finds."""
    exact: set[int] = set()
    at = text.find(cleaned, exact_from, end)
    while at >= 0:
        exact.add(at)
        yield at, at + len(cleaned)
        at = text.find(cleaned, at + len(cleaned), end)
    for match in _tolerant_pattern(cleaned).finditer(text, start, end):
        if match.start() not in exact:
            yield match.start(), match.end()


def locate_answer(text: str, start: int, end: int, answer: str, question: str) -> Evidence | None:
    """Find the sentence of a span that states an answer, when no quote matched.

    Small models often answer correctly but cannot copy a sentence verbatim. The
    answer's own words (those not already in the question, and not stop words)
    must all occur in one sentence of the span; that sentence becomes the
    evidence. An answer whose words the span does not contain gets none.
    """
    wanted = _own_words(answer, question)
    if not wanted or len(wanted) > 8:
        return None
    for at, stop in sentences(text, start, end):
        sentence = text[at:stop]
        words = set(_words(sentence))
        if FILE_HEADER_MARK not in sentence and all(w in words for w in wanted):
            return Evidence(quote=sentence, start=at, end=stop)
    return None


def sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The sentences of ``text[start:end]`` as offsets, stripped of spaces.

    Prose sentences end at ``.``, ``!`` or ``?`` (or a blank line) and may run
    across single line breaks, as wrapped prose does. In a line-oriented span
    (fewer than :data:`LINE_ORIENTED_ENDS` sentence ends per line: logs, CSV,
    lists) no sentence runs across a line break, and in prose one that would
    grow past :data:`MAX_SENTENCE_CHARS` characters is cut at its line breaks.
    """
    lines = sum(1 for line in _LINE.finditer(text, start, end) if line.group(0).strip())
    ends = sum(1 for _ in _SENTENCE_END.finditer(text, start, end))
    by_line = lines > 1 and ends < LINE_ORIENTED_ENDS * lines
    found: list[tuple[int, int]] = []
    for match in _SENTENCE.finditer(text, start, end):
        if "\n" in match.group(0).strip() and (by_line or len(match.group(0)) > MAX_SENTENCE_CHARS):
            pieces = [(line.start(), line.end()) for line in _LINE.finditer(text, match.start(), match.end())]
        else:
            pieces = [(match.start(), match.end())]
        for at, stop in pieces:
            piece = text[at:stop]
            inner = piece.strip()
            if inner:
                offset = at + piece.index(inner)
                found.append((offset, offset + len(inner)))
    return found


def supports(quote: str, answer: str, question: str) -> bool:
    """Whether a quote can back a short answer: it holds most of the answer's words.

    Long answers (more than eight words of their own) are paraphrase and pass;
    a short answer needs at least half of its own words in the quote.
    """
    wanted = _own_words(answer, question)
    if not wanted or len(wanted) > 8:
        return True
    present = set(_words(quote))
    return sum(w in present for w in wanted) * 2 >= len(wanted)


def _restates(answer: str, question: str) -> bool:
    """Whether an answer is mostly the question's own words: at most one word in
    five (and at most one) is new. Short answers ("six o'clock", "12") never are."""
    words = _words(answer)
    if len(words) < 4:
        return False
    return len(_own_words(answer, question)) <= max(1, len(words) // 5)


def _own_words(answer: str, question: str) -> list[str]:
    asked = set(_words(question))
    return [w for w in dict.fromkeys(_words(answer)) if w not in asked and w not in _STOP_WORDS]


def _words(text: str) -> list[str]:
    return [w.casefold() for w in regex.findall(r"\w+", text) if len(w) >= 3 or w.isdigit()]


def parse_json_reply(reply: str) -> Any:
    """Parse a JSON object from a reply, allowing a fenced block around it."""
    body = reply.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        first, last = body.find("{"), body.rfind("}")
        if 0 <= first < last:
            try:
                return json.loads(body[first : last + 1])
            except json.JSONDecodeError:
                return None
        return None


def _tolerant_pattern(quote: str) -> regex.Pattern[str]:
    parts: list[str] = []
    for word in quote.split():
        escaped = "".join(
            f"[{re.escape(_QUOTE_MARKS)}]" if ch in _QUOTE_MARKS else regex.escape(ch)
            for ch in word
        )
        parts.append(escaped)
    return regex.compile(r"\s+".join(parts), regex.IGNORECASE | regex.V1)


class _Malformed(ValueError):
    """A reply that does not have its kind's shape; the message is the feedback."""


def _check_text(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    if data.get("relevant") is False:
        return Verdict(True, "ok", Answer(kind="text", found=False))
    said = _required(data, "answer", object, '{"answer": "...", "quote": "..."}')
    answer = str(said if said is not None else "").strip()
    quote = str(data.get("quote") or "")
    if not answer or _NOT_STATED.match(answer):
        return Verdict(True, "ok", Answer(kind="text", found=False))
    if _restates(answer, task.question):
        # "The rabbit called Alice when he mistook her." restates the question.
        return Verdict(
            False, "restated",
            feedback=(
                "Your answer only repeats the question. Give the answer itself, "
                'or "not stated" if the text does not say.'
            ),
        )

    if quote.strip():
        # A quote that was given must be found and must back the answer; a
        # looser search would turn an invented quote into evidence.
        evidence = locate_quote(text, task.start, task.end, quote)
        if evidence is not None and not supports(evidence.quote, answer, task.question):
            return Verdict(
                False, "no-evidence",
                feedback=(
                    "Your quote does not state your answer. Copy the sentence of the "
                    "excerpt that states it, exactly as written, or set relevant to "
                    "false if the excerpt does not answer the question."
                ),
            )
    else:
        # No quote at all: the sentence of the span holding the answer's words.
        evidence = locate_answer(text, task.start, task.end, answer, task.question)
    if evidence is None:
        return Verdict(
            False, "no-evidence",
            feedback=(
                "Your quote does not occur in the excerpt. Copy one sentence exactly "
                "as written in the excerpt that supports your answer, or set "
                "relevant to false if the excerpt does not answer the question."
            ),
        )
    return Verdict(True, "ok", Answer(kind="text", found=True, text=answer, evidence=(evidence,)))


def question_overlap(sentence: str, question: str) -> int:
    """How many of the question's content words a sentence contains."""
    asked = {w for w in _words(question) if w not in _STOP_WORDS}
    return len(asked & set(_words(sentence)))


def _check_short(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    """A short answer must be copied from the span; code finds it there.

    The answer's own occurrence is the evidence: the sentence around it that
    shares the most content words with the question. Weak models copy well
    and paraphrase badly, so nothing the span does not contain is accepted,
    and neither is an answer with no information of its own (see
    :func:`_says_nothing_new`).
    """
    answer = str(data.get("answer") or "").strip().strip(_QUOTE_MARKS).strip().rstrip(".,;:!?").strip()
    if not answer or _NOT_STATED.match(answer):
        return Verdict(True, "ok", Answer(kind="short", found=False))
    spans = sentences(text, task.start, task.end)
    if _says_nothing_new(answer, task.question):
        # Small models often copy the start of the right sentence and stop where
        # the answer begins (or answer "a"); the sentence holding those words
        # that is most like the question is worth reading again on its own.
        pattern = _answer_pattern(answer)
        scored = [
            (question_overlap(text[at:stop], task.question), at, stop)
            for at, stop in spans if pattern.search(text, at, stop)
        ]
        best_focus = max(scored, key=lambda s: s[0], default=None)
        focus = (
            Evidence(quote=text[best_focus[1] : best_focus[2]], start=best_focus[1], end=best_focus[2])
            if best_focus is not None and best_focus[0] > 0 else None
        )
        return Verdict(False, "restated", focus=focus, feedback=(
            "Your answer says nothing new: it is only common words (like \"a\", "
            "\"the\", \"and\"), units, or words and numbers of the question itself. "
            'Copy the words of the excerpt that answer the question, or answer "not stated".'
        ))
    best: tuple[int, Evidence, str] | None = None
    # A model that copied a sentence and ran on past it: its first sentence counts.
    first = next(iter(_SENTENCE.finditer(answer)), None)
    tries = [answer]
    if first is not None and first.group(0).strip().rstrip(".!?") not in ("", answer):
        tries.append(first.group(0).strip().rstrip(".!?"))
    for attempt in tries:
        for match in _answer_pattern(attempt).finditer(text, task.start, task.end):
            sentence = _sentence_around(text, spans, match.start(), match.end())
            score = question_overlap(sentence.quote, task.question)
            if best is None or score > best[0]:
                best = (score, sentence, match.group(0))
        if best is not None:
            break
    if best is None:
        return Verdict(False, "no-evidence", feedback=(
            "Your answer does not occur in the excerpt. Copy the answer exactly as "
            'it is written there, or answer "not stated".'
        ))
    if best[0] == 0:
        return Verdict(False, "no-evidence", feedback=(
            "The excerpt uses your answer in a sentence unrelated to the question. "
            'Copy the words that answer the question, or answer "not stated".'
        ))
    return Verdict(True, "ok", Answer(kind="short", found=True, text=best[2], evidence=(best[1],)))


def _says_nothing_new(answer: str, question: str) -> bool:
    """Whether a short answer carries no information of its own.

    It does not when every word of it is a function word ("a", "the", "and"),
    a bare unit ("ms") or a word or number of the question: "Dormouse" for a
    question about the Dormouse's story, "1150" for one about request 1150.
    Words are compared by a rough stem, so "leaves" is "leave" and "took" is
    "take". A question that offers a choice ("red or blue?") is answered with
    its own words, so there only function words and units count as nothing.
    """
    tokens = [t.casefold() for t in regex.findall(r"\w+", answer)]
    asked_tokens = [t.casefold() for t in regex.findall(r"\w+", question)]
    asked = set() if "or" in asked_tokens else {_stem(t) for t in asked_tokens}
    return all(t in _FUNCTION_WORDS or t in _BARE_UNITS or _stem(t) in asked for t in tokens)


def _stem(word: str) -> str:
    """A rough stem: irregular past forms to their base, then one common suffix
    off, a final "e" off and a doubled final consonant single ("running" and
    "run", "names" and "name", "took" and "take" meet). Numbers stay whole."""
    if word.isdigit():
        return word
    word = _IRREGULAR.get(word, word)
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    else:
        for suffix in ("ing", "ers", "es", "ed", "er", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
                word = word[: -len(suffix)]
                break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]
    return word


def _answer_pattern(answer: str) -> regex.Pattern[str]:
    """The answer as whole words, tolerant of whitespace, case and quote marks."""
    body = _tolerant_pattern(answer).pattern
    return regex.compile(rf"(?<!\w){body}(?!\w)", regex.IGNORECASE | regex.V1)


def _sentence_around(text: str, spans: list[tuple[int, int]], at: int, stop: int) -> Evidence:
    """The sentence (one of ``spans``, from :func:`sentences`) holding
    ``text[at:stop]``, or the match itself when it spans sentences."""
    index = bisect.bisect_right(spans, (at, len(text) + 1)) - 1
    if index >= 0 and spans[index][0] <= at and stop <= spans[index][1]:
        begin, finish = spans[index]
        return Evidence(quote=text[begin:finish], start=begin, end=finish)
    return Evidence(quote=text[at:stop], start=at, end=stop)


def _check_list(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    shape = '{"items": [{"item": "...", "quote": "..."}]}'
    entries = _required(data, "items", list, shape)
    if (full := _full(entries, LIST_MAX_ITEMS, "items")) is not None:
        return full
    items: list[Item] = []
    missing = 0
    claims = Claims()
    for entry in entries:
        name = str(entry.get("item") or "").strip() if isinstance(entry, dict) else str(entry)
        if not name:
            continue
        quote = str(entry.get("quote") or "") if isinstance(entry, dict) else ""
        evidence = locate_quote(text, task.start, task.end, quote or name, claims)
        if evidence is None:
            missing += 1
            continue
        items.append(Item(text=name, evidence=evidence))

    if missing and not items:
        return Verdict(
            False, "no-evidence",
            feedback="Each item needs a quote copied exactly from the excerpt.",
        )
    evidence = tuple(item.evidence for item in items if item.evidence)
    return Verdict(True, "ok", Answer(kind="list", found=bool(items), items=tuple(items), evidence=evidence))


def _check_count(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    shape = '{"count": N, "quotes": ["...", ...]}'
    count = _whole_number(_required(data, "count", object, shape), "count")
    quotes = _quotes(data.get("quotes"), "quotes")
    if (full := _full(quotes, LIST_MAX_ITEMS, "quotes")) is not None:
        return full
    evidence, problem = _backing(text, task, count, quotes)
    if problem is not None:
        return problem
    return Verdict(True, "ok", Answer(kind="count", found=count > 0, count=count, evidence=evidence))


def _check_table(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    shape = '{"rows": [{"label": "...", "count": N, "quotes": ["...", ...]}]}'
    rows: dict[str, Row] = {}
    claims: dict[str, Claims] = {}
    entries = _required(data, "rows", list, shape)
    if (full := _full(entries, LIST_MAX_ITEMS, "rows")) is not None:
        return full
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            msg = f"rows[{index}] is not an object. Reply as {shape}."
            raise _Malformed(msg)
        label = " ".join(str(entry.get("label") or "").split())
        said = _required(entry, "count", object, shape)
        count = _whole_number(said, f"rows[{index}].count")
        quotes = _quotes(entry.get("quotes"), f"rows[{index}].quotes")
        if (full := _full(quotes, LIST_MAX_ITEMS, f"quotes for {label or 'a row'!r}")) is not None:
            return full
        if not label:
            if count or quotes:
                msg = f"rows[{index}] has no label. Reply as {shape}."
                raise _Malformed(msg)
            continue
        key = label.casefold()
        # The same label twice in one reply adds up, and its quotes must be
        # distinct occurrences across both rows.
        located, problem = _backing(
            text, task, count, quotes,
            what=f"{label!r}", claims=claims.setdefault(key, Claims()),
        )
        if problem is not None:
            return problem
        if count == 0:
            continue
        if key in rows:
            old = rows[key]
            rows[key] = Row(label=old.label, count=old.count + count, evidence=old.evidence + located)
        else:
            rows[key] = Row(label=label, count=count, evidence=located)

    table = tuple(rows.values())
    evidence = tuple(e for row in table for e in row.evidence)
    return Verdict(True, "ok", Answer(kind="table", found=bool(table), rows=table, evidence=evidence))


_YES = frozenset({"yes", "true", "y"})
_NO = frozenset({"no", "false", "n"})


def _check_yesno(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    said = _required(data, "answer", object, '{"answer": "yes", "quote": "..."}')
    said = str(said if said is not None else "").strip().casefold().strip(".!")
    if said not in _YES | _NO:
        if not said or _NOT_STATED.match(said):
            return Verdict(True, "ok", Answer(kind="yesno", found=False))
        return Verdict(False, "malformed", feedback='Answer "yes", "no" or "not stated".')
    evidence = locate_quote(text, task.start, task.end, str(data.get("quote") or ""))
    if evidence is None:
        return Verdict(
            False, "no-evidence",
            feedback=(
                "Your quote does not occur in the excerpt. Copy the sentence that "
                'shows the answer exactly, or answer "not stated".'
            ),
        )
    flag = said in _YES
    return Verdict(True, "ok", Answer(kind="yesno", found=True, flag=flag, evidence=(evidence,)))


def _check_schema(
    text: str,
    task: Task,
    data: dict[str, Any],
    record_schema: dict[str, Any],
    record_model: type[BaseModel] | None = None,
) -> Verdict:
    import jsonschema

    validator = jsonschema.Draft202012Validator(record_schema)
    field = evidence_field(record_schema)
    records: list[Record] = []
    missing = 0
    claims = Claims()
    shape = f'{{"records": [{{..., "{field}": "..."}}]}}'
    entries = _required(data, "records", list, shape)
    if (full := _full(entries, LIST_MAX_ITEMS, "records")) is not None:
        return full
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return Verdict(False, "malformed", feedback=f"records[{index}] is not an object.")
        fields = {k: v for k, v in entry.items() if k != field}
        error = jsonschema.exceptions.best_match(validator.iter_errors(fields))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "(record)"
            return Verdict(
                False, "malformed",
                feedback=f"records[{index}].{where}: {error.message}. Follow the schema.",
            )
        if record_model is not None:
            problem = _model_rejects(record_model, fields)
            if problem is not None:
                return Verdict(
                    False, "malformed",
                    feedback=f"records[{index}]: {problem}. Follow the schema.",
                )
        quote = str(entry.get(field) or "")
        evidence = locate_quote(text, task.start, task.end, quote, claims)
        if evidence is None:
            missing += 1
            continue
        records.append(Record(data=fields, evidence=evidence))

    if missing and not records:
        return Verdict(
            False, "no-evidence",
            feedback=(
                f'Each record needs "{field}": words copied exactly from the excerpt.'
            ),
        )
    evidence = tuple(r.evidence for r in records if r.evidence)
    return Verdict(True, "ok", Answer(kind="schema", found=bool(records), records=tuple(records), evidence=evidence))


def _check_join(text: str, task: Task, data: dict[str, Any], conditions: int) -> Verdict:
    """Each match must name a valid condition, quote the span, and name its
    entity inside the quote; one bad match rejects the reply with the reason
    (a dropped match could lose an entity the answer needs).

    A match repeated at the same place (same entity, condition and quote
    offsets) is kept once; several entities may share one quote ("U1 and U2
    asked for refunds"), and one entity may show a condition in many places.
    """
    shape = '{"matches": [{"entity": "...", "condition": N, "quote": "..."}]}'
    entries = _required(data, "matches", list, shape)
    if (full := _full(entries, JOIN_MAX_MATCHES, "matches")) is not None:
        return full
    kept: dict[tuple[str, int, int, int], Match] = {}
    bad: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            msg = f"matches[{index}] is not an object. Reply as {shape}."
            raise _Malformed(msg)
        entity = " ".join(str(entry.get("entity") or "").split())
        said = entry.get("condition")
        if not entity:
            bad.append(f"matches[{index}] names no entity")
            continue
        whole = isinstance(said, int) or (isinstance(said, float) and said.is_integer())
        if isinstance(said, bool) or not whole:
            bad.append(f"matches[{index}] ({entity}) has no condition number")
            continue
        number = int(said)
        if not 1 <= number <= max(conditions, 1):
            bad.append(
                f"matches[{index}] ({entity}) gives condition {number}; the conditions "
                f"are numbered 1 to {conditions}"
            )
            continue
        quote = str(entry.get("quote") or "")
        evidence = locate_quote(text, task.start, task.end, quote)
        if evidence is None:
            shown = " ".join(quote.split())[:80]
            bad.append(f"the quote for {entity} ({shown!r}) does not occur in the excerpt")
            continue
        named = _named(evidence.quote, entity)
        if named is None:
            bad.append(f"the quote for {entity} does not name {entity}")
            continue
        # The source's spelling, not the model's ("U1" where the reply said "u1").
        key = (entity_key(named), number - 1, evidence.start, evidence.end)
        kept.setdefault(key, Match(entity=named, condition=number - 1, evidence=evidence))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        feedback = (
            f"{bad[0]}{more}. Give each match the condition's number, a quote copied "
            "exactly from the excerpt, and an entity named in that quote."
        )
        return Verdict(False, "no-evidence", feedback=feedback)
    matches = tuple(sorted(kept.values(), key=lambda m: (m.evidence.start, m.condition)))
    from rlm_graph.nodes.merge import join_matches

    return Verdict(True, "ok", join_matches(matches, conditions))


def _named(quote: str, entity: str) -> str | None:
    """How ``quote`` writes ``entity``, or None when it does not name it.

    The entity must occur as whole words, ignoring case and spaces: "u 12"
    names the "U12" of "user U12 asked", and is then spelled "U12". Quote
    marks match any quote-mark style.
    """
    letters = [ch for ch in entity if not ch.isspace()]
    body = r"\s*".join(
        f"[{re.escape(_QUOTE_MARKS)}]" if ch in _QUOTE_MARKS else regex.escape(ch) for ch in letters
    )
    found = regex.search(rf"(?<!\w){body}(?!\w)", quote, regex.IGNORECASE | regex.V1)
    return " ".join(found.group(0).split()) if found else None


def _model_rejects(record_model: type[BaseModel], fields: dict[str, Any]) -> str | None:
    """Why the user's class rejects a record (its first error), or None."""
    try:
        record_model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "(record)"
        return f"{where}: {first.get('msg', 'invalid')}"[:300]
    return None


def _full(entries: list[Any], cap: int, what: str) -> Verdict | None:
    """A reply holding exactly as many entries as its schema allows may have
    been cut short: a model held to the schema stops at the cap, so what did
    not fit is missing from a reply that looks complete. It is rejected as
    too-many, so its span is split (and listed as a failure where it cannot be
    split any finer), never accepted as the whole answer. A reply with more
    than the cap was not held to it, so the cap did not cut it."""
    if len(entries) != cap:
        return None
    return Verdict(False, "too-many", feedback=(
        f"the reply held {cap} {what}, the most one reply may hold, so some may "
        "have been left out"
    ))


def _required(data: dict[str, Any], key: str, kind: type, shape: str) -> Any:
    """``data[key]``, which must be there (and of ``kind``): a reply without its
    kind's key is malformed, never an empty answer."""
    if key not in data:
        msg = f'Your reply has no "{key}". Reply as {shape}.'
        raise _Malformed(msg)
    value = data[key]
    if kind is not object and not isinstance(value, kind):
        msg = f'"{key}" must be a {kind.__name__}. Reply as {shape}.'
        raise _Malformed(msg)
    return value


def _whole_number(value: Any, where: str) -> int:
    """A count: a whole number of at least 0 (``3.0`` is 3; ``2.5``, ``-1``,
    ``"3"`` and ``true`` are malformed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{where} must be a whole number, not {json.dumps(value)[:40]}."
        raise _Malformed(msg)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        msg = f"{where} must be a whole number, not {value}."
        raise _Malformed(msg)
    if value < 0:
        msg = f"{where} cannot be negative ({value})."
        raise _Malformed(msg)
    return int(value)


def _quotes(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        msg = f"{where} must be a list of quotes."
        raise _Malformed(msg)
    return [str(q) for q in value]


def _backing(
    text: str,
    task: Task,
    count: int,
    quotes: list[str],
    *,
    what: str | None = None,
    claims: Claims | None = None,
) -> tuple[tuple[Evidence, ...], Verdict | None]:
    """Tie a count to its quotes: each must be found, at its own occurrence, and
    their number must equal the count.

    The verified count is the number of distinct occurrences the quotes were
    placed at; the model's number is the cross-check. Returns the evidence, or
    the rejection to send back.
    """
    claims = claims if claims is not None else Claims()
    located: list[Evidence] = []
    missing: list[str] = []
    for quote in quotes:
        evidence = locate_quote(text, task.start, task.end, quote, claims)
        if evidence is None:
            missing.append(quote)
        else:
            located.append(evidence)
    # A quote that does occur, but whose every occurrence an earlier quote of
    # this reply took, repeats a line: saying it "does not occur" misleads.
    repeated = [q for q in missing if locate_quote(text, task.start, task.end, q) is not None]
    if repeated:
        shown = " ".join(repeated[0].split())[:80]
        label = f" for {what}" if what else ""
        absent = len(missing) - len(repeated)
        also = f" and {absent} do not occur in the excerpt" if absent else ""
        feedback = (
            f"{len(repeated)} of your quotes{label} repeat a line that occurs fewer times "
            f"in the excerpt than you quoted it (first: {shown!r}){also}. Quote each "
            "occurrence once, and count only the occurrences you quote."
        )
        return (), Verdict(False, "no-evidence", feedback=feedback)
    if missing:
        shown = " ".join(missing[0].split())[:80]
        label = f" for {what}" if what else ""
        feedback = (
            f"{len(missing)} of your quotes{label} do not occur in the excerpt "
            f"(first: {shown!r}). Copy each counted one exactly as written, at least "
            f"{MIN_QUOTE_CHARS} characters, one quote per occurrence."
        )
        return (), Verdict(False, "no-evidence", feedback=feedback)
    if count != len(located):
        code = "unbacked"
        if count > len(located) and len(quotes) >= LIST_MAX_ITEMS:
            code = "too-many"  # more than a reply may quote: smaller spans will do
        label = f" for {what}" if what else ""
        feedback = (
            f"You counted {count}{label} but quoted {len(located)}. Give exactly "
            "one quote copied from the excerpt for each counted occurrence, and count "
            "only what you quote."
        )
        return (), Verdict(False, code, feedback=feedback)
    return tuple(located), None


_CHECKS = {
    "text": _check_text,
    "short": _check_short,
    "list": _check_list,
    "count": _check_count,
    "table": _check_table,
    "yesno": _check_yesno,
}
