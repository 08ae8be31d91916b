"""Seeded generators of long-context tasks with known answers.

Four families, after the benchmarks recursive models are judged on:

- :func:`needle_task` (S-NIAH): one fact hidden in real prose at a chosen depth,
  optionally placed across a nominal span boundary, among look-alike distractors.
- :func:`records_count_task` and :func:`records_compare_task` (OOLONG-style):
  thousands of labelled records; how many carry a label, which of two labels is
  more common.
- :func:`pairs_task` (OOLONG-Pairs-style): users that have records of two labels,
  often far apart in the source (a ``join`` question: one reader per condition).
- :func:`multidoc_task`: a folder of memos; how many report a given fact.

Every instance is a pure function of its arguments (``random.Random(seed)``), so
a table can be reproduced from its seed. Each instance carries a *reader*: the
truthful answer to its question computed from any excerpt of the source. The
reading double (:mod:`rlm_graph.eval.reader`) answers with it, seeing only the
text a method sent; the expected answer is the reader applied to the whole
source, checked against what the generator planted.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CHARS_PER_TOKEN",
    "Instance",
    "Reading",
    "TaskFamily",
    "filler_paragraphs",
    "make_instance",
    "multidoc_task",
    "needle_task",
    "pairs_task",
    "records_compare_task",
    "records_count_task",
    "suite",
]

CHARS_PER_TOKEN = 4.0
"""Characters per cl100k token of English prose (measured on the bundled book:
4.1); sizes are targets in tokens, met within a few per cent."""

TaskFamily = Literal["needle", "count", "compare", "pairs", "multidoc"]
AnswerKind = Literal["text", "short", "list", "count", "table", "yesno", "join"]

_BOOK = Path(__file__).resolve().parents[2] / "examples" / "alice_in_wonderland.txt"
_LABELS = ("refund", "shipping", "billing", "login", "warranty", "delivery")
_COLOURS = ("amber", "blue", "crimson", "green", "ivory", "violet", "silver", "teal")
_PLACES = ("door", "vault", "gate", "locker", "cellar", "archive")
_PROJECTS = ("Falcon", "Heron", "Osprey", "Kestrel", "Plover", "Curlew")


@dataclass(frozen=True)
class Reading:
    """What an excerpt says about a question: a value and the lines behind it."""

    value: Any
    quotes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Instance:
    """One generated task: files, a question, its exact answer and a reader."""

    family: TaskFamily
    name: str
    """Short id, e.g. ``needle-32k-d50``."""
    files: dict[str, str]
    question: str
    kind: AnswerKind
    """The answer kind the task needs."""
    expected: Any
    """Exact answer: str (needle), int (count), str label (compare), sorted list."""
    target_tokens: int
    seed: int
    read: Callable[[str], Reading] = field(repr=False, compare=False)
    """Truthful answer over a visible excerpt (used by the reading double)."""
    meta: dict[str, Any] = field(default_factory=dict)
    conditions: tuple[str, ...] = ()
    """For ``join`` tasks: the conditions, worded as the rules planner reads
    them from the question (all methods are given them)."""
    entity: str | None = None
    """For ``join`` tasks: what the answer lists (``users``)."""
    condition_readers: dict[str, Callable[[str], Reading]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """For ``join`` tasks: per condition, the truthful reader of an excerpt
    (the entities in it that meet that condition, one quote each)."""

    @property
    def chars(self) -> int:
        """Total characters over all files."""
        return sum(len(text) for text in self.files.values())

    def write(self, folder: Path) -> list[Path]:
        """Write the files into ``folder``; return their paths in name order."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in sorted(self.files):
            path = folder / name
            path.write_text(self.files[name], encoding="utf-8")
            paths.append(path)
        return paths


def filler_paragraphs(rng: random.Random) -> list[str]:
    """Paragraphs of the bundled book (real prose), shuffled by ``rng``."""
    text = _BOOK.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    rng.shuffle(paragraphs)
    return paragraphs


