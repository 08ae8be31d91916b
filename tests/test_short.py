"""The short answer kind: copied from the span, located by code, chosen among by
the question; and the cap on finer splits after rejected answers."""

from __future__ import annotations

import json
import re

import pytest

from rlm_graph import arun
from rlm_graph.models import Completion
from rlm_graph.nodes.merge import short_candidates
from rlm_graph.nodes.prompts import SHORT_ANSWER_PATTERN, schema_for
from rlm_graph.nodes.types import Answer, Evidence, Task
from rlm_graph.nodes.verify import verify_leaf
from rlm_graph.testing import ModelRequest

from .conftest import excerpt_of

TEXT = (
    "Alice sat by the river. The code for the blue door is 4103. "
    "She was bored.\n\nThe code for the red door is 7781. Nobody came."
)
QUESTION = "What is the code for the red door?"


def reply(answer: str, finish_reason: str = "stop") -> Completion:
    return Completion(text=json.dumps({"answer": answer}), finish_reason=finish_reason,
                      prompt_tokens=9, completion_tokens=3)


def reply_text(answer: str) -> Completion:
    return Completion(text=json.dumps({"answer": answer, "quote": ""}), finish_reason="stop",
                      prompt_tokens=9, completion_tokens=3)


def task(start: int = 0, end: int = len(TEXT), question: str = QUESTION) -> Task:
    return Task(id="0.1", start=start, end=end, depth=1, question=question, tokens=30)


def test_short_answer_is_found_in_the_span_with_its_sentence():
    verdict = verify_leaf(TEXT, task(), "short", reply("7781"))

    assert verdict.ok and verdict.answer.found and verdict.answer.text == "7781"
    (evidence,) = verdict.answer.evidence
    assert evidence.quote == "The code for the red door is 7781."
    assert TEXT[evidence.start : evidence.end] == evidence.quote


def test_short_answer_copied_as_a_whole_sentence_that_runs_on_is_located():
    # Small models copy the sentence and keep writing; the first sentence counts.
    said = "The code for the red door is 7781. The answer is the red door code"
    verdict = verify_leaf(TEXT, task(), "short", reply(said))

    assert verdict.ok and "7781" in verdict.answer.text
    assert verdict.answer.evidence[0].quote == "The code for the red door is 7781."


def test_short_answer_not_in_the_span_is_rejected_with_a_reason():
    verdict = verify_leaf(TEXT, task(), "short", reply("5555"))

    assert not verdict.ok and verdict.code == "no-evidence"
    assert "does not occur" in verdict.feedback


def test_short_answer_is_matched_as_whole_words_only():
    # "410" occurs only inside "4103": not an answer copied from the text.
    verdict = verify_leaf(TEXT, task(), "short", reply("410"))

    assert not verdict.ok and verdict.code == "no-evidence"


def test_short_answer_that_restates_the_question_is_rejected():
    verdict = verify_leaf(TEXT, task(), "short", reply("The code for the red door"))

    assert not verdict.ok and verdict.code == "restated"


def test_short_answer_from_a_sentence_unrelated_to_the_question_is_rejected():
    verdict = verify_leaf(TEXT, task(), "short", reply("Alice"))

    assert not verdict.ok and verdict.code == "no-evidence"


def test_short_not_stated_is_an_empty_answer():
    verdict = verify_leaf(TEXT, task(), "short", reply("not stated"))

    assert verdict.ok and not verdict.answer.found


def test_short_schema_keeps_braces_and_quote_marks_out_of_the_answer():
    pattern = schema_for("short")["properties"]["answer"]["pattern"]

    assert pattern == SHORT_ANSWER_PATTERN
    assert re.match(pattern, "7781") and re.match(pattern, "Mrs. Lindqvist moved to Montreal")
    assert not re.match(pattern, '7781 } The answer is: 7781') and not re.match(pattern, 'a"b')
    assert not re.match(pattern, "x" * 121)


def sentence(text: str) -> Evidence:
    start = TEXT.index(text)
    return Evidence(quote=text, start=start, end=start + len(text))


def test_short_candidates_rank_by_the_question_and_unite_agreeing_spans():
    blue = Answer(kind="short", found=True, text="4103", evidence=(sentence("The code for the blue door is 4103."),))
    red = Answer(kind="short", found=True, text="7781", evidence=(sentence("The code for the red door is 7781."),))
    red_again = red.model_copy(update={"text": "7781."})

    ranked = short_candidates([blue, red, red_again], QUESTION)

    assert [a.text for _, a in ranked] == ["7781", "4103"]
    assert ranked[0][0] > ranked[1][0]
    assert len(ranked[0][1].evidence) == 1, "the same sentence seen twice is one piece of evidence"


