"""Plan: the first look at question and source.

The plan fixes the answer kind, the sub-question each piece is asked, the span
budget of a leaf call, and an optional pre-filter. It is made in two steps:

1. :func:`make_plan`, by rules and before any model call: the kind from the
   question's wording and the span budget from window arithmetic (what is left
   of the worker's window after the instructions, the question and the output
   reserve, with a safety margin). A window too small for the instructions is
   refused here, before anything is paid.
2. :func:`model_plan`, by the root model: it sees the question and a cheap
   preview of the source (:func:`preview_source`: size, files, structure and a
   few samples) and returns kind, sub-question, chunk size and filter as JSON.
   Each field is checked (:func:`apply_model_plan`); a field that fails its
   check keeps the rules' value, and the plan records why. A filter that
   matches nowhere is dropped (it would skip everything).

Flags win over both: a field the user set is never changed by the model.
:func:`render_plan` shows a plan to people (``--dry-run``, ``-v``).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from typing import Any

import regex

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError
from rlm_graph.filtering import FILTER_SECONDS, compile_filter, filter_matches
from rlm_graph.nodes.prompts import MAX_CONDITIONS, leaf_messages, schema_for
from rlm_graph.nodes.types import Kind, Plan, Task, condition_key
from rlm_graph.source import Source
from rlm_graph.tokens import TokenCounter

__all__ = [
    "PLANNED_FIELDS",
    "PLAN_SCHEMA",
    "apply_model_plan",
    "guess_kind",
    "join_parts",
    "make_plan",
    "plan_messages",
    "preview_source",
    "render_plan",
    "root_task",
]

logger = logging.getLogger(__name__)

WINDOW_SAFETY = 0.9
"""Share of the window a request may fill: tokenizers of other vendors count
differently, and chat templates add tokens we cannot see."""
MIN_LEAF_TOKENS = 64
LOCAL_LEAF_TOKENS = 1500
"""Default span budget for embedded (``local/``) workers. llama.cpp on a CPU
reads prompts of up to ~3K tokens at full speed and much slower beyond
(STACK-FINDINGS.md section 7; docs/design.md), so many 1.5K-token leaves beat a
few window-sized ones."""

PREVIEW_SAMPLES = 3
PREVIEW_SAMPLE_CHARS = 400
PREVIEW_FILES = 20
"""The preview stays under ~1K tokens: the embedded model reads about 80 prompt
tokens a second, so a plan costs it 10-15 s."""
PLANNABLE_KINDS: tuple[Kind, ...] = ("text", "short", "list", "count", "table", "yesno", "join")

PLANNED_FIELDS = ("kind", "sub_question", "chunk_tokens", "filter")
"""What the root model's plan decides (each may be fixed by a flag instead)."""

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": list(PLANNABLE_KINDS)},
        "sub_question": {"type": "string", "maxLength": 300},
        "chunk_tokens": {"type": "integer", "minimum": 0},
        "filter": {"type": "string", "maxLength": 200},
        "conditions": {
            "type": "array", "maxItems": MAX_CONDITIONS, "items": {"type": "string", "maxLength": 200},
        },
        "entity": {"type": "string", "maxLength": 60},
    },
    "required": ["kind", "sub_question", "chunk_tokens", "filter"],
}

_TABLE = re.compile(
    r"\b(per|for each|by each|broken down by|for every)\b|"
    r"\bwhich\b.*\b(more|most|less|least|fewer|fewest)\b.*\b(common|often|frequent)",
    re.I,
)
_ASKING = (
    r"(?:please\s+)?(?:find|identify|determine|tell me|give me|show me|report|state|"
    r"work out|figure out|compute|calculate|check|say)(?:\s+out)?\s+"
)
"""An imperative that may come before a count or yes/no question ("Find out
whether ...", "Identify the number of ...")."""
_YESNO = re.compile(
    r"^\s*(is|are|was|were|does|do|did|has|have|had|can|could|will|would|should)\b|"
    rf"^\s*{_ASKING}(whether|if)\b",
    re.I,
)
_COUNT = re.compile(
    r"^\s*(how many|how often|count|what is the number of|number of)\b|"
    rf"^\s*{_ASKING}(the (total )?number of|how many|how often)\b",
    re.I,
)
_LIST = re.compile(
    r"^\s*(list|enumerate|name (all|every|each)|which (\w+ )*(are|were)|"
    r"what are (all )?the|give (me )?(all|every))\b",
    re.I,
)
_COUNT_CUE = re.compile(
    r"\b(how many|how often|the (total )?number of|count (of|the|all|how))\b", re.I
)
_YESNO_CUE = re.compile(
    r"\b(whether|is there|are there|was there|were there|if (there|any))\b", re.I
)
"""Count and yes/no cues anywhere in a question: they win over a join's shape
("Find the number of users who have both ...")."""


