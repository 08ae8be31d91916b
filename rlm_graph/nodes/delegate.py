"""Delegate: give each piece its own task, and run a task's whole lifecycle.

:class:`Engine` holds the stage functions every task goes through: split its
span, call the worker on a leaf, verify the reply, decide what to do next
(accept, ask again with the reason, give more output room, split finer, or
give up), and merge the children's answers. The root task runs these stages as
nodes of the LangGraph state machine (:mod:`rlm_graph.graph`); every task below
it runs them in :meth:`Engine.solve`, as durable LangGraph tasks, so that one
subtree never waits for a slow sibling and each finished call survives a crash.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel

from rlm_graph.config import RunConfig
from rlm_graph.errors import BudgetExceeded, ContextWindowError, ModelCallError
from rlm_graph.filtering import FILTER_SECONDS, compile_filter, filter_matches
from rlm_graph.models import Completion, ModelClient, Role
from rlm_graph.nodes.merge import (
    dedupe_text,
    short_candidates,
    merge_by_code,
    merge_evidence,
    usable_answers,
)
from rlm_graph.nodes.plan import (
    MIN_LEAF_TOKENS,
    PLAN_SCHEMA,
    PLANNED_FIELDS,
    apply_model_plan,
    piece_budget,
    plan_messages,
    preview_source,
)
from rlm_graph.nodes.prompts import (
    NONE_OF_THEM,
    JUDGE_SCHEMA,
    MERGE_SCHEMA,
    choice_schema,
    choose_messages,
    judge_messages,
    leaf_messages,
    merge_messages,
    schema_for,
)
from rlm_graph.nodes.types import Answer, Evidence, Outcome, Plan, Task
from rlm_graph.nodes.verify import Verdict, parse_json_reply, verify_leaf
from rlm_graph.source import Source
from rlm_graph.split import split_span
from rlm_graph.tree import Group, boundary_levels, child_groups, root_height

__all__ = ["SIZE_VERDICTS", "CallResult", "Decision", "Engine", "Event"]

logger = logging.getLogger(__name__)

_META_ANSWER = re.compile(
    r"(existing|original|previous) answer|already (complete|appropriate)|no change",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Event:
    """Progress of a run, for displays and logs."""

    kind: Literal[
        "run_started", "plan_made", "plan_ready", "task_started", "task_done", "call_done"
    ]
    """``plan_made`` comes after the model's planning call (its data: the kind
    before and after, conditions); ``plan_ready`` once the plan the run follows
    is final (with or without a planning call); its data holds ``made_by``."""
    task_id: str = ""
    depth: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallResult:
    """A model call's result as stored: a completion or a per-task failure."""

    completion: Completion | None = None
    error: Literal["context", "failed", "stopped"] | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict form that every checkpointer can store."""
        from dataclasses import asdict

        done = asdict(self.completion) if self.completion else None
        return {"completion": done, "error": self.error, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallResult:
        """Rebuild from :meth:`to_dict` output."""
        done = data.get("completion")
        return cls(
            completion=Completion(**done) if done else None,
            error=data.get("error"),
            message=data.get("message", ""),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a leaf reply has been verified."""

    action: Literal["accept", "retry", "split", "fail", "stop"]
    answer: Answer | None = None
    verdict: str = "ok"
    feedback: str | None = None
    max_tokens: int = 0
    reason: str | None = None
    judge: str | None = None
    """The judge's verdict on the answer, when a judge checked it."""
    focus: Evidence | None = None
    """A sentence of the span the rejected reply pointed at (see :meth:`Engine.focus`)."""


PLAN_OUTPUT_TOKENS = 200
MAX_REJECTED_SPLITS = 1
SIZE_VERDICTS = frozenset({"context-window", "truncated", "too-many"})
CHOICE_OUTPUT_TOKENS = 64
LEAVES_PER_SLOT = 4
"""Leaves asked at once per concurrency slot: enough to keep every slot busy
while the next requests are prepared, few enough that hundreds of leaves do
not all build their prompts before the first reply is read."""

CallFn = Callable[[Role, list[dict[str, str]], int, dict[str, Any] | None], Awaitable[CallResult]]
SpawnFn = Callable[[Task], Awaitable[Outcome]]


