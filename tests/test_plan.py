"""Planning by the root model: preview, checked fields, rules fallback, flags; the judge."""

from __future__ import annotations

import json

import pytest

from rlm_graph import arun
from rlm_graph.config import RunConfig
from rlm_graph.nodes.plan import (
    apply_model_plan,
    make_plan,
    preview_source,
    render_plan,
)
from rlm_graph.source import source_from_text
from rlm_graph.testing import ModelRequest, Reply

from .conftest import excerpt_of, numbered_paragraphs, text_reply

SETTINGS = {
    "model": "scripted/m",
    "context_window": 4096,
    "chunk_tokens": 200,
    "overlap_tokens": 16,
    "planner": "model",
}
NEEDLE = "The secret code word is HELIOTROPE."
TEXT = numbered_paragraphs(60, needle_at={41: NEEDLE})


def planner_then(plan: dict | str, leaf) -> callable:
    """A double that answers the planning prompt with ``plan`` and leaves with ``leaf``."""

    def respond(request: ModelRequest) -> Reply | str:
        if "Preview of the source" in request.prompt:
            return plan if isinstance(plan, str) else json.dumps(plan)
        return leaf(request)

    return respond


def rules_plan(**config):
    source = source_from_text(TEXT)
    settings = {**{k: v for k, v in SETTINGS.items() if k != "chunk_tokens"}, **config}
    return make_plan(
        "What is the secret code word?",
        source,
        RunConfig(**settings),
        count=len,
        window=4096,
    ), source


def test_preview_is_small_and_shows_structure():
    source = source_from_text(TEXT * 50)
    preview = preview_source(source, len)

    assert len(preview) < 2000
    assert "1 file(s)" in preview and "<text>" in preview
    assert preview.count("Sample ") == 3 and "Paragraph" in preview


async def test_model_plan_with_a_filter_skips_spans_unread(scripted):
    double = scripted(
        planner_then(
            {
                "kind": "text",
                "sub_question": "What is the secret code word?",
                "chunk_tokens": 150,
                "filter": "secret code",
            },
            text_reply(r"The secret code word is (\w+)\."),
        )
    )

    settings = {k: v for k, v in SETTINGS.items() if k != "chunk_tokens"}
    result = await arun("What is the secret code word?", text=TEXT, **settings)

    assert result.answer == "HELIOTROPE"
    assert result.plan["made_by"] == "model"
    assert result.plan["filter"] == "secret code" and result.plan["leaf_tokens"] == 150
    leaves = [r for r in double.requests if "<<<" in r.prompt]
    # Only spans with the filter's match are read (two when the overlap holds it).
    assert 1 <= len(leaves) <= 2
    assert all("secret code" in excerpt_of(r) for r in leaves)
    skipped = [c for c in result.tree.children if c.verdict == "skipped"]
    assert len(skipped) >= len(result.tree.children) - 2 >= 3
    assert "Preview of the source" in double.requests[0].prompt


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("I think you should read it all", "not JSON"),
        (
            {"kind": "poem", "sub_question": "", "chunk_tokens": 0, "filter": ""},
            "unknown kind",
        ),
        (
            {
                "kind": "text",
                "sub_question": "",
                "chunk_tokens": 0,
                "filter": "secret codeword",
            },
            "matches nowhere",
        ),
        (
            {
                "kind": "text",
                "sub_question": "",
                "chunk_tokens": 0,
                "filter": "Paragraph 41",
            },
            "'paragraph' is not a word of it",
        ),
        (
            {"kind": "text", "sub_question": "", "chunk_tokens": 0, "filter": "(["},
            "not a regular expression",
        ),
        (
            {
                "kind": "text",
                "sub_question": "Summarise.",
                "chunk_tokens": 0,
                "filter": "",
            },
            "drops most",
        ),
        (
            {"kind": "text", "sub_question": "", "chunk_tokens": 10**6, "filter": ""},
            "outside",
        ),
    ],
)
def test_invalid_model_plan_fields_fall_back_to_rules(reply, why):
    rules, source = rules_plan()
    data = (
        json.loads(reply) if isinstance(reply, str) and reply.startswith("{") else reply
    )

    plan = apply_model_plan(rules, data, source)

    assert why in plan.made_by
    assert plan.filter is None and plan.kind == rules.kind
    assert (
        plan.sub_question == rules.sub_question
        and plan.leaf_tokens == rules.leaf_tokens
    )


def test_how_many_question_keeps_count_even_if_the_model_says_text():
    source = source_from_text(TEXT)
    rules = make_plan(
        "How many paragraphs mention the river?",
        source,
        RunConfig(**SETTINGS),
        count=len,
        window=4096,
    )
    plan = apply_model_plan(rules, {"kind": "text"}, source)
    assert plan.kind == "count" and "contradicts" in plan.made_by