# The join shapes: "<entities> who/that/which/with/having <rest>" or "which
# [of the] <entities> <rest>", where <rest> is "[verb] both A and B [and C ...]"
# or "A [and] also B" ("as well as", "who also").
_JOIN_SUBJECT = re.compile(
    r"\b(?P<entity>[A-Za-z][\w-]*)\s+(?P<link>who|that|which|with|having)\s+(?P<rest>.+)$", re.I
)
_JOIN_WHICH = re.compile(
    r"^\s*(?:which|what)\s+(?:(?:ones?\s+)?of\s+(?:(?:the|these|those|all(?:\s+the)?)\s+)?)?"
    r"(?P<entity>[A-Za-z][\w-]*)\s+(?P<rest>.+)$",
    re.I,
)
_BOTH = re.compile(r"^(?P<verb>(?:[\w'-]+\s+){0,3}?)both\s+(?P<body>.+)$", re.I)
_PART_SEP = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.I)
_ALSO = re.compile(
    r"^(?P<a>.+?)\s*,?\s+(?P<sep>and also|and additionally|as well as|(?:who|that|which) also|also)"
    r"\s+(?P<b>.+)$",
    re.I,
)
_LEADING_ALSO = re.compile(r"^(?:also|additionally)\s+", re.I)
_ORDERING = re.compile(
    r"(?:\s*,\s*(?:sorted|ordered|arranged|ranked|grouped|listed)\s+(?:by|in|alphabetically|numerically)\b|"
    r"\s+sorted\s+(?:by|alphabetically|numerically)\b|"
    r",?\s+(?:in|by)\s+(?:alphabetical|numerical|ascending|descending)\s+order\b|"
    r",?\s+one per line\b).*$",
    re.I,
)
"""A trailing request about how to show the list (", sorted by id"): a join's
answer is always sorted, so it is dropped before the conditions are read.
Without a comma only "sorted by" and "in ... order" count: "an item ordered by
phone" may be a condition."""
_AFTERTHOUGHT = re.compile(
    r"^(?:(?:with|including|plus|along with|together with)\s+)?"
    r"(?:their|its|his|her|whose|the reasons?|why|how|when|where)\b|"
    r"^(?:including|plus|along with|together with)\b",
    re.I,
)
"""A part that asks for more about each entity ("... and their causes"): not a
condition, and more than a join answers."""
_DETERMINER = re.compile(r"^(a|an|the|some|any|one|two|three|at least|more than|\d)\b", re.I)
_JOIN_ASKS = re.compile(r"^\s*(which|find|show|get|identify|name)\b", re.I)
"""Besides a list's wording, how a join question may start ("What is the name of
the cat that has both ..." asks for one thing, not a list)."""
_NOT_ENTITIES = frozenset(
    "is are was were do does did has have had the a an of in on at to for those ones "
    "and or but this these it they there".split()
)
_LINK_VERBS = {"with": "with", "having": "have"}
"""Links that carry the verb of every condition ("users having both A and B":
"have A", "have B")."""


def join_parts(question: str) -> tuple[str | None, tuple[str, ...]] | None:
    """The entity noun and the conditions of a join question, or None.

    Recognised shapes (case-insensitive): "<entities> who/that/which [verb]
    both A and B [and C ...]" (the verb goes with each: "users who have both a
    refund record and a shipping record" gives "have a refund record", "have a
    shipping record"), "<entities> with/having both A and B" ("with A" /
    "have A"), "<entities> that A and also B" (also "as well as"), "<entities>
    who A also B" and "<entities> with A who also B", and "which [of the]
    <entities> ..." before any of them. In the "and also" shape a B that
    starts with an article or number, or is one word, takes A's first word
    ("ordered apples and also pears": "ordered apples", "ordered pears"). A
    trailing ", sorted by ..." is dropped.

    Where the wording cannot tell which words belong to which condition, this
    says None rather than guess: a part asking for more than the entities
    ("... and their causes"), a leftover comma, two conditions that are the
    same, or "both A and B <words>" where the words may belong to A too
    ("both posted and commented on the blog"). A shared ending after names is
    read as shared: "books that both Alice and Bob read" gives "Alice read",
    "Bob read".
    """
    text = _ORDERING.sub("", " ".join(question.split()).rstrip("?.! ")).rstrip(" ,")
    for shape in (_JOIN_SUBJECT, _JOIN_WHICH):
        found = shape.search(text)
        if found is None or found.group("entity").casefold() in _NOT_ENTITIES:
            continue
        conditions = _conditions_of(found.group("rest"), (found.groupdict().get("link") or "").casefold())
        if conditions is None:
            continue  # not a join shape here; the other shape may read it
        if _readable(conditions):
            return found.group("entity"), conditions
        return None  # a join shape whose conditions the rules cannot tell apart
    return None


def _conditions_of(rest: str, link: str) -> tuple[str, ...] | None:
    """The conditions in the words after the entity noun: None when they have
    no join shape, ``()`` when they have one the rules cannot read."""
    both = _BOTH.match(rest)
    if both is not None:
        return _both_conditions(both.group("verb").strip(), both.group("body"), link)
    also = _ALSO.match(rest)
    if also is not None:
        return _also_conditions(also.group("a").strip(), also.group("sep").casefold(), also.group("b").strip(), link)
    return None


