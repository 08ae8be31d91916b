"""Verify: check a leaf answer before it is used.

A leaf's reply must be complete (not cut off by the output limit), must not be
empty or a refusal, must parse into the answer kind, and every quote it offers
as evidence must occur in the leaf's own span. A quote is searched exactly
first, then tolerant of whitespace, case and quote-mark style; a found quote
becomes :class:`Evidence` with exact offsets. A failed check comes back with a
reason the model can act on when it is asked again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import regex

from rlm_graph.models import Completion
from rlm_graph.nodes.types import Answer, Evidence, Item, Kind, Record, Row, Task
from rlm_graph.source import FILE_HEADER_MARK

__all__ = ["Verdict", "locate_quote", "question_overlap", "verify_leaf"]

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
_STOP_WORDS = frozenset(
    "the and was were for that this with from are his her she him they them their "
    "what who which when where why how did does not but had has have been into "
    "there then than its it's you your our out about would could should answer "
    "text excerpt question".split()
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verify decided about one leaf reply."""

    ok: bool
    code: str
    """ok, truncated, empty, refused, malformed, no-evidence."""
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
) -> Verdict:
    """Check a leaf's reply against its span and turn it into a typed answer.

    Args:
        text: the joined source text (the span is ``text[task.start:task.end]``).
        task: the leaf task.
        kind: the answer kind the plan asked for.
        completion: the model's reply.
        record_schema: the user's schema of one record (``schema`` kind only).
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
            return _check_schema(text, task, data, record_schema or {"type": "object"})
        return _CHECKS[kind](text, task, data)
    except (TypeError, ValueError, KeyError, AttributeError):
        return Verdict(False, "malformed", feedback="Your JSON did not follow the schema.")


def locate_quote(text: str, start: int, end: int, quote: str) -> Evidence | None:
    """Find ``quote`` inside ``text[start:end]`` and return it with exact offsets.

    Exact match first; then a match tolerant of whitespace runs, letter case and
    quote-mark style. Leading and trailing quote marks and ellipses are ignored.
    Quotes shorter than :data:`MIN_QUOTE_CHARS` characters are not evidence.
    """
    cleaned = quote.strip().strip(_QUOTE_MARKS).strip().removesuffix("...").removeprefix("...")
    cleaned = cleaned.strip()
    if len(cleaned) < MIN_QUOTE_CHARS:
        return None

    if FILE_HEADER_MARK in cleaned:
        return None  # the joined text's file headers are ours, not the source's
    found = text.find(cleaned, start, end)
    if found >= 0:
        return Evidence(quote=cleaned, start=found, end=found + len(cleaned))

    pattern = _tolerant_pattern(cleaned)
    match = pattern.search(text, start, end)
    if match is None or FILE_HEADER_MARK in match.group(0):
        return None
    return Evidence(quote=match.group(0), start=match.start(), end=match.end())


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
    for match in _SENTENCE.finditer(text, start, end):
        words = set(_words(match.group(0)))
        if FILE_HEADER_MARK not in match.group(0) and all(w in words for w in wanted):
            sentence = match.group(0).strip()
            offset = match.start() + match.group(0).index(sentence)
            return Evidence(quote=sentence, start=offset, end=offset + len(sentence))
    return None


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


def _check_text(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    relevant = bool(data.get("relevant", True))
    answer = str(data.get("answer") or "").strip()
    quote = str(data.get("quote") or "")
    if not relevant or not answer or _NOT_STATED.match(answer):
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

    evidence = locate_quote(text, task.start, task.end, quote)
    if evidence is not None and not supports(evidence.quote, answer, task.question):
        evidence = None
    evidence = evidence or locate_answer(text, task.start, task.end, answer, task.question)
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
    and paraphrase badly, so nothing the span does not contain is accepted.
    """
    answer = str(data.get("answer") or "").strip().strip(_QUOTE_MARKS).strip().rstrip(".,;:!?").strip()
    if not answer or _NOT_STATED.match(answer):
        return Verdict(True, "ok", Answer(kind="short", found=False))
    if _repeats_question(answer, task.question):
        # Small models often copy the start of the right sentence and stop where
        # the answer begins; that sentence is worth reading again on its own.
        found = _answer_pattern(answer).search(text, task.start, task.end)
        focus = _sentence_around(text, task.start, task.end, found.start(), found.end()) if found else None
        return Verdict(False, "restated", focus=focus, feedback=(
            "Your answer only repeats the question. Copy the words of the excerpt "
            'that answer it, or answer "not stated".'
        ))
    best: tuple[int, Evidence, str] | None = None
    # A model that copied a sentence and ran on past it: its first sentence counts.
    first = next(iter(_SENTENCE.finditer(answer)), None)
    tries = [answer]
    if first is not None and first.group(0).strip().rstrip(".!?") not in ("", answer):
        tries.append(first.group(0).strip().rstrip(".!?"))
    for attempt in tries:
        for match in _answer_pattern(attempt).finditer(text, task.start, task.end):
            sentence = _sentence_around(text, task.start, task.end, match.start(), match.end())
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


