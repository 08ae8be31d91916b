"""The LangGraph state machine of a run: plan → split → delegate → verify → merge.

The root task goes through the five stages as graph nodes, so the machine is
visible when drawn (``build_graph(...).get_graph()``) and every stage boundary
is a checkpoint. Each of the root's children runs the same stage functions for
its whole subtree inside a durable LangGraph ``@task`` (``solve``); below it the
recursion is plain asyncio, so a subtree never waits for a slow sibling and a
parent merges exactly once when its children are done. What survives a crash
below that level is the store's call log: every model call is recorded the
moment it returns, and a replay answers it from there. STACK-FINDINGS.md
sections 8 and 9 chose this shape (H2b); ``docs/design.md`` (Durable runs) has
why the model calls and deeper tasks stopped being ``@task``s: replaying
thousands of them cost 5-10 ms each.

Graph state holds spans, small answers and counters, never source text.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, TypedDict

from langgraph.func import task as durable_task
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from rlm_graph.models import Role
from rlm_graph.nodes.delegate import SIZE_VERDICTS, CallResult, Decision, Engine, Event
from rlm_graph.nodes.types import Outcome, Plan, Task

__all__ = ["RunState", "build_graph", "outcome_of", "pack_outcome", "unpack_outcome"]


class RunState(TypedDict, total=False):
    """What the graph checkpoints between stages (all of it small)."""

    question: str
    plan: dict[str, Any]
    task: dict[str, Any]
    """The root task (a span, not its text)."""
    children: list[dict[str, Any]]
    """Child tasks made by split; empty when the root is one leaf call."""
    finer: bool
    """Split again, finer, after the root's leaf call failed."""
    rejected: bool
    """That failure was a rejected answer, not a size problem (see
    :meth:`Engine.can_split_finer`)."""
    focused: bool
    """The root's leaf was already asked about the sentence a reply pointed at."""
    attempts: int
    re_asks: int
    feedback: str | None
    max_tokens: int
    reply: dict[str, Any] | None
    decision: dict[str, Any] | None
    outcomes: list[bytes]
    """The root's children's outcomes, each packed (:func:`pack_outcome`)."""
    outcome: bytes | None
    """The root's outcome, packed; read it with :func:`outcome_of`."""