def needle_task(
    tokens: int,
    *,
    seed: int = 0,
    depth: float = 0.5,
    distractors: int = 3,
    straddle_tokens: int | None = None,
) -> Instance:
    """A secret code hidden in real prose at ``depth`` (0 = start, 1 = end).

    Args:
        tokens: target source size in tokens.
        seed: the random seed; same arguments, same instance.
        depth: where the needle sits, as a share of the source.
        distractors: codes of other colours placed elsewhere (wrong answers).
        straddle_tokens: when given, the needle's middle is put on the nearest
            multiple of this many tokens (a nominal span boundary), even inside
            a paragraph.
    """
    rng = random.Random(
        f"needle/{seed}/{tokens}/{depth}/{distractors}/{straddle_tokens}"
    )
    colour, *others = rng.sample(_COLOURS, 1 + distractors)
    place = rng.choice(_PLACES)
    code = str(rng.randrange(1000, 9999))
    needle = f"The secret code for the {colour} {place} is {code}."
    text = _prose(rng, tokens)
    for other in others:
        decoy = (
            f"The secret code for the {other} {place} is {rng.randrange(1000, 9999)}."
        )
        text = _insert(text, decoy, rng.random(), None)
    # The needle goes in last, so its depth and boundary hold in the final text.
    text = _insert(text, needle, depth, straddle_tokens)

    pattern = re.compile(
        rf"secret code for the {colour} {place} is (\d{{4}})", re.IGNORECASE
    )

    def read(excerpt: str) -> Reading:
        match = pattern.search(excerpt)
        if match is None:
            return Reading(None)
        return Reading(match.group(1), (match.group(0),))

    return _checked(
        Instance(
            family="needle",
            name=f"needle-{_size(tokens)}-d{round(depth * 100)}"
            + (f"-x{straddle_tokens}" if straddle_tokens else ""),
            files={"haystack.txt": text},
            question=f"What is the secret code for the {colour} {place}?",
            kind="short",
            expected=code,
            target_tokens=tokens,
            seed=seed,
            read=read,
            meta={
                "depth": depth,
                "distractors": distractors,
                "straddle_tokens": straddle_tokens,
                "needle_start": text.index(needle),
            },
        )
    )


def records_count_task(tokens: int, *, seed: int = 0) -> Instance:
    """Thousands of labelled support records; how many carry one label."""
    rng = random.Random(f"count/{seed}/{tokens}")
    text, rows = _records(rng, tokens)
    label = rng.choice(_LABELS)
    pattern = _label_line(label)

    def read(excerpt: str) -> Reading:
        lines = tuple(m.group(0) for m in pattern.finditer(excerpt))
        return Reading(len(lines), lines)

    expected = sum(1 for _, _, row_label in rows if row_label == label)
    return _checked(
        Instance(
            family="count",
            name=f"count-{_size(tokens)}",
            files={"records.txt": text},
            question=f"How many records have the label {label}?",
            kind="count",
            expected=expected,
            target_tokens=tokens,
            seed=seed,
            read=read,
            meta={"records": len(rows), "label": label},
        )
    )


def records_compare_task(tokens: int, *, seed: int = 0) -> Instance:
    """Labelled records; which of two labels occurs more often (never a tie)."""
    rng = random.Random(f"compare/{seed}/{tokens}")
    text, rows = _records(rng, tokens)
    counts = Counter(label for _, _, label in rows)
    ranked = [label for label, _ in counts.most_common()]
    first, second = (
        ranked[0],
        next(
            (lbl for lbl in ranked[1:] if counts[lbl] != counts[ranked[0]]), ranked[-1]
        ),
    )
    pair = sorted((first, second), key=lambda _: rng.random())
    patterns = {label: _label_line(label) for label in pair}

    def read(excerpt: str) -> Reading:
        table = {label: len(p.findall(excerpt)) for label, p in patterns.items()}
        quotes = tuple(
            m.group(0) for p in patterns.values() for m in p.finditer(excerpt)
        )
        return Reading(table, quotes)

    return _checked(
        Instance(
            family="compare",
            name=f"compare-{_size(tokens)}",
            files={"records.txt": text},
            question=(
                f"Count the records labelled {pair[0]} and the records labelled {pair[1]}: "
                "which label is more common?"
            ),
            kind="table",
            expected=max(pair, key=lambda lbl: counts[lbl]),
            target_tokens=tokens,
            seed=seed,
            read=read,
            meta={"counts": {lbl: counts[lbl] for lbl in pair}},
        )
    )