def _both_conditions(verb: str, body: str, link: str) -> tuple[str, ...]:
    parts = [part.strip(" ,;") for part in _PART_SEP.split(body)]
    parts = [parts[0], *(_LEADING_ALSO.sub("", part) for part in parts[1:])]
    if not 2 <= len(parts) <= MAX_CONDITIONS or not all(parts):
        return ()
    if not _AFTERTHOUGHT.match(parts[0]) and any(_AFTERTHOUGHT.match(p) for p in parts[1:]):
        return ()
    if not verb and link in ("who", "that", "which"):
        parts = _shared_ending(parts)
    prefix = _LINK_VERBS.get(link, "")
    return tuple(" ".join(w for w in (prefix, verb, part) if w) for part in parts)


def _shared_ending(parts: list[str]) -> list[str]:
    """Parts of "both A and B <ending>" with no verb before "both": names
    share the ending ("Alice and Bob read": "Alice read", "Bob read"); one-word
    parts before a longer last part cannot be told apart ("posted and
    commented on the blog": is it "posted on the blog"?) and give ``[]``."""
    *first, last = parts
    words = last.split()
    head = len(list(itertools.takewhile(lambda w: w[:1].isupper(), words)))
    names = all(w[:1].isupper() for part in first for w in part.split())
    if names and 0 < head < len(words):
        ending = " ".join(words[head:])
        return [f"{part} {ending}" for part in first] + [" ".join(words)]
    if any(len(part.split()) == 1 for part in first) and len(words) > 1:
        return []
    return parts


def _also_conditions(first: str, separator: str, second: str, link: str) -> tuple[str, ...]:
    prefix = _LINK_VERBS.get(link)
    if prefix:
        first = f"{prefix} {first}"
    if separator == "also" or (separator.endswith(" also") and not separator.startswith("and")):
        # "users who have A also have B", "users with A who also have B": B has its own verb.
        return first, second
    if link == "with" or _DETERMINER.match(second) or len(second.split()) == 1:
        second = f"{first.split()[0]} {second}"
    return first, second


def _readable(conditions: tuple[str, ...]) -> bool:
    """Whether conditions read from wording are distinct and clean: no empty
    one, no leftover comma or trailing request, no two the same."""
    if len(conditions) < 2 or any(not c or "," in c for c in conditions):
        return False
    if any(re.search(r"\band\s+(their|its|his|her|whose)\b", c, re.I) for c in conditions):
        return False
    return len({condition_key(c) for c in conditions}) == len(conditions)


def guess_kind(question: str) -> Kind:
    """Guess the answer kind from the question's wording.

    A count or yes/no cue anywhere in a question wins over a join's shape:
    "Find the number of users who have both ..." is a count.
    """
    if _TABLE.search(question) and (_COUNT.search(question) or "which" in question.lower()):
        return "table"
    if _COUNT.search(question):
        return "count"
    if _YESNO.search(question):
        return "yesno"
    if (_LIST.search(question) or _JOIN_ASKS.search(question)) and join_parts(question) is not None:
        if _COUNT_CUE.search(question):
            return "count"
        if _YESNO_CUE.search(question):
            return "yesno"
        return "join"
    if _LIST.search(question):
        return "list"
    return "text"


