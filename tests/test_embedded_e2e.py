"""End to end with the real embedded model (SmolLM2-135M on the CPU) on real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlm_graph import arun
from rlm_graph.cli import main

BOOK = Path(__file__).parents[1] / "examples" / "alice_in_wonderland.txt"
QUESTION = "What were the names of the three sisters in the Dormouse's story?"


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory) -> Path:
    """2,700 characters of chapter VII around the Dormouse's story: two leaves."""
    text = BOOK.read_text()
    start = text.index("three little sisters")
    path = tmp_path_factory.mktemp("book") / "tea_party.txt"
    path.write_text(text[start - 1500 : start + 1200])
    return path


@pytest.mark.embedded
async def test_embedded_model_answers_with_a_citation_that_is_in_the_source(excerpt):
    result = await arun(QUESTION, [excerpt], chunk_tokens=400)

    assert result.models["worker"] == "local/smollm2-135m"
    # The 135M model sometimes writes a malformed reply twice for one small span;
    # that span is then reported, not hidden: "partial" with the reason.
    assert result.status in ("done", "partial")
    assert all(f.reason for f in result.failures)
    assert (result.status == "partial") == bool(result.failures)
    assert result.usage.calls >= 2 and result.usage.cost_usd == 0
    assert result.citations, "the answer must be cited"
    text = excerpt.read_text()
    for citation in result.citations:
        assert text[citation.start : citation.end] == citation.quote
    # What a 135M model answers depends on every byte of its prompt (even the
    # file name in it), so the test checks the pipeline's promises, not the wording.
    assert result.found and isinstance(result.answer, str) and result.answer.strip()


@pytest.mark.embedded
def test_cli_with_the_embedded_model_and_a_filter(excerpt):
    runner = CliRunner()
    args = ["run", str(excerpt), "-q", QUESTION, "--filter", "sisters", "--chunk-tokens", "300", "--json"]
    out = runner.invoke(main, args)

    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    skipped = [c for c in data["tree"]["children"] if c["verdict"] == "skipped"]
    assert data["tree"]["children"] and skipped, "spans without 'sisters' are skipped unread"
    assert all(excerpt.read_text()[c["start"] : c["end"]] == c["quote"] for c in data["citations"])


@pytest.mark.embedded
async def test_embedded_model_plans_or_falls_back_to_rules_safely(excerpt):
    """The 135M root model plans from a preview; whatever it replies, the plan
    the run follows is valid: fields it got wrong are the rules' values."""
    result = await arun(QUESTION, [excerpt], chunk_tokens=400, planner="model")

    plan = result.plan
    assert plan is not None
    assert plan["made_by"] == "model" or plan["made_by"].startswith(("model (rules kept", "rules ("))
    assert plan["kind"] in ("text", "short", "list", "count", "table", "yesno")
    assert plan["leaf_tokens"] == 400, "a flag's value is never replaced by the model"
    text = excerpt.read_text()
    if plan["filter"]:
        import re

        assert re.search(plan["filter"], text, re.IGNORECASE), "a filter that skips everything is dropped"
    assert result.status in ("done", "partial")
    for citation in result.citations:
        assert text[citation.start : citation.end] == citation.quote


@pytest.mark.embedded
async def test_embedded_model_finds_a_planted_code_as_a_short_answer():
    """A code planted in 300 tokens of the book, with a decoy of another colour.
    Over the whole span the 135M model copies only the start of the sentence
    ("The secret code for the ivory door"); asked about that sentence alone it
    gives the code (benchmarks/embedded_leaf.py, case c00)."""
    text = BOOK.read_text()
    start = text.index("Alice was beginning to get very tired")
    prose = text[start : start + 1200]
    cut = prose.index("\n\n", 500)
    haystack = (
        prose[:cut] + "\n\nThe secret code for the ivory door is 5311.\n\n"
        + "The secret code for the teal door is 2870.\n\n" + prose[cut + 2 :]
    )
    result = await arun("What is the secret code for the ivory door?", text=haystack, kind="short",
                        planner="rules")

    assert result.found and "5311" in str(result.answer)
    assert result.tree.verdict == "ok-focused" and result.usage.calls == 2
    (citation,) = result.citations
    assert citation.quote == "The secret code for the ivory door is 5311."
    assert haystack[citation.start : citation.end] == citation.quote