def pairs_task(tokens: int, *, seed: int = 0) -> Instance:
    """Labelled records; which users have records of both of two labels."""
    rng = random.Random(f"pairs/{seed}/{tokens}")
    text, rows = _records(rng, tokens)
    first, second = rng.sample(_LABELS, 2)
    conditions = (f"have a {first} record", f"have a {second} record")

    line = re.compile(
        r"^Record \d+ \| user (U\d{4}) \| label: (\w+) \|.*$", re.MULTILINE
    )

    def label_reader(label: str) -> Callable[[str], Reading]:
        def read_label(excerpt: str) -> Reading:
            quotes: dict[str, str] = {}
            for match in line.finditer(excerpt):
                if match.group(2) == label:
                    quotes.setdefault(match.group(1), match.group(0))
            users = sorted(quotes)
            return Reading(users, tuple(quotes[u] for u in users))

        return read_label

    def read(excerpt: str) -> Reading:
        seen: dict[str, set[str]] = {}
        quotes: dict[str, str] = {}
        for match in line.finditer(excerpt):
            user, label = match.group(1), match.group(2)
            if label in (first, second):
                seen.setdefault(user, set()).add(label)
                quotes.setdefault(user, match.group(0))
        users = sorted(u for u, labels in seen.items() if len(labels) == 2)
        return Reading(users, tuple(quotes[u] for u in users))

    by_user: dict[str, set[str]] = {}
    for _, user, label in rows:
        by_user.setdefault(user, set()).add(label)
    expected = sorted(u for u, labels in by_user.items() if {first, second} <= labels)
    return _checked(
        Instance(
            family="pairs",
            name=f"pairs-{_size(tokens)}",
            files={"records.txt": text},
            question=f"List the users who have both a {first} record and a {second} record.",
            kind="join",
            expected=expected,
            target_tokens=tokens,
            seed=seed,
            read=read,
            meta={"labels": [first, second]},
            conditions=conditions,
            entity="users",
            condition_readers={
                conditions[0]: label_reader(first), conditions[1]: label_reader(second)
            },
        )
    )