DOORS = " ".join(
    f"Paragraph {n} tells of the garden and the tea party and nothing else at all." for n in range(40)
)
DOORS = DOORS.replace("Paragraph 8 ", "The code for the blue door is 4103. Paragraph 8 ").replace(
    "Paragraph 31 ", "The code for the red door is 7781. Paragraph 31 "
)
CODE = re.compile(r"The code for the (\w+) door is (\d+)")


async def test_short_run_picks_the_answer_whose_sentence_fits_the_question(scripted):
    # A worker double that, like a weak model, answers every code it sees,
    # whatever door the question names; the merge must still pick the red one.
    def worker(request: ModelRequest) -> str:
        if "choose the answer" in request.prompt:
            raise AssertionError("no tie: the code merge decides without the model")
        match = CODE.search(excerpt_of(request) or "")
        return json.dumps({"answer": match.group(2) if match else "not stated"})

    double = scripted(worker)
    result = await arun(QUESTION, text=DOORS, model="scripted/m", kind="short", chunk_tokens=120,
                        context_window=4096)

    assert result.status == "done" and result.answer == "7781"
    assert [c.quote for c in result.citations] == ["The code for the red door is 7781."]
    assert not any("partial answers" in r.prompt for r in double.requests), "no model merge"


async def test_short_run_asks_the_root_model_only_to_break_a_tie(scripted):
    text = DOORS.replace("red door is 7781", "blue door is 7781")
    chosen: list[str] = []

    def model(request: ModelRequest) -> str:
        if "Which answer does the question ask for" in request.prompt:
            options = request.response_format["json_schema"]["schema"]["properties"]["answer"]["enum"]
            chosen.append(",".join(options))
            return json.dumps({"answer": "7781"})
        match = CODE.search(excerpt_of(request) or "")
        return json.dumps({"answer": match.group(2) if match else "not stated"})

    scripted(model)
    result = await arun("What is the code for the blue door?", text=text, model="scripted/m", kind="short",
                        chunk_tokens=120, context_window=4096)

    assert chosen == ["4103,7781,none of them"]
    assert result.answer == "7781"


async def test_a_span_whose_answers_keep_failing_is_split_finer_only_once(scripted):
    # Every reply is made up. Without the cap, the halves of a failing leaf were
    # re-asked and halved again, down to 64-token pieces.
    double = scripted(lambda request: json.dumps({"answer": "a made-up thing"}))
    result = await arun(QUESTION, text=DOORS, model="scripted/m", kind="short", chunk_tokens=480,
                        context_window=4096, verify_retries=1)

    def nodes(node):
        yield node
        for child in node.children:
            yield from nodes(child)

    tree = list(nodes(result.tree))
    leaves = [n for n in tree if not n.children]
    assert not result.found
    assert max(n.depth for n in tree) == 2, "root, the planned leaves, their pieces: nothing deeper"
    assert {n.verdict for n in tree if n.depth == 1} == {"split-after-no-evidence"}
    assert all(n.attempts == 2 and n.status == "failed" for n in leaves)
    assert result.status in ("failed", "partial") and result.failures
    assert len(double.requests) == 2 * (len(leaves) + sum(1 for n in tree if n.depth == 1))


def test_a_restated_answer_points_at_its_sentence():
    verdict = verify_leaf(TEXT, task(), "short", reply("the code for the red door"))

    assert verdict.code == "restated"
    assert verdict.focus is not None and verdict.focus.quote == "The code for the red door is 7781."
    # "leaves" for "leave": a word sharing its first letters with the question's is not new.
    train = "The train leaves at 9:40. It is late."
    said = verify_leaf(train, task(0, len(train), "When does the train leave?"), "short", reply("the train leaves"))
    assert said.code == "restated" and said.focus.quote == "The train leaves at 9:40."