def build_graph(engine: Engine, checkpointer: Any = None) -> CompiledStateGraph:
    """Compile the state machine of one run around its engine.

    Args:
        engine: the run's stage functions (source, plan, model client).
        checkpointer: a LangGraph saver; None runs without persistence.
    """

    if not getattr(engine.client.call_log, "durable", False):
        # No durable call log (a graph embedded with only its parent's
        # checkpointer): every model call is a durable task, so a resumed
        # parent replays finished calls from its own checkpoints.
        @durable_task
        async def model_call(
            role: Role, messages: list[dict[str, str]], max_tokens: int, schema: dict[str, Any] | None
        ) -> dict[str, Any]:
            return (await engine.call_model(role, messages, max_tokens, schema)).to_dict()

        async def durable_call(
            role: Role, messages: list[dict[str, str]], max_tokens: int, schema: dict[str, Any] | None
        ) -> CallResult:
            return CallResult.from_dict(await model_call(role, messages, max_tokens, schema))

        engine.call = durable_call

    @durable_task
    async def solve(task: dict[str, Any]) -> bytes:
        return pack_outcome(await engine.solve(Task.model_validate(task)))

    async def durable_spawn(task: Task) -> Outcome:
        return unpack_outcome(await solve(task.model_dump(mode="json")))

    def _follow_plan(state: RunState) -> None:
        # A run resumed from a checkpoint after the plan node gets the plan the
        # root model made then, not the rules' plan it was prepared with.
        if state.get("plan") and engine.plan.model_dump(mode="json") != state["plan"]:
            engine.adopt_plan(Plan.model_validate(state["plan"]))

    async def plan(state: RunState) -> dict[str, Any]:
        await engine.plan_with_model()
        engine.emit(Event("plan_ready", data={"made_by": engine.plan.made_by}))
        root = Task(
            id="0", start=0, end=len(engine.source.text), depth=0,
            question=engine.plan.question, tokens=engine.plan.source_tokens,
        )
        return {
            "plan": engine.plan.model_dump(mode="json"),
            "task": root.model_dump(mode="json"),
            "attempts": 0, "re_asks": 0, "feedback": None,
            "max_tokens": engine.plan.output_tokens, "finer": False,
        }

    async def split(state: RunState) -> dict[str, Any]:
        _follow_plan(state)
        root = Task.model_validate(state["task"])
        # The root's split cuts the whole source into leaf spans (seconds on
        # tens of MB): in a thread, so the event loop serves others meanwhile.
        # Nothing else of this run touches the engine during this stage.
        children = await asyncio.to_thread(engine.split, root, finer=state.get("finer", False))
        if state.get("rejected"):
            children = [c.model_copy(update={"rejected_splits": 1}) for c in children]
        return {"children": [c.model_dump(mode="json") for c in children]}

    async def delegate(state: RunState) -> dict[str, Any]:
        _follow_plan(state)
        children = [Task.model_validate(c) for c in state.get("children") or []]
        if children:
            # The root's children are durable tasks: a finished top-level subtree
            # is replayed from its checkpointed result. Below them, and for every
            # model call, the store's call log is what survives a crash (see
            # docs/design.md, "Durable runs": replaying thousands of LangGraph
            # tasks cost 5-10 ms each).
            outcomes = await asyncio.gather(*(durable_spawn(child) for child in children))
            return {"outcomes": [pack_outcome(o) for o in outcomes]}
        root = Task.model_validate(state["task"])
        result = await engine.leaf_attempt(
            root, feedback=state.get("feedback"), max_tokens=state["max_tokens"]
        )
        return {"reply": result.to_dict(), "attempts": state.get("attempts", 0) + 1}

    async def verify(state: RunState) -> Command[Any]:
        _follow_plan(state)
        if state.get("children"):
            return Command(goto="merge")
        root = Task.model_validate(state["task"])
        decision = engine.decide(
            root, CallResult.from_dict(state["reply"] or {}),
            max_tokens=state["max_tokens"], re_asks=state.get("re_asks", 0),
        )
        update: dict[str, Any] = {}
        if decision.focus is not None and not state.get("focused"):
            decision = await engine.focus(root, decision, max_tokens=state["max_tokens"])
            update = {"focused": True, "attempts": state.get("attempts", 0) + 1}
        decision = await engine.judge(root, decision, re_asks=state.get("re_asks", 0))
        if decision.action == "retry":
            return Command(goto="delegate", update={
                **update, "feedback": decision.feedback, "max_tokens": decision.max_tokens,
                "re_asks": state.get("re_asks", 0) + (1 if decision.feedback else 0),
            })
        if decision.action == "split" and not state.get("finer"):
            return Command(goto="split", update={
                **update, "finer": True, "rejected": decision.verdict not in SIZE_VERDICTS,
            })
        return Command(goto="merge", update={**update, "decision": _decision_dict(decision)})

    async def merge(state: RunState) -> dict[str, Any]:
        _follow_plan(state)
        root = Task.model_validate(state["task"])
        if state.get("children"):
            outcomes = [unpack_outcome(o) for o in state.get("outcomes") or []]
            outcome = await engine.merge(root, outcomes)
        else:
            decision = Decision(**(state.get("decision") or {"action": "fail"}))
            if decision.action == "split":
                decision = Decision("fail", verdict=decision.verdict, reason=decision.reason)
            outcome = await engine.conclude(root, decision, state.get("attempts", 0))
        # The children's outcomes are inside the root's now: drop the copy.
        return {"outcome": pack_outcome(outcome), "outcomes": []}

    builder = StateGraph(RunState)
    builder.add_node("plan", plan)
    builder.add_node("split", split)
    builder.add_node("delegate", delegate)
    builder.add_node("verify", verify, destinations=("delegate", "split", "merge"))
    builder.add_node("merge", merge)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "split")
    builder.add_edge("split", "delegate")
    builder.add_edge("delegate", "verify")
    builder.add_edge("merge", END)

    return builder.compile(checkpointer=checkpointer, name="rlm-graph")


def pack_outcome(outcome: Outcome) -> bytes:
    """An outcome as zlib-compressed JSON, the form it takes in checkpoints.

    A checkpoint copies every channel, and a list answer carries an evidence
    record per item: on a 20 MB source the plain JSON tree made the store 10x
    the source (docs/design.md, "Durable runs"); compressed, it is a few percent.
    """
    return zlib.compress(outcome.model_dump_json().encode(), 6)


def unpack_outcome(data: bytes | dict[str, Any]) -> Outcome:
    """Read an outcome written by :func:`pack_outcome` (or a plain dict)."""
    if isinstance(data, dict):
        return Outcome.model_validate(data)
    return Outcome.model_validate_json(zlib.decompress(data))


def outcome_of(state: dict[str, Any]) -> Outcome:
    """The root outcome in a finished run's graph state."""
    return unpack_outcome(state["outcome"])


def _decision_dict(decision: Decision) -> dict[str, Any]:
    answer = decision.answer.model_dump(mode="json") if decision.answer else None
    return {
        "action": decision.action, "answer": answer, "verdict": decision.verdict,
        "feedback": decision.feedback, "max_tokens": decision.max_tokens,
        "reason": decision.reason, "judge": decision.judge,
    }