def multidoc_task(
    tokens: int, *, seed: int = 0, documents: int | None = None
) -> Instance:
    """A folder of memos in real prose; how many report one project delayed."""
    rng = random.Random(f"multidoc/{seed}/{tokens}/{documents}")
    count = documents or max(4, min(200, tokens // 2000))
    project = rng.choice(_PROJECTS)
    delayed = set(rng.sample(range(count), max(1, count // 3)))
    per_doc = max(200, tokens // count)
    files: dict[str, str] = {}
    for index in range(count):
        other = rng.choice([p for p in _PROJECTS if p != project])
        if index in delayed:
            fact = f"Memo {index:04d}: project {project} was delayed by {rng.randrange(2, 9)} weeks."
        else:
            fact = f"Memo {index:04d}: project {project} is on schedule."
        noise = f"Memo {index:04d} also notes that project {other} was delayed."
        body = _insert(_prose(rng, per_doc), fact, rng.random(), None)
        files[f"memo_{index:04d}.txt"] = _insert(body, noise, rng.random(), None)

    pattern = re.compile(rf"Memo \d{{4}}: project {project} was delayed by \d weeks\.")

    def read(excerpt: str) -> Reading:
        lines = tuple(m.group(0) for m in pattern.finditer(excerpt))
        return Reading(len(lines), lines)

    return _checked(
        Instance(
            family="multidoc",
            name=f"multidoc-{_size(tokens)}",
            files=files,
            question=f"How many memos report that project {project} was delayed?",
            kind="count",
            expected=len(delayed),
            target_tokens=tokens,
            seed=seed,
            read=read,
            meta={"documents": count},
        )
    )


_FAMILIES: dict[str, Callable[..., Instance]] = {
    "needle": needle_task,
    "count": records_count_task,
    "compare": records_compare_task,
    "pairs": pairs_task,
    "multidoc": multidoc_task,
}


def make_instance(
    family: str, tokens: int, *, seed: int = 0, **options: Any
) -> Instance:
    """Build an instance of a family by name (``needle``, ``count``, ...).

    Raises:
        ValueError: an unknown family.
    """
    try:
        make = _FAMILIES[family]
    except KeyError:
        msg = f"Unknown task family {family!r}; use one of {', '.join(_FAMILIES)}."
        raise ValueError(msg) from None
    return make(tokens, seed=seed, **options)


def suite(
    families: list[str],
    sizes: list[int],
    *,
    seed: int = 0,
    depths: tuple[float, ...] = (0.1, 0.5, 0.9),
    straddle_tokens: int | None = None,
) -> list[Instance]:
    """Instances of several families and sizes: for needles one per depth, plus
    one placed across a nominal span boundary when ``straddle_tokens`` is given."""
    instances: list[Instance] = []
    for tokens in sizes:
        for family in families:
            if family != "needle":
                instances.append(make_instance(family, tokens, seed=seed))
                continue
            instances += [needle_task(tokens, seed=seed, depth=d) for d in depths]
            if straddle_tokens and straddle_tokens < tokens:
                instances.append(
                    needle_task(
                        tokens, seed=seed, depth=0.5, straddle_tokens=straddle_tokens
                    )
                )
    return instances


# -- building blocks ------------------------------------------------------------


def _prose(rng: random.Random, tokens: int) -> str:
    target = int(tokens * CHARS_PER_TOKEN)
    paragraphs = filler_paragraphs(rng)
    out: list[str] = []
    size = 0
    while size < target:
        for paragraph in paragraphs:
            out.append(paragraph)
            size += len(paragraph) + 2
            if size >= target:
                break
        rng.shuffle(paragraphs)
    return "\n\n".join(out) + "\n"


def _insert(text: str, sentence: str, depth: float, straddle_tokens: int | None) -> str:
    """Put ``sentence`` at ``depth`` of ``text``: between paragraphs, or with its
    middle exactly on a multiple of ``straddle_tokens`` (in characters)."""
    if straddle_tokens:
        step = int(straddle_tokens * CHARS_PER_TOKEN)
        boundary = max(step, round(depth * len(text) / step) * step)
        at = min(max(boundary - len(sentence) // 2, 0), len(text))
        # Never inside a word: move to the nearest space before.
        at = text.rfind(" ", 0, at) + 1 if " " in text[:at] else at
        return f"{text[:at]}{sentence} {text[at:]}"
    at = int(depth * len(text))
    if depth >= 1.0:
        return text.rstrip("\n") + f"\n\n{sentence}\n"
    paragraph = text.rfind("\n\n", 0, at)
    at = paragraph + 2 if paragraph >= 0 else 0
    return f"{text[:at]}{sentence}\n\n{text[at:]}"


def _records(rng: random.Random, tokens: int) -> tuple[str, list[tuple[int, str, str]]]:
    weights = [rng.uniform(0.5, 2.0) for _ in _LABELS]
    # One user per ~400 tokens of records, at most 5,000 (IDs are 4 digits).
    users = [f"U{n:04d}" for n in rng.sample(range(10000), max(20, min(5000, tokens // 400)))]
    lines: list[str] = []
    rows: list[tuple[int, str, str]] = []
    size = 0
    target = int(tokens * CHARS_PER_TOKEN)
    number = 0
    while size < target:
        number += 1
        user = rng.choice(users)
        label = rng.choices(_LABELS, weights)[0]
        note = rng.choice(_NOTES)
        line = f"Record {number:07d} | user {user} | label: {label} | {note}"
        lines.append(line)
        rows.append((number, user, label))
        size += len(line) + 1
    return "\n".join(lines) + "\n", rows


_NOTES = (
    "customer wrote twice about the same order",
    "resolved on first reply",
    "escalated to the second line",
    "waiting for a photo of the parcel",
    "asked to speak to a manager",
    "closed without a reply from the customer",
    "duplicate of an older ticket",
    "needs a callback tomorrow morning",
)


def _label_line(label: str) -> re.Pattern[str]:
    return re.compile(
        rf"^Record \d+ \| user U\d{{4}} \| label: {label} \|.*$", re.MULTILINE
    )


def _size(tokens: int) -> str:
    if tokens >= 1_000_000 and tokens % 1_000_000 == 0:
        return f"{tokens // 1_000_000}m"
    return f"{tokens // 1000}k" if tokens >= 1000 else str(tokens)


def _checked(instance: Instance) -> Instance:
    """The expected answer must be what a reader of the whole source finds."""
    whole = "\n".join(instance.files[name] for name in sorted(instance.files))
    found = instance.read(whole).value
    if instance.family == "compare":
        found = max(found, key=found.get)
    if found != instance.expected:
        msg = f"generator bug in {instance.name}: reader found {found!r}, planted {instance.expected!r}"
        raise RuntimeError(msg)
    return instance