async def test_a_leaf_that_restates_is_asked_about_that_sentence_alone(scripted):
    # Like the 135M model: over a whole span it copies the start of the right
    # sentence and stops; given that sentence alone it answers.
    def model(request: ModelRequest) -> str:
        excerpt = excerpt_of(request) or ""
        if excerpt.strip() == "The code for the red door is 7781.":
            return json.dumps({"answer": "7781"})
        if "red door" in excerpt:
            return json.dumps({"answer": "The code for the red door"})
        return json.dumps({"answer": "not stated"})

    double = scripted(model)
    result = await arun(QUESTION, text=DOORS, model="scripted/m", kind="short", chunk_tokens=120,
                        context_window=4096)

    assert result.answer == "7781"
    assert [c.quote for c in result.citations] == ["The code for the red door is 7781."]
    sentence = "The code for the red door is 7781."
    focused = [r for r in double.requests if (excerpt_of(r) or "").strip() == sentence]
    spans_with_it = {excerpt_of(r) for r in double.requests if sentence in (excerpt_of(r) or "")} - {sentence}
    assert len(focused) == len(spans_with_it) >= 1, "one focused question per span that restated"


async def test_the_root_leaf_is_focused_too(scripted):
    text = "Alice sat by the river bank. The code for the red door is 7781. Nobody came by."

    def model(request: ModelRequest) -> str:
        excerpt = (excerpt_of(request) or "").strip()
        if excerpt == "The code for the red door is 7781.":
            return json.dumps({"answer": "7781"})
        return json.dumps({"answer": "the code for the red door"})

    scripted(model)
    result = await arun(QUESTION, text=text, model="scripted/m", kind="short", context_window=4096)

    assert result.answer == "7781" and result.tree.attempts == 2


# -- answers with nothing new, and sentences of line-oriented text (issue-5 user test)

STORY = (
    "The Dormouse had fallen asleep again.\n"
    "'Once upon a time there were three little sisters,' the Dormouse began in a\n"
    "great hurry; 'and their names were Elsie, Lacie, and Tillie; and they lived\n"
    "at the bottom of a well.'\n"
)
SISTERS = "What were the names of the three sisters in the Dormouse's story?"
LOG = "".join(
    f"2026-01-01T10:{n // 60:02d}:{n % 60:02d} INFO user=u{n % 4} request id={1100 + n} took {100 + 7 * n} ms\n"
    for n in range(60)
)
LATENCY = "How long did request 1150 take?"


@pytest.mark.parametrize(
    ("text", "question", "said"),
    [
        (STORY, SISTERS, "a"), (STORY, SISTERS, "the"), (STORY, SISTERS, "and"),
        (STORY, SISTERS, "Dormouse"), (STORY, SISTERS, "three sisters"),
        (STORY, SISTERS, "the names of the sisters"),
        (LOG, LATENCY, "request"), (LOG, LATENCY, "took"), (LOG, LATENCY, "ms"),
        (LOG, LATENCY, "1150"), (LOG, LATENCY, "1150 ms"), (LOG, LATENCY, "request 1150"),
    ],
)
def test_a_short_answer_with_nothing_of_its_own_is_rejected(text, question, said):
    # Function words, bare units and the question's own words and numbers
    # (by stem: "took" is "take") carry no answer, however well they are placed.
    verdict = verify_leaf(text, task(0, len(text), question), "short", reply(said))

    assert not verdict.ok and verdict.code == "restated"
    assert "says nothing new" in verdict.feedback and "not stated" in verdict.feedback


@pytest.mark.parametrize(
    ("text", "question", "said", "line"),
    [
        (STORY, SISTERS, "Elsie, Lacie, and Tillie", "great hurry;"),
        (LOG, LATENCY, "450", "id=1150 took 450 ms"),
        (LOG, LATENCY, "450 ms", "id=1150 took 450 ms"),
    ],
)
def test_a_short_answer_with_a_word_of_its_own_is_still_accepted(text, question, said, line):
    verdict = verify_leaf(text, task(0, len(text), question), "short", reply(said))

    assert verdict.ok and verdict.answer.found and verdict.answer.text == said
    assert line in verdict.answer.evidence[0].quote


def test_a_choice_question_may_be_answered_with_its_own_words():
    text = "The door on the left is red. Nobody painted it blue."
    question = "Is the door red or blue?"
    verdict = verify_leaf(text, task(0, len(text), question), "short", reply("red"))

    assert verdict.ok and verdict.answer.text == "red"
    assert not verify_leaf(text, task(0, len(text), question), "short", reply("the")).ok