def _repeats_question(answer: str, question: str) -> bool:
    """Whether a short answer of several words has no word of its own: each is a
    stop word or shares its first four letters with a word of the question
    ("leaves" for "leave")."""
    words = _words(answer)
    asked = {w[:4] for w in _words(question)}
    return len(words) > 1 and all(w in _STOP_WORDS or w[:4] in asked for w in words)


def _answer_pattern(answer: str) -> regex.Pattern[str]:
    """The answer as whole words, tolerant of whitespace, case and quote marks."""
    body = _tolerant_pattern(answer).pattern
    return regex.compile(rf"(?<!\w){body}(?!\w)", regex.IGNORECASE | regex.V1)


def _sentence_around(text: str, start: int, end: int, at: int, stop: int) -> Evidence:
    """The sentence of ``text[start:end]`` holding ``text[at:stop]`` (or the
    match itself when it spans sentences)."""
    for match in _SENTENCE.finditer(text, start, end):
        if match.start() <= at and stop <= match.end():
            sentence = match.group(0).strip()
            offset = match.start() + match.group(0).index(sentence)
            return Evidence(quote=sentence, start=offset, end=offset + len(sentence))
        if match.start() > at:
            break
    return Evidence(quote=text[at:stop], start=at, end=stop)


def _check_list(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    items: list[Item] = []
    missing = 0
    for entry in data.get("items") or []:
        name = str(entry.get("item") or "").strip() if isinstance(entry, dict) else str(entry)
        if not name:
            continue
        quote = str(entry.get("quote") or "") if isinstance(entry, dict) else ""
        evidence = locate_quote(text, task.start, task.end, quote or name)
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
    count = int(data.get("count") or 0)
    if count < 0:
        return Verdict(False, "malformed", feedback="A count cannot be negative.")
    quotes = [str(q) for q in data.get("quotes") or []]
    located = [locate_quote(text, task.start, task.end, q) for q in quotes]
    evidence = tuple(e for e in located if e is not None)
    if count and quotes and not evidence:
        return Verdict(
            False, "no-evidence",
            feedback="Quote each counted occurrence exactly as written in the excerpt.",
        )
    return Verdict(True, "ok", Answer(kind="count", found=count > 0, count=count, evidence=evidence))


def _check_table(text: str, task: Task, data: dict[str, Any]) -> Verdict:
    rows: dict[str, Row] = {}
    for entry in data.get("rows") or []:
        label = " ".join(str(entry.get("label") or "").split())
        count = int(entry.get("count") or 0)
        if count < 0:
            return Verdict(False, "malformed", feedback=f"The count of {label!r} is negative.")
        if not label or count == 0:
            continue
        quotes = [str(q) for q in entry.get("quotes") or []]
        located = tuple(e for q in quotes if (e := locate_quote(text, task.start, task.end, q)))
        if quotes and not located:
            return Verdict(
                False, "no-evidence",
                feedback=f"Quote each counted {label!r} exactly as written in the excerpt.",
            )
        key = label.casefold()
        if key in rows:  # the same label twice in one reply: add them up
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
    said = str(data.get("answer") or "").strip().casefold().strip(".!")
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


def _check_schema(text: str, task: Task, data: dict[str, Any], record_schema: dict[str, Any]) -> Verdict:
    import jsonschema

    validator = jsonschema.Draft202012Validator(record_schema)
    records: list[Record] = []
    missing = 0
    for index, entry in enumerate(data.get("records") or []):
        if not isinstance(entry, dict):
            return Verdict(False, "malformed", feedback=f"records[{index}] is not an object.")
        fields = {k: v for k, v in entry.items() if k != "quote"}
        error = jsonschema.exceptions.best_match(validator.iter_errors(fields))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "(record)"
            return Verdict(
                False, "malformed",
                feedback=f"records[{index}].{where}: {error.message}. Follow the schema.",
            )
        evidence = locate_quote(text, task.start, task.end, str(entry.get("quote") or ""))
        if evidence is None:
            missing += 1
            continue
        records.append(Record(data=fields, evidence=evidence))

    if missing and not records:
        return Verdict(
            False, "no-evidence", feedback="Each record needs a quote copied exactly from the excerpt."
        )
    evidence = tuple(r.evidence for r in records if r.evidence)
    return Verdict(True, "ok", Answer(kind="schema", found=bool(records), records=tuple(records), evidence=evidence))


_CHECKS = {
    "text": _check_text,
    "short": _check_short,
    "list": _check_list,
    "count": _check_count,
    "table": _check_table,
    "yesno": _check_yesno,
}