class Engine:
    """The stage functions of a run, shared by the graph nodes and the recursion.

    Args:
        source: the run's input.
        config: the run configuration.
        plan: the plan made for this run.
        client: the model client (the only way to a model).
        emit: receives progress events.
    """

    def __init__(
        self,
        source: Source,
        config: RunConfig,
        plan: Plan,
        client: ModelClient,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.plan = plan
        self.client = client
        self._listeners: list[Callable[[Event], None]] = [emit] if emit else []
        self._filter = compile_filter(plan.filter) if plan.filter else None
        self.record_model: type[BaseModel] | None = None
        """The caller's pydantic class of one record (Python API): verify checks
        each record with it, so a record it rejects is asked again."""
        self.call: CallFn = self.call_model
        """How stages call a model; the graph swaps in a durable task."""
        self.spawn: SpawnFn = self.solve
        """How a task starts a child; the graph swaps in a durable task."""
        self._asking = asyncio.Semaphore(LEAVES_PER_SLOT * config.concurrency)

    def emit(self, event: Event) -> None:
        """Send a progress event to every listener."""
        for listener in self._listeners:
            listener(event)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Also send progress events to ``listener``."""
        self._listeners.append(listener)

    # -- plan ---------------------------------------------------------------

    def adopt_plan(self, plan: Plan) -> None:
        """Use ``plan`` from now on (after the root model planned, or on resume)."""
        self.plan = plan
        self._filter = compile_filter(plan.filter) if plan.filter else None
        # The leaf cut and the tree depend on the plan's leaf size and fan-out.
        for cached in ("leaf_spans", "_leaf_tokens", "_levels"):
            self.__dict__.pop(cached, None)

    async def plan_with_model(self) -> Plan:
        """Ask the root model for a plan from a preview; keep the rules where it fails.

        Does nothing with ``planner="rules"``. Costs one root call of about
        1K prompt tokens.
        """
        if self.config.planner != "model" or self.plan.made_by != "rules":
            return self.plan
        if set(PLANNED_FIELDS) <= set(self.plan.overridden):
            # Flags fixed every field a plan decides: a call could change nothing.
            self.adopt_plan(self.plan.model_copy(update={"made_by": "flags (no planning call)"}))
            return self.plan
        preview = preview_source(self.source, lambda t: self.client.count_tokens("root", t))
        messages = plan_messages(self.plan.question, preview, self.plan)
        result = await self.call("root", messages, PLAN_OUTPUT_TOKENS, PLAN_SCHEMA)
        if result.completion is None:
            plan = self.plan.model_copy(update={"made_by": f"rules (planning call failed: {result.message[:120]})"})
        else:
            plan = apply_model_plan(self.plan, parse_json_reply(result.completion.text), self.source)
        logger.info("plan made by %s: kind %s, leaves of %d tokens, filter %r%s",
                    plan.made_by, plan.kind, plan.leaf_tokens, plan.filter,
                    f", conditions {list(plan.conditions)}" if plan.kind == "join" else "")
        before = self.plan.kind
        self.adopt_plan(plan)
        self.emit(Event("plan_made", data={
            "made_by": plan.made_by, "kind": plan.kind, "kind_before": before,
            "conditions": list(plan.conditions), "entity": plan.entity,
        }))

        return plan

    # -- split --------------------------------------------------------------

    def count(self, start: int, end: int) -> int:
        """Worker-tokenizer length of a span."""
        return self.client.count_tokens("worker", self.source.text[start:end])

    def split(self, task: Task, *, finer: bool = False) -> list[Task]:
        """Cut a task's span into child tasks; none when it fits one leaf call.

        Args:
            task: the task to cut.
            finer: cut even a span that fits, into pieces of about half its
                size (after a failure that smaller pieces may avoid).
        """
        if not finer and task.tokens <= self.plan.leaf_tokens:
            return []
        if not finer:
            group = self._group_of(task)
            if group is not None:
                return self._group_children(task, group)
        if finer:
            # Halves that overlap: each half holds its share of the overlap too,
            # or a sliver of a third piece (a third more calls) is left over.
            half = max(MIN_LEAF_TOKENS, (task.tokens + 1) // 2)
            overlap = min(self.plan.overlap_tokens, half // 4)
            budget = half + overlap
        else:
            budget = piece_budget(self.plan, task)
            overlap = min(self.plan.overlap_tokens, budget // 4)
        spans = split_span(
            self.source.text, task.start, task.end,
            max_tokens=budget,
            count_tokens=lambda text: self.client.count_tokens("worker", text),
            overlap_tokens=overlap,
            hard_boundaries=self.source.file_starts,
        )
        if len(spans) < 2:
            return []

        return [
            Task(
                id=f"{task.id}.{index}", start=start, end=end, depth=task.depth + 1,
                question=self.plan.sub_question, tokens=self.count(start, end),
            )
            for index, (start, end) in enumerate(spans)
        ]

    @functools.cached_property
    def leaf_spans(self) -> list[tuple[int, int]]:
        """The whole source cut into leaf spans once, from its start (stable under edits)."""
        overlap = min(self.plan.overlap_tokens, self.plan.leaf_tokens // 4)
        return split_span(
            self.source.text, 0, len(self.source.text),
            max_tokens=self.plan.leaf_tokens,
            count_tokens=lambda text: self.client.count_tokens("worker", text),
            overlap_tokens=overlap,
            hard_boundaries=self.source.file_starts,
        )

    @functools.cached_property
    def _leaf_tokens(self) -> list[int]:
        return [self.count(start, end) for start, end in self.leaf_spans]

    @functools.cached_property
    def _levels(self) -> list[int]:
        texts = [self.source.text[start:end] for start, end in self.leaf_spans]
        return boundary_levels(texts, self.plan.fan_out)

    def _group_of(self, task: Task) -> Group | None:
        if task.leaves is not None:
            return Group(task.leaves[0], task.leaves[1], task.height)
        if task.start == 0 and task.end == len(self.source.text):
            return Group(0, len(self.leaf_spans), root_height(self._levels))
        return None

    def _group_children(self, task: Task, group: Group) -> list[Task]:
        if group.size < 2:
            return []
        last_level = task.depth + 1 >= self.plan.max_depth
        groups = child_groups(self._levels, group, fan_out=self.plan.fan_out, last_level=last_level)
        spans = self.leaf_spans
        return [
            Task(
                id=f"{task.id}.{index}", start=spans[g.first][0], end=spans[g.stop - 1][1],
                depth=task.depth + 1, question=self.plan.sub_question,
                tokens=sum(self._leaf_tokens[g.first : g.stop]), leaves=(g.first, g.stop), height=g.height,
            )
            for index, g in enumerate(groups)
        ]

    def passes_filter(self, task: Task) -> bool:
        """Whether a task's span may matter: it matches the plan's pre-filter."""
        if self._filter is None:
            return True
        try:
            return filter_matches(self._filter, self.source.text, task.start, task.end)
        except TimeoutError:
            # The plan's check passed, but this span makes the pattern backtrack:
            # stop filtering (one time cap per run, never a hang) and read it.
            logger.warning(
                "filter %r took more than %g s on one span; reading every span",
                self.plan.filter, FILTER_SECONDS,
            )
            self._filter = None
            return True

    def leaf_count(self, task: Task) -> int:
        """How many leaf spans of the plan's cut a task covers (0 for a piece of
        one leaf, cut finer after a failure)."""
        group = self._group_of(task)
        return group.size if group is not None else 0

    def can_split_finer(self, task: Task, verdict: str = "context-window") -> bool:
        """Whether a failing leaf may still be cut into smaller pieces.

        A span too big for the window or the output is cut as often as needed.
        A span whose answers were rejected is cut once (into halves of up to
        :data:`MAX_REJECTED_SPLITS` levels): smaller spans help a weak model
        sometimes, but a model that fails again on the halves would otherwise
        be asked again on quarters, eighths ... (a 1,500-token span cost 17-28
        calls and about 10 minutes on the embedded model before this cap).
        """
        if task.depth >= self.plan.max_depth or task.tokens < 2 * MIN_LEAF_TOKENS:
            return False
        return verdict in SIZE_VERDICTS or task.rejected_splits < MAX_REJECTED_SPLITS

    # -- delegate -------------------------------------------------------------

    async def leaf_attempt(
        self, task: Task, *, feedback: str | None, max_tokens: int
    ) -> CallResult:
        """Ask the worker about one span, after checking the request fits."""
        location = self.source.locate(task.start)
        messages = leaf_messages(
            self.plan.kind, task, self.source.text[task.start : task.end],
            feedback=feedback, file_hint=location.file.name,
            record_schema=self.plan.record_schema,
            conditions=self.plan.conditions, entity=self.plan.entity,
        )
        prompt_tokens = self.client.count_tokens("worker", "\n".join(m["content"] for m in messages))
        if prompt_tokens + max_tokens > self.plan.window:
            # Pre-flight: never send a request the window cannot hold (K10, K18).
            return CallResult(error="context", message=(
                f"request of {prompt_tokens}+{max_tokens} tokens exceeds the "
                f"{self.plan.window}-token window"
            ))
        return await self.call(
            "worker", messages, max_tokens,
            schema_for(self.plan.kind, self.plan.record_schema, conditions=len(self.plan.conditions)),
        )

    async def call_model(
        self,
        role: Role,
        messages: list[dict[str, str]],
        max_tokens: int,
        schema: dict[str, Any] | None,
    ) -> CallResult:
        """Make one model call; per-task failures come back as a result.

        Failures that every other call would meet too (the server refuses
        connections, the key is wrong) are raised: the run stops, resumable.
        Others (a stalled request, a rejected prompt) fail this task only.
        """
        try:
            completion = await self.client.complete(role, messages, max_tokens=max_tokens, schema=schema)
        except ContextWindowError as exc:
            return CallResult(error="context", message=str(exc))
        except BudgetExceeded as exc:
            # A budget stop winds the run down: the task is reported as stopped.
            return CallResult(error="stopped", message=str(exc))
        except ModelCallError as exc:
            if exc.systemic:
                raise
            return CallResult(error="failed", message=str(exc))
        return CallResult(completion=completion)

    # -- verify -----------------------------------------------------------------

    def decide(self, task: Task, result: CallResult, *, max_tokens: int, re_asks: int) -> Decision:
        """Verify a leaf reply and choose the next step.

        Args:
            task: the leaf task.
            result: what the call returned.
            max_tokens: the output limit the call had.
            re_asks: how many times this leaf was already asked again with feedback.
        """
        if result.error == "stopped":
            return Decision("stop", verdict="stopped", reason=result.message)
        if result.error == "context":
            return self._split_or_fail(task, "context-window", result.message)
        if result.error or result.completion is None:
            return Decision("fail", verdict="failed", reason=result.message)

        verdict: Verdict = verify_leaf(
            self.source.text, task, self.plan.kind, result.completion, self.plan.record_schema,
            record_model=self.record_model, conditions=len(self.plan.conditions),
        )
        if verdict.ok:
            return Decision("accept", answer=verdict.answer, verdict="ok")
        if verdict.focus is not None:
            return replace(self._after_rejection(task, verdict, max_tokens=max_tokens, re_asks=re_asks),
                           focus=verdict.focus)
        return self._after_rejection(task, verdict, max_tokens=max_tokens, re_asks=re_asks)

    def _after_rejection(self, task: Task, verdict: Verdict, *, max_tokens: int, re_asks: int) -> Decision:
        if verdict.code == "truncated":
            # finish_reason=length: more room while the ceiling allows, else a
            # smaller span (a re-ask with the same room would be cut off again).
            if max_tokens < self.plan.max_output_tokens:
                more = min(2 * max_tokens, self.plan.max_output_tokens)
                return Decision("retry", verdict="truncated", feedback=None, max_tokens=more)
            return self._split_or_fail(task, "truncated", f"reply cut off at {max_tokens} output tokens")
        if verdict.code == "too-many":
            # More occurrences than one reply may quote: asking again cannot help.
            return self._split_or_fail(task, "too-many", verdict.feedback or "too many to quote")
        if re_asks < self.config.verify_retries:
            return Decision("retry", verdict=verdict.code, feedback=verdict.feedback, max_tokens=max_tokens)
        # Every answer of this span was rejected: it is split finer, and where it
        # cannot be, it is a failure the result lists. Never an empty answer: a
        # count of 0 or "not found" would claim what nobody read.
        reason = f"every reply was rejected ({verdict.code}, {re_asks + 1} tries): {verdict.feedback}"
        return self._split_or_fail(task, verdict.code, reason)

    async def judge(self, task: Task, decision: Decision, *, re_asks: int) -> Decision:
        """Let the judge model check an accepted answer against its span.

        Runs only when a judge model is configured and the answer found
        something. A rejected answer is asked again with the judge's reason
        (while re-asks are left), then split finer, as for any failed check. A
        judge reply with no verdict is asked once more with the reason; a judge
        call that fails, or gives no verdict twice, leaves the answer as it is
        (judge ``judge-unavailable``; the result counts them in ``unjudged_parts``).
        """
        answer = decision.answer
        if not self.config.judge_model or decision.action != "accept" or not (answer and answer.found):
            return decision
        span = self.source.text[task.start : task.end]
        shown = answer.value
        if answer.kind == "join":
            # A leaf's join is judged on what it found per condition: the span
            # alone rarely holds an entity meeting every one.
            conditions = self.plan.conditions
            shown = [
                f"{m.entity}: {conditions[m.condition] if m.condition < len(conditions) else m.condition}"
                for m in answer.matches
            ]
        messages = judge_messages(task.question, span, json.dumps(shown, ensure_ascii=False))
        data = await self._judge_verdict(task, messages)
        if data is None:
            logger.info("task %s: the judge gave no verdict; answer kept unjudged", task.id)
            return replace(decision, judge="judge-unavailable")
        reason = " ".join(str(data.get("reason") or "").split())[:300]
        if data["supported"]:
            return replace(decision, judge=f"supported: {reason}" if reason else "supported")
        verdict = f"rejected: {reason}" if reason else "rejected"
        logger.info("task %s: judge rejected the answer (%s)", task.id, reason)
        if re_asks < self.config.verify_retries:
            feedback = f"A checker rejected your answer: {reason or 'not supported by the excerpt'}"
            return Decision("retry", verdict="judge-rejected", feedback=feedback,
                            max_tokens=self.plan.output_tokens, judge=verdict)
        return replace(self._split_or_fail(task, "judge-rejected", verdict), judge=verdict)

    async def _judge_verdict(self, task: Task, messages: list[dict[str, str]]) -> dict[str, Any] | None:
        """The judge's reply as ``{"supported": bool, ...}``, or None when it
        gives none. A reply without a verdict is asked once more, with why."""
        for asked in range(2):
            result = await self.call("judge", messages, 128, JUDGE_SCHEMA)
            if result.completion is None:
                return None  # the call failed or a budget stopped it: nothing to re-ask
            data = parse_json_reply(result.completion.text)
            if isinstance(data, dict) and isinstance(data.get("supported"), bool):
                return data
            if asked:
                break
            why = "it is not a JSON object" if not isinstance(data, dict) else (
                '"supported" is not true or false'
            )
            logger.info("task %s: the judge's reply gave no verdict (%s); asking again", task.id, why)
            messages = [
                *messages,
                {"role": "assistant", "content": result.completion.text[:2000]},
                {"role": "user", "content": (
                    f"Your reply gave no verdict: {why}. Reply with JSON only: "
                    '{"supported": true or false, "reason": "<why>"}.'
                )},
            ]
        return None

    def _split_or_fail(self, task: Task, verdict: str, reason: str) -> Decision:
        if self.can_split_finer(task, verdict):
            return Decision("split", verdict=verdict, reason=reason)
        return Decision("fail", verdict=verdict, reason=reason)

    # -- merge ------------------------------------------------------------------

    async def merge(self, task: Task, children: list[Outcome]) -> Outcome:
        """Combine children's outcomes into the parent's outcome."""
        answers = usable_answers(children)
        if self.plan.kind == "short":
            answer = await self._merge_short(answers)
        elif self.plan.kind != "text":
            answer = merge_by_code(self.plan.kind, answers, conditions=len(self.plan.conditions))
        elif len(answers := dedupe_text(answers)) <= 1:
            answer = answers[0] if answers else Answer(kind="text", found=False)
        else:
            answer = await self._merge_text(answers)

        failed = all(child.status == "failed" for child in children)
        stopped = not failed and any(child.status == "stopped" for child in children)
        if self.plan.kind not in ("text", "short"):
            # Merged by code: the parent's answer holds every item and quote of
            # its children, so their copies would only multiply the tree's size
            # by its depth (20 MB list run: 19 MB of tree). Structure, verdicts
            # and failures stay.
            children = [child.model_copy(update={"answer": None}) for child in children]
        return Outcome(
            task=task, answer=answer,
            status="failed" if failed else "stopped" if stopped else "done",
            verdict="ok", children=tuple(children),
            reason="every part failed" if failed else "a budget stopped some parts" if stopped else None,
        )

    async def _merge_short(self, answers: list[Answer]) -> Answer:
        """One short answer from several: by code when they agree or one sentence
        matches the question best; the root model chooses only among a tie."""
        candidates = short_candidates(answers, self.plan.question)
        if not candidates:
            return Answer(kind="short", found=False)
        top = [answer for score, answer in candidates if score == candidates[0][0]]
        if len(top) == 1:
            return top[0]
        messages = choose_messages(
            self.plan.question, [(a.text or "", a.evidence[0].quote if a.evidence else "") for a in top]
        )
        schema = choice_schema([a.text or "" for a in top])
        result = await self.call("root", messages, CHOICE_OUTPUT_TOKENS, schema)
        data = parse_json_reply(result.completion.text) if result.completion else None
        said = str(data.get("answer") or "") if isinstance(data, dict) else ""
        for answer in top:
            if said == answer.text:
                return answer
        if said == NONE_OF_THEM:
            return Answer(kind="short", found=False)
        logger.warning("the root model chose none of %d tied short answers; keeping the first", len(top))
        return top[0]

    async def _merge_text(self, answers: list[Answer]) -> Answer:
        while len(answers) > 1:
            groups = self._merge_groups(answers)
            answers = list(await asyncio.gather(*(self._merge_group(g) for g in groups)))
        return answers[0]

    def _merge_groups(self, answers: list[Answer]) -> list[list[Answer]]:
        """Pack answers into groups of at most fan_in that fit the root's window."""
        limit = int(self.plan.window * 0.6)
        groups: list[list[Answer]] = [[]]
        size = 0
        for answer in answers:
            tokens = self.client.count_tokens("root", answer.text or "") + 8
            if groups[-1] and (len(groups[-1]) >= self.plan.fan_in or size + tokens > limit):
                groups.append([])
                size = 0
            groups[-1].append(answer)
            size += tokens
        return groups

    async def _merge_group(self, group: list[Answer]) -> Answer:
        if len(group) == 1:
            return group[0]
        messages = merge_messages(self.plan.question, [a.text or "" for a in group])
        evidence = merge_evidence(group)
        for _ in range(2):
            result = await self.call("root", messages, self.plan.max_output_tokens, MERGE_SCHEMA)
            text = _merged_text(result)
            if text:
                return Answer(kind="text", found=True, text=text, evidence=evidence)
            if result.error == "stopped":
                break
        # The model gave no usable merge: keep every partial answer rather than
        # losing any (K11); the result says so in the answer itself.
        logger.warning("text merge failed twice; joining %d partial answers", len(group))
        joined = " | ".join(a.text or "" for a in group)
        return Answer(kind="text", found=True, text=joined, evidence=evidence)

    # -- the lifecycle of one task ----------------------------------------------

    async def solve(self, task: Task) -> Outcome:
        """Run split, delegate, verify and merge for one task and its subtree."""
        self.emit(Event("task_started", task.id, task.depth, {
            "tokens": task.tokens, "start": task.start, "end": task.end,
        }))
        if not self.passes_filter(task):
            self.emit(Event("task_done", task.id, task.depth, {"status": "skipped"}))
            return Outcome(task=task, answer=Answer(kind=self.plan.kind, found=False), verdict="skipped")
        children = self.split(task)
        if children:
            outcome = await self.solve_children(task, children)
        else:
            outcome = await self.solve_leaf(task)
        self.emit(Event("task_done", task.id, task.depth, {"status": outcome.status}))

        return outcome

    async def solve_children(self, task: Task, children: list[Task]) -> Outcome:
        """Solve child tasks side by side, then merge them once all are done."""
        outcomes = await asyncio.gather(*(self.spawn(child) for child in children))
        return await self.merge(task, list(outcomes))

    async def solve_leaf(self, task: Task) -> Outcome:
        """Ask, verify and decide until the leaf is answered, split or given up."""
        feedback: str | None = None
        max_tokens = self.plan.output_tokens
        re_asks = attempts = 0
        focused = False
        while True:
            async with self._asking:
                result = await self.leaf_attempt(task, feedback=feedback, max_tokens=max_tokens)
            attempts += 1
            decision = self.decide(task, result, max_tokens=max_tokens, re_asks=re_asks)
            if decision.focus is not None and not focused:
                focused = True
                attempts += 1
                decision = await self.focus(task, decision, max_tokens=max_tokens)
            decision = await self.judge(task, decision, re_asks=re_asks)
            if decision.action == "retry":
                re_asks += 1 if decision.feedback else 0
                feedback, max_tokens = decision.feedback, decision.max_tokens
                continue
            return await self.conclude(task, decision, attempts)

    async def focus(self, task: Task, decision: Decision, *, max_tokens: int) -> Decision:
        """Ask once more about the one sentence a rejected reply pointed at.

        A weak model that restates the question has usually copied the start
        of the sentence that answers it. That sentence alone is an excerpt it
        can read; if the answer it then gives passes verification there (and so
        in the span), it is accepted, else the first decision stands.
        """
        where = decision.focus
        assert where is not None
        zoom = task.model_copy(update={
            "start": where.start, "end": where.end, "tokens": self.count(where.start, where.end),
        })
        result = await self.leaf_attempt(zoom, feedback=None, max_tokens=max_tokens)
        if result.completion is None:
            return decision
        verdict = verify_leaf(
            self.source.text, zoom, self.plan.kind, result.completion, self.plan.record_schema,
            conditions=len(self.plan.conditions),
        )
        if verdict.ok and verdict.answer is not None and verdict.answer.found:
            logger.info("task %s: answered from the sentence its first reply pointed at", task.id)
            return Decision("accept", answer=verdict.answer, verdict="ok-focused")
        return decision

    async def conclude(self, task: Task, decision: Decision, attempts: int) -> Outcome:
        """Turn a final decision about a leaf into its outcome."""
        if decision.action == "accept":
            return Outcome(
                task=task, answer=decision.answer, verdict=decision.verdict,
                attempts=attempts, judge=decision.judge,
            )
        if decision.action == "stop":
            return Outcome(
                task=task, status="stopped", verdict="stopped",
                reason=decision.reason, attempts=attempts,
            )
        if decision.action == "split":
            logger.info("task %s: %s; splitting finer", task.id, decision.reason)
            children = self.split(task, finer=True)
            if decision.verdict not in SIZE_VERDICTS:
                children = [c.model_copy(update={"rejected_splits": task.rejected_splits + 1}) for c in children]
            if children:
                outcome = await self.solve_children(task, children)
                return outcome.model_copy(update={
                    "verdict": f"split-after-{decision.verdict}", "attempts": attempts,
                    "judge": decision.judge,
                })
        # Info, not a warning: the result lists every failure, and the CLI
        # prints each once ("warning: part ...").
        logger.info("task %s failed: %s", task.id, decision.reason)
        return Outcome(
            task=task, status="failed", verdict=decision.verdict,
            reason=decision.reason, attempts=attempts, judge=decision.judge,
        )


def _merged_text(result: CallResult) -> str | None:
    if result.completion is None or result.completion.finish_reason == "length":
        return None
    data = parse_json_reply(result.completion.text)
    text = str(data.get("answer") or "").strip() if isinstance(data, dict) else ""
    if not text or _META_ANSWER.search(text):
        return None
    return text