def make_plan(
    question: str,
    source: Source,
    config: RunConfig,
    *,
    count: TokenCounter,
    window: int,
    local_worker: bool | None = None,
) -> Plan:
    """Fix kind, sub-question and span budgets for a run.

    ``local_worker`` says whether the worker is the embedded model (its spans
    default to :data:`LOCAL_LEAF_TOKENS`); None reads it from the model name
    in ``config`` (a router config's groups need it said).

    Raises:
        ConfigError: the worker's window cannot hold the instructions, the
            question and the output reserve with room left for any span.
    """
    if not question.strip():
        msg = "The question is empty. Pass --question 'What ...?'."
        raise ConfigError(msg)
    record_schema = config.answer_schema
    if record_schema is not None and config.kind not in ("auto", "schema"):
        msg = (
            f"kind {config.kind!r} and a schema conflict: with a schema the answer is "
            "a list of records (kind 'schema'). Pass one of them, not both."
        )
        raise ConfigError(msg)
    if config.conditions and config.kind not in ("auto", "join"):
        msg = (
            f"kind {config.kind!r} and --condition conflict: conditions are for the "
            "'join' kind. Drop --kind or the conditions."
        )
        raise ConfigError(msg)
    if record_schema is not None:
        kind: Kind = "schema"
    elif config.conditions:
        kind = "join"
    else:
        kind = guess_kind(question) if config.kind == "auto" else config.kind
    if kind == "schema" and record_schema is None:
        msg = "--kind schema needs a schema: pass --schema FILE (a JSON Schema of one record)."
        raise ConfigError(msg)
    if config.entity is not None and kind != "join":
        # Decided on the rules' kind, before any call: the model planner may
        # still turn a list into a join, but an --entity that is then maybe
        # ignored is worse than asking for --kind join.
        msg = (
            f"--entity names what a join answer lists, but this question is planned as a "
            f"{kind!r} answer. Add --kind join (with --condition, once per condition) or drop --entity."
        )
        raise ConfigError(msg)
    entity, conditions = _join_plan(question, kind, config)

    overhead = _prompt_overhead(question, kind, count, record_schema, conditions, entity)
    usable = int(window * WINDOW_SAFETY) - overhead - config.max_output_tokens
    if usable < MIN_LEAF_TOKENS:
        msg = (
            f"The worker's window ({window} tokens) is too small: instructions and "
            f"question take {overhead} tokens and the output reserve "
            f"{config.max_output_tokens}, leaving {max(usable, 0)} for the source. "
            "Use a model with a larger window, a shorter question, or a smaller "
            "--max-output-tokens."
        )
        raise ConfigError(msg)
    if local_worker is None:
        local_worker = config.leaf_model.startswith("local/")
    default = LOCAL_LEAF_TOKENS if local_worker else usable
    leaf_tokens = min(config.chunk_tokens or default, usable)
    overlap = min(config.overlap_tokens, leaf_tokens // 4)

    overridden = tuple(
        name for name, value in (
            ("kind", config.kind != "auto" or record_schema is not None or bool(config.conditions)),
            ("conditions", config.conditions),
            ("sub_question", config.sub_question),
            ("chunk_tokens", config.chunk_tokens),
            ("overlap_tokens", "overlap_tokens" in config.model_fields_set),
            # "" is the user's "no filter": the model may not add one.
            ("filter", config.filter is not None),
        ) if value
    )
    return Plan(
        filter=_usable_filter(config.filter, source),
        kind=kind,
        question=question,
        sub_question=config.sub_question or question,
        record_schema=record_schema,
        conditions=conditions,
        entity=entity,
        overridden=overridden,
        leaf_tokens=leaf_tokens,
        overlap_tokens=overlap,
        output_tokens=config.max_output_tokens,
        max_output_tokens=max(config.max_output_tokens, min(4 * config.max_output_tokens, usable // 2)),
        window=window,
        fan_out=config.fan_out,
        fan_in=config.fan_in,
        max_depth=config.max_depth,
        source_tokens=count(source.text),
    )


def _join_plan(question: str, kind: Kind, config: RunConfig) -> tuple[str | None, tuple[str, ...]]:
    """The entity noun and conditions of a join plan: the user's, else the
    question's wording; ``(None, ())`` for other kinds.

    Raises:
        ConfigError: a join whose conditions neither the user gave nor the
            wording shows, or with fewer than two or more than
            :data:`~rlm_graph.nodes.prompts.MAX_CONDITIONS` of them.
    """
    if kind != "join":
        return None, ()
    found = join_parts(question)
    entity = config.entity or (found[0] if found else None)
    conditions = config.conditions or (found[1] if found else ())
    if not conditions:
        msg = (
            "--kind join needs the conditions an entity must meet, and the question's "
            "wording does not show them (it reads shapes like 'users who have both a X "
            "and a Y'). Pass each with --condition, e.g. --condition 'has a refund "
            "record' --condition 'has a shipping record' (and --entity users)."
        )
        raise ConfigError(msg)
    if not 2 <= len(conditions) <= MAX_CONDITIONS:
        msg = (
            f"a join needs 2 to {MAX_CONDITIONS} conditions, not {len(conditions)}: "
            "pass --condition once per condition (one condition is a list question)."
        )
        raise ConfigError(msg)
    return entity, tuple(conditions)


def preview_source(source: Source, count: TokenCounter) -> str:
    """A cheap look at a source for the planner: size, files, structure, samples.

    Costs one token count of the whole text (done by :func:`make_plan` anyway
    when cached by the caller) and a few slices; never more than ~1K tokens.
    """
    text = source.text
    lines = text.count("\n") + 1
    names = [f.name for f in source.files[:PREVIEW_FILES]]
    more = f" (and {len(source.files) - PREVIEW_FILES} more)" if len(source.files) > PREVIEW_FILES else ""
    paragraphs = len(re.findall(r"\n\s*\n", text)) + 1
    parts = [
        f"Size: {len(text):,} characters in {len(source.files)} file(s), "
        f"{lines:,} lines, {paragraphs:,} paragraphs.",
        f"Files: {', '.join(names)}{more}",
    ]
    step = max(len(text) // PREVIEW_SAMPLES, 1)
    for index in range(PREVIEW_SAMPLES):
        start = min(index * step, max(len(text) - PREVIEW_SAMPLE_CHARS, 0))
        sample = " ".join(text[start : start + PREVIEW_SAMPLE_CHARS].split())
        parts.append(f"Sample {index + 1} (at {100 * start // max(len(text), 1)}%): {sample}")
    return "\n".join(parts)


def plan_messages(question: str, preview: str, rules: Plan) -> list[dict[str, str]]:
    """The planner's prompt: the question, the preview and what to decide."""
    user = (
        f"A question will be answered over a long source, read in pieces.\n\n"
        f"Question: {question}\n\nPreview of the source:\n{preview}\n\n"
        "Decide:\n"
        '- kind: "short" (a name, number, date or phrase stated in the text), '
        '"text" (an explanation), "list" (items), "count" (a number), '
        '"table" (counts per label), "yesno", or "join" (the things that meet '
        "every one of several conditions, each of which may be met in a different "
        'part of the source: "users who have both a refund and a shipping record").\n'
        "- sub_question: what to ask each piece (usually the question itself).\n"
        f"- chunk_tokens: tokens per piece, up to {rules.leaf_tokens} (0 = default).\n"
        "- filter: a short regular expression that every piece which can matter "
        'contains, or "" to read every piece.\n'
        '- for "join" only: conditions (each one alone, e.g. ["has a refund record", '
        '"has a shipping record"]) and entity (what is listed, e.g. "users").\n'
        'Reply as {"kind": ..., "sub_question": ..., "chunk_tokens": ..., "filter": ...}.'
    )
    return [
        {"role": "system", "content": "You plan how to read a long text. Reply with JSON only."},
        {"role": "user", "content": user},
    ]


def apply_model_plan(rules: Plan, reply: Any, source: Source) -> Plan:
    """Take the checked fields of a model's plan over the rules' plan.

    A field the user set (``rules.overridden``) is kept. A field that fails its
    check keeps the rules' value; ``made_by`` says which were rejected and why.
    A reply that is not a JSON object leaves the rules' plan, marked as such.
    """
    if not isinstance(reply, dict):
        return rules.model_copy(update={"made_by": "rules (model plan was not JSON)"})
    update: dict[str, Any] = {}
    rejected: list[str] = []
    for name, check in _FIELD_CHECKS.items():
        if name in rules.overridden or name not in reply:
            continue
        value, problem = check(rules, reply[name], source)
        if problem:
            rejected.append(f"{name}: {problem}")
        elif value is not None:
            update[name] = value
    _settle_join(rules, reply, update, rejected)
    _settle_filter(rules, update, rejected)
    if "chunk_tokens" in update:
        tokens = update.pop("chunk_tokens")
        update["leaf_tokens"] = tokens
        update["overlap_tokens"] = min(rules.overlap_tokens, tokens // 4)
    update["made_by"] = "model" + (f" (rules kept for {'; '.join(rejected)})" if rejected else "")
    if not any(k != "made_by" for k in update):
        update["made_by"] = "rules (model plan rejected: " + "; ".join(rejected or ["empty"]) + ")"

    return rules.model_copy(update=update)


def render_plan(plan: Plan) -> str:
    """The plan as a few lines for people (``--dry-run``, logs)."""
    set_by = f" (set by flags: {', '.join(plan.overridden)})" if plan.overridden else ""
    leaves = max(1, math.ceil(plan.source_tokens / max(plan.leaf_tokens, 1)))
    lines = [
        f"plan made by {plan.made_by}{set_by}",
        f"  answer kind:   {plan.kind}",
        f"  sub-question:  {plan.sub_question}",
        *_conditions_lines(plan),
        f"  leaf spans:    up to {plan.leaf_tokens:,} tokens, overlap {plan.overlap_tokens}; "
        f"source {plan.source_tokens:,} tokens (about {leaves:,} leaves before filtering)",
        f"  pre-filter:    {plan.filter or 'none (every span is read)'}",
        f"  limits:        depth {plan.max_depth}, fan-out {plan.fan_out}, fan-in {plan.fan_in}, "
        f"output {plan.output_tokens} tokens, window {plan.window:,}",
    ]
    if plan.record_schema:
        fields = ", ".join(plan.record_schema.get("properties", {}))
        lines.append(f"  record fields: {fields}")
    return "\n".join(lines)


def _conditions_lines(plan: Plan) -> list[str]:
    if plan.kind != "join":
        return []
    numbered = "; ".join(f"{i + 1}. {c}" for i, c in enumerate(plan.conditions))
    listed = plan.entity or "entities"
    return [f"  conditions:    {numbered} (listed: the {listed} meeting all)"]


def root_task(plan: Plan, source: Source) -> Task:
    """The task at the top of the tree: the whole source and the user's question."""
    return Task(
        id="0", start=0, end=len(source.text), depth=0,
        question=plan.question, tokens=plan.source_tokens,
    )


def piece_budget(plan: Plan, task: Task) -> int:
    """Largest piece, in tokens, when ``task`` is split.

    Above the last level a split makes at most ``fan_out`` pieces; the levels
    left below must still be able to bring every piece down to a leaf.
    """
    levels_left = plan.max_depth - task.depth
    if levels_left <= 1 or task.tokens <= plan.leaf_tokens * plan.fan_out:
        return plan.leaf_tokens
    per_piece = math.ceil(task.tokens / plan.fan_out * 1.1)
    reachable = plan.leaf_tokens * plan.fan_out ** (levels_left - 1)

    return max(plan.leaf_tokens, min(per_piece, reachable))


def _usable_filter(pattern: str | None, source: Source) -> str | None:
    """The user's pre-filter, unless it would skip the whole source (then no
    filter). A filter that matches only file header lines matches nowhere.

    Raises:
        ConfigError: searching the source took longer than the time cap.
    """
    if not pattern:
        return None
    try:
        found = filter_matches(compile_filter(pattern), source.text)
    except TimeoutError:
        msg = (
            f"--filter {pattern!r} took more than {FILTER_SECONDS:g} s to search the "
            "source (nested repeats such as (a+)+ backtrack); use a simpler pattern."
        )
        raise ConfigError(msg) from None
    if not found:
        logger.warning("filter %r matches nowhere in the source; reading everything", pattern)
        return None
    return pattern


def _check_kind(rules: Plan, value: Any, source: Source) -> tuple[Any, str | None]:
    if value not in PLANNABLE_KINDS:
        return None, f"unknown kind {value!r}"
    cue = guess_kind(rules.question)
    # The wording rules only speak up on a clear cue ("how many", "is ..."); a
    # model that disagrees with one is more likely wrong than the cue. A join
    # is a list whose conditions may be met apart: a model may see one where
    # the rules saw a list (its conditions are checked in _settle_join).
    if cue != "text" and value != cue and not (cue == "list" and value == "join"):
        return None, f"{value!r} contradicts the question's wording ({cue!r})"
    return value, None


def _settle_join(rules: Plan, reply: dict[str, Any], update: dict[str, Any], rejected: list[str]) -> None:
    """Give a model's ``join`` kind its conditions, or keep the rules' kind.

    The model's conditions are taken when the kind ends up ``join`` and the
    user gave none, if they pass :func:`_unasked_condition`: two to
    :data:`MAX_CONDITIONS` distinct non-empty strings, each of whose
    distinctive words the question says. A join without usable conditions
    (neither the model's nor the rules') is rejected. A kind the model changed
    away from join drops the conditions.
    """
    kind = update.get("kind", rules.kind)
    if kind != "join":
        if rules.kind == "join" and "kind" in update:
            update.update(conditions=(), entity=None)
        return
    if "conditions" in rules.overridden:
        return
    said = reply.get("conditions")
    conditions: tuple[str, ...] = ()
    if isinstance(said, list) and all(isinstance(c, str) for c in said):
        conditions = tuple(" ".join(c.split())[:200] for c in said if c.strip())
    problem = _unasked_condition(conditions, rules.question) if len(conditions) >= 2 else None
    if problem:
        # Made up, not read: it would steer every leaf towards something else.
        rejected.append(f"conditions: {problem}")
        conditions = ()
        said = None
    if 2 <= len(conditions) <= MAX_CONDITIONS:
        update["conditions"] = conditions
        entity = reply.get("entity")
        if isinstance(entity, str) and entity.strip() and rules.entity is None:
            update["entity"] = " ".join(entity.split())[:60]
        return
    if said is not None:
        rejected.append(f"conditions: need 2 to {MAX_CONDITIONS} non-empty strings, got {str(said)[:80]}")
    if len(rules.conditions) < 2 and "kind" in update:
        update.pop("kind")
        rejected.append("kind: 'join' without two or more conditions")


_CONDITION_STOP_WORDS = frozenset(
    "the and for that this with from are was were his her its their them they who which "
    "what when where how did does not but had has have having been being into also both "
    "any some all each every one there then than who whom whose should would could can "
    "will may must about".split()
)
"""Words a condition may use without the question saying them."""


def _unasked_condition(conditions: tuple[str, ...], question: str) -> str | None:
    """Why a model's conditions are not the question's, or None.

    Two that differ only in case or spacing are one condition said twice. Each
    condition's distinctive words (those not in every condition, minus stop
    words and words under three letters that are not numbers) must occur in
    the question, allowing for endings ("refunds" for "refund", "shipped" for
    "shipping"): "have a refund record" + "have a shipping record" asked of
    "List the users who have a refund record." invents "shipping".
    """
    keys = [condition_key(c) for c in conditions]
    if len(set(keys)) < len(keys):
        twice = next(c for c, k in zip(conditions, keys, strict=True) if keys.count(k) > 1)
        return f"{twice[:60]!r} is given twice"
    words = [_content_words(c) for c in conditions]
    asked = _content_words(question)
    for condition, own in zip(conditions, words, strict=True):
        for word in own:
            if all(any(_same_word(word, w) for w in other) for other in words):
                continue  # shared by every condition ("record"): not what sets it apart
            if not any(_same_word(word, w) for w in asked):
                return f"{condition[:60]!r} says {word!r}, which the question does not"
    return None


def _content_words(text: str) -> list[str]:
    words = (w.casefold() for w in re.findall(r"\w+", text))
    return [w for w in words if (len(w) >= 3 or any(ch.isdigit() for ch in w)) and w not in _CONDITION_STOP_WORDS]


def _same_word(a: str, b: str) -> bool:
    """The same word up to its ending: equal, or sharing at least four
    letters with at most four more in either ("ship", "shipping", "shipped")."""
    if a == b:
        return True
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return shared >= 4 and max(len(a), len(b)) - shared <= 4


def _check_sub_question(rules: Plan, value: Any, source: Source) -> tuple[Any, str | None]:
    text = " ".join(str(value or "").split())
    if not text:
        return None, None
    asked = set(re.findall(r"\w{4,}", rules.question.casefold()))
    kept = asked & set(re.findall(r"\w{4,}", text.casefold()))
    if asked and len(kept) * 2 < len(asked):
        return None, "drops most of the question's words"
    return text, None


def _check_chunk_tokens(rules: Plan, value: Any, source: Source) -> tuple[Any, str | None]:
    if not isinstance(value, int) or isinstance(value, bool) or value == 0:
        return None, None
    if not MIN_LEAF_TOKENS <= value <= rules.leaf_tokens:
        return None, f"{value} is outside {MIN_LEAF_TOKENS}-{rules.leaf_tokens}"
    if "overlap_tokens" in rules.overridden and value // 4 < rules.overlap_tokens:
        # The overlap is at most a quarter of a leaf: this size would cut the user's.
        return None, f"{value} is too small for --overlap-tokens {rules.overlap_tokens}"
    return value, None


def _check_filter(rules: Plan, value: Any, source: Source) -> tuple[Any, str | None]:
    pattern = str(value or "").strip()
    if not pattern:
        return None, None
    try:
        compiled = compile_filter(pattern)
    except regex.error:
        return None, f"{pattern!r} is not a regular expression"
    ungrounded = _ungrounded(pattern, _words(rules.question))
    if ungrounded:
        # A model filter skips spans unread: one built from words the question
        # never says is the model's guess at what matters (ut5: "user=alice
        # request id=100" for "How many ERROR lines are there?" read 5 of 115).
        return None, f"{pattern!r} is not grounded in the question: {ungrounded} (reading everything)"
    try:
        found = filter_matches(compiled, source.text)
    except TimeoutError:
        return None, f"{pattern!r} took more than {FILTER_SECONDS:g} s to search (dropped)"
    if not found:
        # Safety rule: a filter that would skip every span means no filter.
        return None, f"{pattern!r} matches nowhere (reading everything)"
    return pattern, None


def _settle_filter(rules: Plan, update: dict[str, Any], rejected: list[str]) -> None:
    """Drop a model's filter that does not look for every condition of a join.

    A join's conditions may each be met in a different span: a filter that
    finds only one condition's spans (``refund`` for "a refund record and a
    shipping record") skips the others' unread and loses entities. Each
    condition needs an alternative of the filter made only of that
    condition's own words (those no other condition has).
    """
    pattern = update.get("filter")
    if pattern is None or update.get("kind", rules.kind) != "join":
        return
    conditions = update.get("conditions", rules.conditions)
    problem = _join_filter_problem(pattern, conditions)
    if problem:
        update.pop("filter")
        rejected.append(f"filter: {pattern!r} {problem} (reading everything)")


def _join_filter_problem(pattern: str, conditions: tuple[str, ...]) -> str | None:
    """Why ``pattern`` cannot pre-filter a join over ``conditions``, or None."""
    branches = _filter_branches(pattern)
    for index, condition in enumerate(conditions):
        others = [w for i, c in enumerate(conditions) if i != index for w in _words(c)]
        own = [w for w in _words(condition) if not _said(w, others)]
        if not own:
            return f"cannot be checked: condition {index + 1} {condition!r} has no words of its own"
        if not any(words and all(_said(w, own) for w in words) for words in branches):
            return f"does not look for condition {index + 1} ({condition!r}) by its own words"
    return None


_WORD = regex.compile(r"[^\W_]+")
_REPEAT = regex.compile(r"\{(\d*)(?:,\d*)?\}")


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def _said(word: str, words: list[str]) -> bool:
    """Whether ``word`` is one of ``words``: the same, or for words of four or
    more letters the same first four letters ("errors" says "error"), as the
    join conditions are checked against the question."""
    if len(word) < 4 or not word.isalpha():
        return word in words
    return any(len(w) >= 4 and w[:4] == word[:4] for w in words)


def _ungrounded(pattern: str, asked: list[str]) -> str | None:
    """Why a filter is not grounded in the question's words ``asked``, or None.

    Grounded: some top-level alternative of the pattern has literal words and
    every one of them is said in the question. The whole pattern then matches
    at least every span that alternative matches, so it skips no more than a
    filter made of the question's own words would. Parts that are not literal
    words (classes, anchors, ``\\d``, a letter made optional by ``?``/``*``)
    are not checked; words inside groups count as required, which errs
    towards rejecting (reading everything costs calls, never answers).
    """
    problems = []
    for words in _filter_branches(pattern):
        missing = [w for w in words if not _said(w, asked)]
        if words and not missing:
            return None
        problems.append(f"{missing[0]!r} is not a word of it" if missing else "it has no literal word")
    return problems[0] if problems else "it has no literal word"


def _filter_branches(pattern: str) -> list[list[str]]:
    """The literal words of each alternative of a regex (casefolded).

    Alternations inside groups are spread out (``\\b(refund|ship)`` has the
    alternatives ``refund`` and ``ship``; an optional group adds one without
    it). A light scan, not a full parser: escapes, character classes, counted
    repeats and group prefixes separate words, a literal character followed
    by ``?`` or ``*`` is dropped (it may be absent), and past
    :data:`MAX_FILTER_BRANCHES` alternatives a group's words all count as
    required (which errs towards rejecting).
    """
    branches, _ = _scan_alternatives(pattern, 0)
    return [_words(branch) for branch in branches]


MAX_FILTER_BRANCHES = 64


def _scan_alternatives(pattern: str, i: int) -> tuple[list[str], int]:
    """The alternatives' literal texts from ``i`` to the ``)`` closing the
    group (or the end), and the index past it."""
    done: list[str] = []
    current = [""]
    literal_last = False
    while i < len(pattern):
        char = pattern[i]
        step, literal = " ", False
        if char == ")":
            return done + current, i + 1
        if char == "|":
            done, current = done + current, [""]
            i += 1
            continue
        if char == "(":
            inner, i = _scan_alternatives(pattern, _skip_group_prefix(pattern, i))
            repeat = _optional_repeat(pattern, i)
            if repeat:
                inner, i = [*inner, ""], repeat
            if len(current) * len(inner) > MAX_FILTER_BRANCHES:
                inner = [" ".join(inner)]
            current = [c + alt for c in current for alt in inner]
            literal_last = False
            continue
        if char == "\\":
            i = _skip_escape(pattern, i)
        elif char == "[":
            i = _skip_class(pattern, i)
        elif _optional_repeat(pattern, i) and literal_last:
            current, step = [c[:-1] for c in current], ""
            i = _optional_repeat(pattern, i)
        elif (repeat := _REPEAT.match(pattern, i)) is not None:
            i = repeat.end()
        else:
            step, literal = (char, True) if char not in ".^$*+?" else (" ", False)
            i += 1
        current = [c + step for c in current]
        literal_last = literal

    return done + current, i


def _optional_repeat(pattern: str, i: int) -> int:
    """Index past a repeat at ``i`` that allows zero times (``?``, ``*``,
    ``{0,n}``, with a lazy or possessive mark), or 0 when there is none."""
    found = regex.match(r"(?:[?*]|\{0*(?:,\d*)?\})[?+]?", pattern[i:])
    return i + found.end() if found else 0


def _skip_escape(pattern: str, i: int) -> int:
    """Index past the escape at ``i`` (``\\d``, ``\\.``, ``\\x41``, ``\\p{L}``, ``\\12``)."""
    code = pattern[i + 1 : i + 2]
    i += 2
    if not code:
        return i
    if code.isdigit():
        while i < len(pattern) and pattern[i].isdigit():
            i += 1
    elif i < len(pattern) and pattern[i] == "{" and code in "xuNpPg":
        close = pattern.find("}", i)
        i = close + 1 if close > 0 else len(pattern)
    elif code in "xuU":
        digits = {"x": 2, "u": 4, "U": 8}[code]
        while digits and i < len(pattern) and pattern[i] in "0123456789abcdefABCDEF":
            i, digits = i + 1, digits - 1
    elif code in "pP" and i < len(pattern):
        i += 1
    return i


def _skip_class(pattern: str, i: int) -> int:
    """Index past the character class opening at ``i``."""
    i += 1
    if pattern[i : i + 1] == "^":
        i += 1
    if pattern[i : i + 1] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _skip_group_prefix(pattern: str, i: int) -> int:
    """Index past ``(`` and any ``?:``, ``?i)``, ``?P<name>``, ``?<=`` ... after it."""
    i += 1
    if pattern[i : i + 1] != "?":
        return i
    named = regex.match(r"\?(?:P?<(?![=!])\w+>|P=\w+\)|#[^)]*\)|[a-zA-Z-]*[:)]|<?[=!]|[>|])", pattern[i:])
    return i + (named.end() if named else 1)


_FIELD_CHECKS = {
    "kind": _check_kind,
    "sub_question": _check_sub_question,
    "chunk_tokens": _check_chunk_tokens,
    "filter": _check_filter,
}


def _prompt_overhead(
    question: str,
    kind: Kind,
    count: TokenCounter,
    record_schema: dict[str, Any] | None = None,
    conditions: tuple[str, ...] = (),
    entity: str | None = None,
) -> int:
    probe = Task(id="0", start=0, end=0, depth=0, question=question, tokens=0)
    messages = leaf_messages(
        kind, probe, "", feedback=None, file_hint="example.txt", record_schema=record_schema,
        conditions=conditions, entity=entity,
    )
    text = "\n".join(m["content"] for m in messages)
    schema_tokens = count(str(schema_for(kind, record_schema, conditions=len(conditions))))
    # Chat templates add a few tokens per message.
    return count(text) + schema_tokens + 8 * len(messages)