def test_a_function_word_answer_points_at_the_sentence_most_like_the_question():
    verdict = verify_leaf(STORY, task(0, len(STORY), SISTERS), "short", reply("a"))

    assert verdict.focus is not None
    assert verdict.focus.quote.startswith("'Once upon a time there were three little sisters")
    assert STORY[verdict.focus.start : verdict.focus.end] == verdict.focus.quote
    # A word the excerpt uses only in sentences unlike the question points nowhere.
    tea = "Alice poured a cup of tea. The Hatter sang."
    unrelated = verify_leaf(tea, task(0, len(tea), SISTERS), "short", reply("of"))
    assert unrelated.code == "restated" and unrelated.focus is None


async def test_a_leaf_that_answers_a_is_asked_about_its_best_sentence_alone(scripted):
    # The embedded model answered "a" on the quickstart-style question.
    focused_sentence = STORY[STORY.index("'Once") : STORY.index("well.'") + len("well.'")]

    def model(request: ModelRequest) -> str:
        excerpt = (excerpt_of(request) or "").strip()
        if excerpt == focused_sentence:
            return json.dumps({"answer": "Elsie, Lacie, and Tillie"})
        return json.dumps({"answer": "a"})

    double = scripted(model)
    result = await arun(SISTERS, text=STORY, model="scripted/m", kind="short", context_window=4096)

    assert result.answer == "Elsie, Lacie, and Tillie"
    assert [c.quote for c in result.citations] == [focused_sentence]
    assert len(double.requests) == 2


def test_a_sentence_of_line_oriented_text_is_one_line():
    verdict = verify_leaf(LOG, task(0, len(LOG), LATENCY), "short", reply("450"))

    (evidence,) = verdict.answer.evidence
    assert evidence.quote == "2026-01-01T10:00:50 INFO user=u2 request id=1150 took 450 ms"
    assert LOG[evidence.start : evidence.end] == evidence.quote
    said = verify_leaf(LOG, task(0, len(LOG), LATENCY), "text", reply_text("It took 450 ms"))
    assert said.ok and said.answer.evidence[0].quote == evidence.quote


def test_wrapped_prose_keeps_its_sentences_across_line_breaks_but_not_without_end():
    verdict = verify_leaf(STORY, task(0, len(STORY), SISTERS), "short", reply("Tillie"))
    assert verdict.answer.evidence[0].quote.count("\n") == 2, "a wrapped sentence of three lines is whole"
    # Prose whose sentence never ends is cut at its line breaks past 600 characters.
    runaway = "\n".join(f"and the {n}th guest came in with a hat and a cup of tea" for n in range(30))
    runaway += "\nand the Hatter poured tea for Alice\n" + "\n".join("nobody said a word" for _ in range(40))
    text = "Alice looked around. It was quiet.\n" + runaway
    long_one = verify_leaf(text, task(0, len(text), "Who poured tea for Alice?"), "short", reply("the Hatter"))
    assert long_one.ok and long_one.answer.evidence[0].quote == "and the Hatter poured tea for Alice"


def test_short_answers_from_log_lines_rank_by_their_own_line():
    # Each number's evidence is its own line: the line of request 1150 wins,
    # not whichever 30-line blob held the most question words.
    first = verify_leaf(LOG, task(0, len(LOG), LATENCY), "short", reply("107"))
    right = verify_leaf(LOG, task(0, len(LOG), LATENCY), "short", reply("450"))

    ranked = short_candidates([first.answer, right.answer], LATENCY)
    assert [a.text for _, a in ranked] == ["450", "107"] and ranked[0][0] > ranked[1][0]


async def test_a_rejected_span_is_split_into_two_overlapping_halves_not_three(scripted):
    # Halves of a failing span each hold their share of the overlap: before, a
    # sliver of a third piece was left over (three more calls per bad span).
    double = scripted(lambda request: json.dumps({"answer": "9999"}))
    text = LOG * 4
    result = await arun(LATENCY, text=text, model="scripted/m", kind="short", chunk_tokens=600,
                        context_window=4096, verify_retries=1, planner="rules")

    def nodes(node):
        yield node
        for child in node.children:
            yield from nodes(child)

    split = [n for n in nodes(result.tree) if n.verdict == "split-after-no-evidence"]
    assert len(split) >= 4
    assert all(len(n.children) == 2 for n in split), [len(n.children) for n in split]
    # Each bad span costs its two tries and two per half: 6 calls, not 8.
    assert all(n.attempts + sum(c.attempts for c in n.children) == 6 for n in split)
    leaf_requests = [r for r in double.requests if excerpt_of(r) is not None]
    assert len(leaf_requests) == sum(n.attempts for n in nodes(result.tree))
