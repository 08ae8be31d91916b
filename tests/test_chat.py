"""Which part of a conversation is the question and which the source."""

from __future__ import annotations

import pytest

from rlm_graph import ConfigError, ModelCallError
from rlm_graph.chat import answer_text, question_from_messages
from rlm_graph.result import Citation, Failure, Result


def test_last_user_message_asks_and_earlier_messages_are_read():
    asked = question_from_messages(
        [
            {"role": "system", "content": "Report A."},
            {"role": "user", "content": "Report B."},
            {"role": "assistant", "content": "Noted."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Which "},
                    {"type": "text", "text": "reports?"},
                ],
            },
        ]
    )

    assert asked.question == "Which reports?"
    assert asked.text == "Report A.\n\nReport B.\n\nassistant: Noted."


def test_a_single_message_is_cut_at_its_last_blank_line():
    asked = question_from_messages(
        [{"role": "user", "content": "Line 1.\n\nLine 2.\n  \nWhat is said?  "}]
    )

    assert asked.question == "What is said?"
    assert asked.text == "Line 1.\n\nLine 2."


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "no messages"),
        ([{"role": "system", "content": "text"}], "no user message"),
        (
            [{"role": "user", "content": "Just a question?"}],
            "Nothing to read besides the question",
        ),
        (
            [{"role": "system", "content": "text"}, {"role": "user", "content": "  "}],
            "question",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "reads text only",
        ),
        ([{"role": "user", "content": 42}], "must be a string"),
    ],
)
def test_unusable_conversations_are_refused_with_what_to_do(messages, fragment):
    with pytest.raises(ConfigError, match=fragment):
        question_from_messages(messages)


def _result(**fields: object) -> Result:
    base = {
        "run_id": "run-1",
        "status": "done",
        "question": "Q?",
        "kind": "text",
        "answer": "A",
    }
    return Result.model_validate({**base, **fields})


def test_answer_text_renders_kinds_citations_and_partial_runs():
    quote = Citation(source="<text>", start=0, end=5, line=3, quote="Alpha\n  beta")
    failure = Failure(task_id="0.1", source="<text>", start=0, end=9, reason="timeout")

    assert (
        answer_text(_result(citations=[quote]))
        == 'A\n\nSources:\n- line 3: "Alpha beta"'
    )
    assert (
        answer_text(_result(kind="list", answer=["x", "y"]), with_citations=False)
        == "- x\n- y"
    )
    assert (
        answer_text(_result(found=False, answer=None))
        == "The text does not answer this question."
    )
    partial = answer_text(
        _result(status="partial", failures=[failure]), with_citations=False
    )
    assert partial.endswith(
        "(Partial answer: 1 part(s) of the text could not be read.)"
    )
    with pytest.raises(ModelCallError, match="run-1 failed: timeout"):
        answer_text(_result(status="failed", failures=[failure]))