def test_flags_win_over_the_model():
    rules, source = rules_plan(
        filter="Paragraph 4", kind="list", sub_question="List the codes."
    )
    plan = apply_model_plan(
        rules,
        {
            "kind": "text",
            "sub_question": "What is the code?",
            "chunk_tokens": 100,
            "filter": "secret",
        },
        source,
    )

    assert (
        plan.filter == "Paragraph 4"
        and plan.kind == "list"
        and plan.sub_question == "List the codes."
    )
    assert plan.leaf_tokens == 100  # the chunk size was not set by a flag
    # SETTINGS gives --overlap-tokens: a flag too.
    assert set(plan.overridden) == {"filter", "kind", "sub_question", "overlap_tokens"}
    shown = render_plan(plan)
    assert (
        "set by flags: kind, sub_question, overlap_tokens, filter" in shown
        and "Paragraph 4" in shown
    )


async def test_garbage_plan_still_answers_by_rules(scripted):
    double = scripted(
        planner_then("{not json", text_reply(r"The secret code word is (\w+)\."))
    )

    result = await arun("What is the secret code word?", text=TEXT, **SETTINGS)

    assert result.answer == "HELIOTROPE" and result.status == "done"
    assert result.plan["made_by"].startswith("rules (model plan was not JSON")
    assert result.plan["filter"] is None
    assert sum("<<<" in r.prompt for r in double.requests) > 5


async def test_rules_planner_makes_no_planning_call(scripted):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    result = await arun(
        "What is the secret code word?", text=TEXT, **{**SETTINGS, "planner": "rules"}
    )
    assert result.plan["made_by"] == "rules"
    assert not any("Preview of the source" in r.prompt for r in double.requests)


def test_render_plan_names_every_decision():
    rules, _ = rules_plan()
    shown = render_plan(rules)
    for part in (
        "plan made by rules",
        "answer kind:   text",
        "What is the secret code word?",
        f"up to {rules.leaf_tokens:,} tokens",
        "pre-filter:    none",
    ):
        assert part in shown


# -- judge ------------------------------------------------------------------------


async def test_judge_rejection_is_retried_with_the_reason_and_shown_in_the_tree(
    scripted,
):
    """The worker first names the decoy code; the judge (another model) rejects
    it; asked again with the judge's reason, the worker gives the right one."""
    text = numbered_paragraphs(
        6, needle_at={3: "The old code word was MAUVE. The secret code word is TEAL."}
    )
    seen: list[str] = []

    def worker(request: ModelRequest) -> str:
        seen.append(request.prompt)
        if "A checker rejected your answer" in request.prompt:
            return json.dumps(
                {"answer": "TEAL", "quote": "The secret code word is TEAL."}
            )
        if excerpt_of(request) and "TEAL" in excerpt_of(request):
            return json.dumps(
                {"answer": "MAUVE", "quote": "The old code word was MAUVE."}
            )
        return json.dumps({"answer": "not stated", "quote": ""})

    judged: list[str] = []

    def judge(request: ModelRequest) -> str:
        judged.append(request.prompt)
        ok = "TEAL" in request.prompt.split("Proposed answer")[1]
        return json.dumps(
            {
                "supported": ok,
                "reason": "" if ok else "MAUVE is the old code, not the secret one",
            }
        )

    scripted(worker, provider="scripted")
    scripted(judge, provider="judgedouble")
    result = await arun(
        "What is the secret code word?",
        text=text,
        judge_model="judgedouble/j",
        **{**SETTINGS, "planner": "rules", "chunk_tokens": 2000},
    )

    assert result.answer == "TEAL"
    assert len(judged) == 2
    assert any("MAUVE is the old code" in p for p in seen)
    assert result.tree.judge == "supported"
    assert result.models["judge"] == "judgedouble/j"


async def test_no_judge_calls_without_a_judge_model(scripted):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    result = await arun(
        "What is the secret code word?", text=TEXT, **{**SETTINGS, "planner": "rules"}
    )
    assert result.tree.judge is None
    assert not any("Proposed answer" in r.prompt for r in double.requests)


def test_cli_verbose_shows_the_plan_the_run_followed(scripted, tmp_path):
    from click.testing import CliRunner

    from rlm_graph.cli import main

    scripted(planner_then(
        {"kind": "text", "sub_question": "", "chunk_tokens": 0, "filter": "secret code"},
        text_reply(r"The secret code word is (\w+)\."),
    ))
    source = tmp_path / "book.txt"
    source.write_text(TEXT)
    out = CliRunner().invoke(main, [
        "run", str(source), "-q", "What is the secret code word?", "-v",
        "--model", "scripted/m", "--context-window", "4096", "--planner", "model",
    ])

    assert out.exit_code == 0, out.output
    assert "HELIOTROPE" in out.stdout
    assert "plan made by model" in out.stderr and "pre-filter:    secret code" in out.stderr
