"""Plan: the first look at question and source, before any model call.

The plan fixes the answer kind, the sub-question each piece is asked, and the
span budget of a leaf call: what is left of the worker's window after the
instructions, the question and the output reserve, with a safety margin. A
window too small for the instructions is refused here, before anything is paid.

LIMITATION: the plan is made by rules (question wording, window arithmetic),
not by the root model; a model-made plan with pre-filters is planned work.
"""

from __future__ import annotations

import logging
import math
import re

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError
from rlm_graph.nodes.prompts import leaf_messages, schema_for
from rlm_graph.nodes.types import Kind, Plan, Task
from rlm_graph.source import Source
from rlm_graph.tokens import TokenCounter

__all__ = ["guess_kind", "make_plan", "root_task"]

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

_COUNT = re.compile(r"^\s*(how many|how often|count|what is the number of|number of)\b", re.I)
_LIST = re.compile(
    r"^\s*(list|enumerate|name (all|every|each)|which (\w+ )*(are|were)|"
    r"what are (all )?the|give (me )?(all|every))\b",
    re.I,
)


def guess_kind(question: str) -> Kind:
    """Guess the answer kind from the question's wording."""
    if _COUNT.search(question):
        return "count"
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
) -> Plan:
    """Fix kind, sub-question and span budgets for a run.

    Raises:
        ConfigError: the worker's window cannot hold the instructions, the
            question and the output reserve with room left for any span.
    """
    if not question.strip():
        msg = "The question is empty. Pass --question 'What ...?'."
        raise ConfigError(msg)
    kind = guess_kind(question) if config.kind == "auto" else config.kind

    overhead = _prompt_overhead(question, kind, count)
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
    default = LOCAL_LEAF_TOKENS if config.leaf_model.startswith("local/") else usable
    leaf_tokens = min(config.chunk_tokens or default, usable)
    overlap = min(config.overlap_tokens, leaf_tokens // 4)

    return Plan(
        filter=_usable_filter(config.filter, source),
        kind=kind,
        question=question,
        sub_question=question,
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
    """The pre-filter, unless it would skip the whole source (then no filter)."""
    if pattern and not re.search(pattern, source.text, re.IGNORECASE):
        logger.warning("filter %r matches nowhere in the source; reading everything", pattern)
        return None
    return pattern


def _prompt_overhead(question: str, kind: Kind, count: TokenCounter) -> int:
    probe = Task(id="0", start=0, end=0, depth=0, question=question, tokens=0)
    messages = leaf_messages(kind, probe, "", feedback=None, file_hint="example.txt")
    text = "\n".join(m["content"] for m in messages)
    schema_tokens = count(str(schema_for(kind)))
    # Chat templates add a few tokens per message.
    return count(text) + schema_tokens + 8 * len(messages)
