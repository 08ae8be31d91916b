"""The join kind: entities meeting several conditions met in different places."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from rlm_graph import ConfigError, arun
from rlm_graph.chat import answer_text
from rlm_graph.cli import main
from rlm_graph.config import RunConfig
from rlm_graph.models import Completion
from rlm_graph.nodes.merge import merge_by_code, merge_join
from rlm_graph.nodes.plan import (
    apply_model_plan,
    guess_kind,
    join_parts,
    make_plan,
    render_plan,
)
from rlm_graph.nodes.prompts import (
    JOIN_MAX_MATCHES,
    LIST_MAX_ITEMS,
    leaf_messages,
    schema_for,
)
from rlm_graph.nodes.types import Answer, Evidence, Match, Task
from rlm_graph.nodes.verify import verify_leaf
from rlm_graph.source import source_from_text
from rlm_graph.testing import ModelRequest, Reply

from .conftest import excerpt_of

SETTINGS = {"model": "scripted/m", "context_window": 4096, "chunk_tokens": 120, "overlap_tokens": 24}
QUESTION = "List the users who have both a refund record and a shipping record."
CONDITIONS = ("have a refund record", "have a shipping record")


def _records() -> str:
    """U0001: refund first, shipping last (far apart); U0002: refund only;
    U0003: both, next to each other; everyone else: other labels."""
    lines = ["Record 001 | user U0001 | label: refund | asked for the money back"]
    lines.append("Record 002 | user U0002 | label: refund | parcel never came")
    for n in range(3, 40):
        label = ("billing", "login", "warranty")[n % 3]
        lines.append(f"Record {n:03d} | user U{100 + n:04d} | label: {label} | waited for an answer")
    lines.append("Record 040 | user U0003 | label: shipping | asked where the parcel is")
    lines.append("Record 041 | user U0003 | label: refund | wants the money back")
    lines.append("Record 042 | user U0001 | label: shipping | parcel went to the old address")
    return "\n".join(lines) + "\n"


RECORDS = _records()
RECORD = re.compile(r"Record \d+ \| user (U\d{4}) \| label: (\w+) \|[^\n]*")


def join_reader(request: ModelRequest) -> Reply | str:
    """Answers a join leaf truthfully from its excerpt: per numbered condition,
    the users of the excerpt with a record of that label."""
    excerpt = excerpt_of(request)
    assert excerpt is not None, "a join is merged by code: only leaf prompts reach the model"
    asked = re.findall(r"^(\d+)\. have an? (\w+) record$", request.prompt.split(">>>")[-1], re.MULTILINE)
    matches = [
        {"entity": m.group(1), "condition": int(number), "quote": m.group(0)}
        for m in RECORD.finditer(excerpt)
        for number, label in asked
        if m.group(2) == label
    ]
    return json.dumps({"matches": matches})


def reply(content: dict) -> Completion:
    return Completion(text=json.dumps(content), finish_reason="stop", prompt_tokens=9, completion_tokens=9)


def whole() -> Task:
    return Task(id="0.1", start=0, end=len(RECORDS), depth=1, question=QUESTION, tokens=30)


def line_of(user: str, label: str) -> str:
    return next(m.group(0) for m in RECORD.finditer(RECORDS) if m.group(1) == user and m.group(2) == label)


def match(entity: str, condition: int, start: int, end: int) -> Match:
    return Match(entity=entity, condition=condition, evidence=Evidence(quote="x" * (end - start), start=start, end=end))


# -- plan -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "entity", "conditions"),
    [
        (QUESTION, "users", CONDITIONS),
        ("Which users have both a refund record and a shipping record?", "users", CONDITIONS),
        ("List the users who have a refund record as well as a shipping record.", "users", CONDITIONS),
        ("Which customers ordered apples and also pears?", "customers", ("ordered apples", "ordered pears")),
        ("Which files define foo and also import bar?", "files", ("define foo", "import bar")),
        ("List the files that both define foo and import bar.", "files", ("define foo", "import bar")),
        (
            "List all customers with both an open ticket and an unpaid invoice.",
            "customers", ("with an open ticket", "with an unpaid invoice"),
        ),
        ("Find the users that have a refund record and also a shipping record", "users", CONDITIONS),
    ],
)
def test_planner_reads_the_conditions_of_a_join(question, entity, conditions):
    assert guess_kind(question) == "join"
    assert join_parts(question) == (entity, conditions)


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("How many users have both a refund record and a shipping record?", "count"),
        ("Does any user have both a refund record and a shipping record?", "yesno"),
        ("What is the name of the cat that has both stripes and spots?", "text"),
        ("List every city visited.", "list"),
        ("Which characters are mad?", "list"),
        ("Which label is most common?", "table"),
        ("Who is the Hatter?", "text"),
    ],
)
def test_planner_leaves_other_questions_alone(question, kind):
    assert guess_kind(question) == kind


def _plan(question: str = QUESTION, **settings):
    source = source_from_text(RECORDS)
    config = RunConfig(**{**SETTINGS, "planner": "rules", **settings})
    return make_plan(question, source, config, count=lambda t: len(t) // 4, window=4096)


def test_plan_carries_conditions_and_shows_them():
    plan = _plan()

    assert plan.kind == "join" and plan.conditions == CONDITIONS and plan.entity == "users"
    shown = render_plan(plan)
    assert "answer kind:   join" in shown
    assert "1. have a refund record; 2. have a shipping record" in shown
    assert "the users meeting all" in shown


def test_join_kind_without_readable_conditions_says_what_to_pass():
    with pytest.raises(ConfigError, match="--condition 'has a refund record'"):
        _plan("Which users matter most here?", kind="join")


def test_conditions_given_by_the_user_win_and_need_two():
    plan = _plan("Which users matter most here?", conditions=("bought a lamp", "returned it"), entity="buyers")
    assert (plan.kind, plan.conditions, plan.entity) == ("join", ("bought a lamp", "returned it"), "buyers")
    assert "conditions" in plan.overridden and "kind" in plan.overridden
    with pytest.raises(ConfigError, match="2 to 6 conditions"):
        _plan("Which users matter most here?", conditions=("bought a lamp",))
    with pytest.raises(ConfigError, match="conditions are for the 'join' kind"):
        _plan(conditions=("a", "b"), kind="list")


def test_model_plan_may_make_a_list_a_join_with_its_conditions():
    source = source_from_text(RECORDS)
    rules = _plan("List the users with refunds that later asked about shipping.")
    assert rules.kind == "list"

    joined = apply_model_plan(rules, {
        "kind": "join", "conditions": ["has a refund", "asked about shipping"], "entity": "users",
    }, source)
    assert joined.kind == "join" and joined.conditions == ("has a refund", "asked about shipping")
    assert joined.entity == "users" and joined.made_by == "model"

    bare = apply_model_plan(rules, {"kind": "join", "conditions": ["only one"]}, source)
    assert bare.kind == "list" and bare.conditions == ()
    assert "join' without two or more conditions" in bare.made_by

    made_up = apply_model_plan(rules, {"kind": "join", "conditions": ["is blue", "has wheels"]}, source)
    assert made_up.kind == "list" and made_up.conditions == ()
    assert "'is blue' says 'blue', which the question does not" in made_up.made_by


def test_model_cannot_turn_a_worded_join_into_a_list():
    source = source_from_text(RECORDS)
    plan = apply_model_plan(_plan(), {"kind": "list"}, source)
    assert plan.kind == "join" and plan.conditions == CONDITIONS
    assert "contradicts the question's wording" in plan.made_by


def test_leaf_prompt_numbers_the_conditions_and_schema_bounds_them():
    messages = leaf_messages(
        "join", whole(), "text", feedback=None, file_hint="r.txt", conditions=CONDITIONS, entity="users"
    )
    user = messages[-1]["content"]
    assert "Conditions:\n1. have a refund record\n2. have a shipping record\n" in user
    assert "find every user in this excerpt that meets it" in user
    assert '"entity": "<the user exactly as written' in user
    number = schema_for("join", conditions=2)["properties"]["matches"]["items"]["properties"]["condition"]
    assert (number["minimum"], number["maximum"]) == (1, 2)


# -- verify -----------------------------------------------------------------------


def test_verify_locates_each_match_and_joins_within_the_span():
    both = line_of("U0003", "shipping"), line_of("U0003", "refund")
    data = {"matches": [
        {"entity": "U0003", "condition": 2, "quote": both[0]},
        {"entity": "U0003", "condition": 1, "quote": both[1]},
        {"entity": "U0002", "condition": 1, "quote": line_of("U0002", "refund")},
        {"entity": "U0002", "condition": 1, "quote": line_of("U0002", "refund")},  # repeated: kept once
    ]}

    verdict = verify_leaf(RECORDS, whole(), "join", reply(data), conditions=2)

    assert verdict.ok, verdict.feedback
    answer = verdict.answer
    assert answer.value == ["U0003"] and answer.found
    assert len(answer.matches) == 3
    assert {(m.entity, m.condition) for m in answer.matches} == {("U0003", 1), ("U0003", 0), ("U0002", 0)}
    start = RECORDS.index(both[1])
    assert any(m.evidence.start == start and m.evidence.end == start + len(both[1]) for m in answer.matches)


def test_verify_rejects_a_quote_that_is_not_in_the_span():
    data = {"matches": [
        {"entity": "U0003", "condition": 1, "quote": line_of("U0003", "refund")},
        {"entity": "U0009", "condition": 2, "quote": "Record 099 | user U0009 | label: shipping | lost"},
    ]}

    verdict = verify_leaf(RECORDS, whole(), "join", reply(data), conditions=2)

    assert not verdict.ok and verdict.code == "no-evidence"
    assert "the quote for U0009" in verdict.feedback and "does not occur in the excerpt" in verdict.feedback


def test_verify_rejects_a_quote_that_does_not_name_the_entity():
    data = {"matches": [{"entity": "U0002", "condition": 2, "quote": line_of("U0001", "shipping")}]}

    verdict = verify_leaf(RECORDS, whole(), "join", reply(data), conditions=2)

    assert not verdict.ok and "does not name U0002" in verdict.feedback


@pytest.mark.parametrize("number", [0, 3, 1.5, "1", None, True, float("inf"), float("nan")])
def test_verify_rejects_a_condition_number_out_of_range(number):
    data = {"matches": [{"entity": "U0002", "condition": number, "quote": line_of("U0002", "refund")}]}

    verdict = verify_leaf(RECORDS, whole(), "join", reply(data), conditions=2)

    assert not verdict.ok and "condition" in verdict.feedback


def test_verify_needs_the_matches_key_and_accepts_an_empty_list():
    missing = verify_leaf(RECORDS, whole(), "join", reply({"items": []}), conditions=2)
    assert not missing.ok and missing.code == "malformed" and '"matches"' in missing.feedback
    empty = verify_leaf(RECORDS, whole(), "join", reply({"matches": []}), conditions=2)
    assert empty.ok and not empty.answer.found and empty.answer.value == []


# -- merge ------------------------------------------------------------------------


def test_merge_keeps_entities_meeting_every_condition_across_parts():
    left = Answer(kind="join", found=True, matches=(match("U0001", 0, 0, 20), match("U0002", 0, 30, 50)))
    right = Answer(kind="join", found=True, matches=(
        match("u0001 ", 1, 900, 920),  # another spelling of the same entity
        match("U0002", 0, 30, 50),  # the overlap saw U0002's refund again: same place
        match("U0000", 1, 950, 970),
    ))

    merged = merge_join([left, right], 2)

    assert merged.value == ["U0001"]
    assert merged.items[0].text == "U0001"
    assert [(m.entity, m.condition, m.evidence.start) for m in merged.matches] == [
        ("U0001", 0, 0), ("U0002", 0, 30), ("u0001 ", 1, 900), ("U0000", 1, 950),
    ]
    assert [e.start for e in merged.evidence] == [0, 900], "one quote per condition of each listed entity"
    assert merge_by_code("join", [left, right], conditions=2) == merged


def test_merge_of_nothing_and_of_entities_meeting_one_condition():
    assert merge_join([], 2).value == [] and not merge_join([], 2).found
    only_one = merge_join([Answer(kind="join", found=True, matches=(match("U0002", 0, 30, 50),))], 2)
    assert only_one.value == [] and only_one.found, "found: kept for a parent to join"


# -- whole runs -------------------------------------------------------------------


async def test_a_user_whose_records_sit_in_different_spans_is_joined(scripted):
    double = scripted(join_reader)

    result = await arun(QUESTION, text=RECORDS, planner="rules", **SETTINGS)

    assert result.kind == "join" and result.status == "done"
    assert result.answer == ["U0001", "U0003"]
    leaves = _leaf_spans(result.tree)
    assert len(leaves) > 3
    first, last = RECORDS.index(line_of("U0001", "refund")), RECORDS.index(line_of("U0001", "shipping"))
    assert not any(start <= first and last < end for start, end in leaves), "no span holds both records"
    joined = {j.entity: j.citations for j in result.joined}
    assert list(joined) == ["U0001", "U0003"]
    assert list(joined["U0001"]) == list(CONDITIONS)
    assert joined["U0001"]["have a refund record"].quote == line_of("U0001", "refund")
    assert joined["U0001"]["have a shipping record"].quote == line_of("U0001", "shipping")
    assert joined["U0001"]["have a shipping record"].line == RECORDS[:last].count("\n") + 1
    assert len(result.citations) == 4
    assert all(not double_request_is_merge(r) for r in double.requests)


def double_request_is_merge(request: ModelRequest) -> bool:
    return "partial answers" in request.prompt


def _leaf_spans(node) -> list[tuple[int, int]]:
    if not node.children:
        return [(node.start, node.end)]
    return [span for child in node.children for span in _leaf_spans(child)]


async def test_a_leaf_with_an_invented_quote_is_asked_again_then_fails(scripted):
    def inventor(request: ModelRequest) -> str:
        return json.dumps({"matches": [
            {"entity": "U7777", "condition": 1, "quote": "Record 777 | user U7777 | label: refund | made up"},
        ]})

    scripted(inventor)

    result = await arun(QUESTION, text=RECORDS, planner="rules", **{**SETTINGS, "chunk_tokens": 4000})

    assert result.status == "failed" and result.answer is None
    assert "U7777" not in json.dumps(result.model_dump(mode="json")["joined"])
    assert result.failures and "does not occur in the excerpt" in result.failures[0].reason


async def test_the_judge_sees_what_a_join_leaf_found_per_condition(scripted):
    judged: list[str] = []

    def judge(request: ModelRequest) -> str:
        judged.append(request.prompt.split("Proposed answer, from this text only:")[1])
        return json.dumps({"supported": True, "reason": ""})

    scripted(join_reader, provider="scripted")
    scripted(judge, provider="judgedouble")

    result = await arun(QUESTION, text=RECORDS, planner="rules", judge_model="judgedouble/j", **SETTINGS)

    assert result.answer == ["U0001", "U0003"]
    shown = " ".join(judged)
    assert '"U0002: have a refund record"' in shown, "a match of one condition is shown to the judge"
    assert '"U0001: have a shipping record"' in shown


def _run_cli(tmp_path, *args: str):
    source = tmp_path / "records.txt"
    source.write_text(RECORDS)
    return CliRunner().invoke(main, [
        "run", str(source), "--model", "scripted/m", "--context-window", "4096",
        "--chunk-tokens", "120", "--planner", "rules", *args,
    ])


def test_cli_shows_each_entity_with_a_quote_per_condition(scripted, tmp_path):
    scripted(join_reader)

    out = _run_cli(tmp_path, "-q", QUESTION)

    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0] == "- U0001"
    named = tmp_path / "records.txt"
    assert lines[1].startswith(f"    have a refund record: {named}:1  \"Record 001 | user U0001")
    assert lines[2].startswith(f"    have a shipping record: {named}:42  \"Record 042 | user U0001")
    assert lines[3] == "- U0003"
    assert "U0002" not in out.stdout


def test_cli_json_has_the_list_and_the_quotes(scripted, tmp_path):
    scripted(join_reader)

    out = _run_cli(tmp_path, "-q", "Which users matter?", "--condition", "have a refund record",
                   "--condition", "have a shipping record", "--entity", "users", "--json")

    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["kind"] == "join" and data["answer"] == ["U0001", "U0003"]
    assert data["plan"]["conditions"] == list(CONDITIONS)
    assert [j["entity"] for j in data["joined"]] == ["U0001", "U0003"]
    assert data["joined"][1]["citations"]["have a refund record"]["line"] == 41  # Record 041


def test_cli_dry_run_shows_the_conditions(tmp_path):
    out = _run_cli(tmp_path, "-q", QUESTION, "--dry-run")

    assert out.exit_code == 0, out.output
    assert "answer kind:   join" in out.stdout
    assert "conditions:    1. have a refund record; 2. have a shipping record" in out.stdout


def test_cli_kind_join_without_conditions_says_what_to_pass(tmp_path):
    out = _run_cli(tmp_path, "-q", "Which users matter?", "--kind", "join", "--dry-run")

    assert out.exit_code == 2
    assert "--condition" in out.stderr and "Traceback" not in out.output


def test_cli_refuses_conditions_with_another_kind(tmp_path):
    out = _run_cli(tmp_path, "-q", QUESTION, "--kind", "list", "--condition", "a", "--condition", "b")

    assert out.exit_code == 2
    assert "--condition is for --kind join" in out.stderr


# -- evaluation -------------------------------------------------------------------


def test_pairs_task_is_a_join_with_one_reader_per_condition():
    from rlm_graph.eval import pairs_task

    task = pairs_task(3000, seed=2)

    assert task.kind == "join" and task.entity == "users"
    assert task.conditions == ("have a refund record", "have a warranty record")
    assert join_parts(task.question) == ("users", task.conditions), "the planner reads the same wording"
    text = task.files["records.txt"]
    refund = task.condition_readers["have a refund record"](text)
    assert "U1301" in refund.value and all("label: refund" in q for q in refund.quotes)
    assert len(refund.value) == len(refund.quotes)


def test_reading_double_answers_a_join_leaf_from_its_excerpt_only():
    from rlm_graph.eval import pairs_task
    from rlm_graph.eval.reader import reading_responder

    task = pairs_task(3000, seed=2)
    respond = reading_responder([task])
    text = task.files["records.txt"]
    lines = text.splitlines()
    user = "U1301"
    refund = next(i for i, line in enumerate(lines) if f"user {user} | label: refund" in line)

    def ask(excerpt: str) -> list[dict]:
        messages = leaf_messages(
            "join", Task(id="0", start=0, end=0, depth=0, question=task.question, tokens=0), excerpt,
            feedback=None, file_hint="records.txt", conditions=task.conditions, entity="users",
        )
        request = ModelRequest(
            model="reader", messages=messages, prompt="\n".join(m["content"] for m in messages),
            response_format={"type": "json_schema", "json_schema": {"schema": schema_for("join", conditions=2)}},
            max_tokens=None, prompt_tokens=0, api_key=None, received_at=0.0,
        )
        return json.loads(str(respond(request)))["matches"]

    seen = ask(lines[refund])
    assert seen == [{"entity": user, "condition": 1, "quote": lines[refund]}]
    assert ask(lines[refund].replace("refund", "login")) == []


def test_cli_eval_pairs_rlm_is_exact_at_10k_and_100k(tmp_path):
    rows = tmp_path / "rows.json"
    out = CliRunner().invoke(main, [
        "eval", "--reading-double", "--task", "pairs", "--sizes", "10k,100k",
        "--context-window", "32768", "--planner", "rules", "--json", str(rows),
    ])

    assert out.exit_code == 0, out.output
    assert "| pairs | 10,000 | rlm | 1 | 1.00 |" in out.stdout
    assert "| pairs | 100,000 | rlm | 1 | 1.00 |" in out.stdout
    data = {(r["instance"], r["method"]): r for r in json.loads(rows.read_text())}
    assert data[("pairs-100k", "rlm")]["run"]["answer"] == data[("pairs-100k", "rlm")]["expected"]
    assert data[("pairs-100k", "direct")]["score"] < 1.0, "one window cannot hold 100K tokens"


async def test_flat_merge_joins_only_the_partials_its_window_holds(scripted):
    """60K tokens of records, 8K windows: rlm-graph joins in code and is exact;
    the map-reduce's one model merge joins the 12 span answers it can fit,
    which are not all of them; the direct call sees one window."""
    from rlm_graph.config import RunConfig
    from rlm_graph.eval import pairs_task, run_eval
    from rlm_graph.eval.reader import reading_responder

    task = pairs_task(60_000, seed=4)
    scripted(reading_responder([task]), provider="scripted")

    rows = await run_eval([task], RunConfig(model="scripted/reader", context_window=8192, planner="rules"))

    by = {r.method: r for r in rows}
    assert by["rlm"].score == 1.0 and by["rlm"].run.answer == task.expected
    assert 0.5 < by["mapreduce"].score < 1.0
    assert set(by["mapreduce"].run.answer) < set(task.expected), "what it joins is right, but not all"
    assert by["direct"].score < by["mapreduce"].score


# -- user-test findings: a full reply, planner wording, spelling, sources ---------


def _dense_records(users: int) -> str:
    """Every user has a refund and a shipping record, refunds first."""
    refunds = [f"Record {n:03d} | user U{n} | label: refund | wants the money back" for n in range(1, users + 1)]
    shipping = [f"Record {users + n:03d} | user U{n} | label: shipping | parcel sent" for n in range(1, users + 1)]
    return "\n".join(refunds + shipping) + "\n"


DENSE_RECORD = re.compile(r"Record \d+ \| user (U\d+) \| label: (\w+) \|[^\n]*")


def capped_reader(request: ModelRequest) -> str:
    """Answers a join leaf truthfully, but stops at the schema's cap of matches,
    as a model held to the schema does."""
    excerpt = excerpt_of(request)
    assert excerpt is not None
    asked = re.findall(r"^(\d+)\. have an? (\w+) record$", request.prompt.split(">>>")[-1], re.MULTILINE)
    matches = [
        {"entity": m.group(1), "condition": int(number), "quote": m.group(0)}
        for number, label in asked
        for m in DENSE_RECORD.finditer(excerpt)
        if m.group(2) == label
    ]
    return json.dumps({"matches": matches[:JOIN_MAX_MATCHES]})


DENSE = {"model": "scripted/m", "context_window": 16384, "chunk_tokens": 6000, "overlap_tokens": 24}


async def test_a_reply_at_the_cap_of_matches_is_split_not_taken_as_complete(scripted):
    text = _dense_records(60)  # 120 matches in one span; the reply can hold 80
    double = scripted(capped_reader)

    result = await arun(QUESTION, text=text, planner="rules", **DENSE)

    assert result.status == "done" and not result.failures
    assert result.answer == [f"U{n}" for n in range(1, 61)]
    assert len(double.requests) >= 3, "the full reply's span was split and read again in parts"


async def test_a_full_reply_whose_span_cannot_be_split_is_a_failure(scripted):
    scripted(capped_reader)
    settings = {**DENSE, "context_window": 32768, "chunk_tokens": 12000, "max_depth": 1}

    # 400 matches: the halves at the deepest level allowed still hold 200 each.
    result = await arun(QUESTION, text=_dense_records(200), planner="rules", **settings)

    assert result.status == "partial", "never done: some of what the full replies held was cut"
    assert result.failures
    assert all("the most one reply may hold" in failure.reason for failure in result.failures)


@pytest.mark.parametrize(
    ("kind", "reply_data"),
    [
        ("list", {"items": [{"item": f"U{n}", "quote": f"user U{n} "} for n in range(LIST_MAX_ITEMS)]}),
        ("count", {"count": LIST_MAX_ITEMS, "quotes": ["label: refund"] * LIST_MAX_ITEMS}),
        ("table", {"rows": [{"label": f"l{n}", "count": 0, "quotes": []} for n in range(LIST_MAX_ITEMS)]}),
        ("table", {"rows": [{"label": "refund", "count": 40, "quotes": ["label: refund"] * LIST_MAX_ITEMS}]}),
        ("schema", {"records": [{"user": f"U{n}", "quote": "label: refund"} for n in range(LIST_MAX_ITEMS)]}),
    ],
)
def test_every_kind_treats_a_reply_at_its_cap_as_possibly_cut_short(kind, reply_data):
    text = _dense_records(LIST_MAX_ITEMS)
    task = Task(id="0.1", start=0, end=len(text), depth=1, question="Which users?", tokens=30)
    record_schema = {"type": "object", "properties": {"user": {"type": "string"}}}

    verdict = verify_leaf(text, task, kind, reply(reply_data), record_schema)

    assert not verdict.ok and verdict.code == "too-many"


def test_a_join_reply_at_the_cap_is_rejected_and_one_under_or_over_it_is_not():
    text = _dense_records(60)
    task = Task(id="0.1", start=0, end=len(text), depth=1, question=QUESTION, tokens=30)
    lines = list(DENSE_RECORD.finditer(text))

    def matches(size: int) -> dict:
        return {"matches": [
            {"entity": m.group(1), "condition": 1 if m.group(2) == "refund" else 2, "quote": m.group(0)}
            for m in lines[:size]
        ]}

    at_cap = verify_leaf(text, task, "join", reply(matches(JOIN_MAX_MATCHES)), conditions=2)
    under = verify_leaf(text, task, "join", reply(matches(JOIN_MAX_MATCHES - 1)), conditions=2)
    over = verify_leaf(text, task, "join", reply(matches(JOIN_MAX_MATCHES + 1)), conditions=2)

    assert not at_cap.ok and at_cap.code == "too-many"
    assert "held 80 matches" in at_cap.feedback
    assert under.ok and over.ok, "a reply past the cap was not held to it, so the cap did not cut it"


def test_model_plan_conditions_must_be_the_questions_own():
    source = source_from_text(RECORDS)
    rules = _plan("List the users who have a refund record.")
    assert rules.kind == "list"

    invented = apply_model_plan(rules, {
        "kind": "join", "conditions": ["have a refund record", "have a shipping record"], "entity": "users",
    }, source)
    assert invented.kind == "list" and invented.conditions == ()
    assert "'have a shipping record' says 'shipping', which the question does not" in invented.made_by

    twice = apply_model_plan(_plan("List the users who have a refund record and a shipping record."), {
        "kind": "join", "conditions": ["have a refund record", "Have a  REFUND record"],
    }, source)
    assert twice.kind == "list" and "'have a refund record' is given twice" in twice.made_by

    endings = apply_model_plan(_plan("List the users who were refunded and whose parcels shipped."), {
        "kind": "join", "conditions": ["got a refund", "had a parcel shipped"],
    }, source)
    assert endings.kind == "list", "'got' is not the question's"
    read = apply_model_plan(_plan("List the users who were refunded and whose parcels shipped."), {
        "kind": "join", "conditions": ["were refunded", "have parcels shipped"],
    }, source)
    assert read.kind == "join" and read.conditions == ("were refunded", "have parcels shipped")


@pytest.mark.parametrize("given", [("has a refund", "has a refund"), ("has a refund", "Has a  REFUND.")])
def test_the_same_condition_twice_is_refused_in_one_line(given, tmp_path):
    with pytest.raises(ValueError, match="are the same"):
        RunConfig(**SETTINGS, conditions=given)

    out = _run_cli(tmp_path, "-q", QUESTION, "--condition", given[0], "--condition", given[1], "--dry-run")

    assert out.exit_code == 2 and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1 and "give each --condition once" in out.stderr


def test_cli_says_join_when_the_model_plan_makes_a_list_a_join(scripted, tmp_path):
    def planner_and_reader(request: ModelRequest) -> str:
        if "You plan how to read" in request.prompt:
            return json.dumps({
                "kind": "join", "sub_question": "", "chunk_tokens": 0, "filter": "",
                "conditions": list(CONDITIONS), "entity": "users",
            })
        return join_reader(request)

    scripted(planner_and_reader)
    source = tmp_path / "records.txt"
    source.write_text(RECORDS)

    out = CliRunner().invoke(main, [
        "run", str(source), "--model", "scripted/m", "--context-window", "4096", "--chunk-tokens", "120",
        "--planner", "model", "-q", "List the users who have a refund record and a shipping record.",
    ])

    assert out.exit_code == 0, out.output
    assert "; list answer;" not in out.stderr, "the start line waits for the final plan"
    assert "; join answer;" in out.stderr and "plan by model" in out.stderr
    assert "conditions: 1. have a refund record" in out.stderr
    assert out.stdout.splitlines()[0] == "- U0001"


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("Find the number of users who have both a refund record and a shipping record.", "count"),
        ("Identify the number of users with both a refund record and a shipping record.", "count"),
        ("Determine how many users have both a refund and a shipping record.", "count"),
        ("Show me the number of users who have a refund record and also a shipping record.", "count"),
        ("Find out whether there is a user who has both a refund record and a shipping record.", "yesno"),
        ("Tell me whether any user has both a refund record and a shipping record.", "yesno"),
        ("List the users who have both a refund record and a shipping record, if there are any.", "yesno"),
        ("Find the number of errors.", "count"),
        ("Check if the server restarted.", "yesno"),
        ("If the door was locked, who had the key?", "text"),
    ],
)
def test_a_count_or_yes_no_cue_anywhere_wins_over_the_join_shape(question, kind):
    assert guess_kind(question) == kind


@pytest.mark.parametrize(
    ("question", "conditions"),
    [
        ("List the books that both Alice and Bob read.", ("Alice read", "Bob read")),
        ("List the reports that both IT and HR approved.", ("IT approved", "HR approved")),
        (
            "List the users who have both a refund record and a shipping record and a complaint.",
            ("have a refund record", "have a shipping record", "have a complaint"),
        ),
        (
            "List the users who have both a refund record, a shipping record and a complaint.",
            ("have a refund record", "have a shipping record", "have a complaint"),
        ),
        ("List the users who have both a refund record and also a shipping record.", CONDITIONS),
        ("List the users who have both a refund record and a shipping record, sorted by id.", CONDITIONS),
        ("List the users who have both a refund record and a shipping record in alphabetical order.", CONDITIONS),
        ("List the users who both logged in and paid an invoice.", ("logged in", "paid an invoice")),
        (
            "List the users who have both a refund and an item ordered by phone.",
            ("have a refund", "have an item ordered by phone"),
        ),
    ],
)
def test_planner_reads_harder_join_wordings(question, conditions):
    assert guess_kind(question) == "join"
    assert join_parts(question)[1] == conditions


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("List the errors that occurred in both January and February and their causes.", "list"),
        ("List the errors that occurred in both January and February, and their causes.", "list"),
        ("List the users who both posted and commented on the blog.", "list"),
        ("List the users who have both a refund record and a refund record.", "list"),
        ("List the users who have both a Refund  record and a refund record.", "list"),
        ("List the users who have both a, b, c, d, e, f and g.", "list"),
        ("Which users have both a refund record and a shipping record, with their totals?", "text"),
    ],
)
def test_planner_does_not_guess_a_join_it_cannot_read(question, kind):
    assert join_parts(question) is None
    assert guess_kind(question) == kind


@pytest.mark.parametrize(
    ("question", "entity", "conditions"),
    [
        ("Which of the users have both a refund record and a shipping record?", "users", CONDITIONS),
        ("Which of these users have both a refund record and a shipping record?", "users", CONDITIONS),
        ("List users having both a refund record and a shipping record.", "users", CONDITIONS),
        ("Which users who have a refund record also have a shipping record?", "users", CONDITIONS),
        (
            "List the users with a refund record who also have a shipping record.",
            "users", ("with a refund record", "have a shipping record"),
        ),
        (
            "Which users with a refund record also have a shipping record?",
            "users", ("with a refund record", "have a shipping record"),
        ),
    ],
)
def test_planner_reads_more_join_wordings(question, entity, conditions):
    assert guess_kind(question) == "join"
    assert join_parts(question) == (entity, conditions)


def test_verify_spells_the_entity_as_the_source_does():
    data = {"matches": [
        {"entity": "u0003", "condition": 1, "quote": line_of("U0003", "refund")},
        {"entity": "U 0003", "condition": 2, "quote": line_of("U0003", "shipping")},
    ]}

    verdict = verify_leaf(RECORDS, whole(), "join", reply(data), conditions=2)

    assert verdict.ok, verdict.feedback
    assert verdict.answer.value == ["U0003"]
    assert {m.entity for m in verdict.answer.matches} == {"U0003"}


def test_entities_are_sorted_with_their_numbers_in_order():
    names = ["U15", "u9", "U1", "U3", "U 6", "U10"]
    parts = [Answer(kind="join", found=True, matches=tuple(
        m for i, name in enumerate(names) for m in (match(name, 0, 100 * i, 100 * i + 9),
                                                     match(name, 1, 1000 + 100 * i, 1000 + 100 * i + 9))
    ))]

    assert merge_join(parts, 2).value == ["U1", "U3", "U 6", "u9", "U10", "U15"]


def test_entity_must_name_something_and_needs_a_join(tmp_path):
    with pytest.raises(ValueError, match="--entity is empty"):
        RunConfig(**SETTINGS, entity="  ")
    with pytest.raises(ConfigError, match=r"planned as a 'list' answer\. Add --kind join"):
        _plan("List every user.", entity="users")

    out = _run_cli(tmp_path, "-q", "List every user.", "--entity", "users", "--dry-run")
    assert out.exit_code == 2 and "Add --kind join" in out.stderr
    out = _run_cli(tmp_path, "-q", QUESTION, "--entity", "", "--dry-run")
    assert out.exit_code == 2 and "--entity is empty" in out.stderr


async def test_chat_sources_of_a_join_are_grouped_by_entity_and_condition(scripted):
    scripted(join_reader)
    result = await arun(QUESTION, text=RECORDS, planner="rules", **SETTINGS)

    text = answer_text(result)

    sources = text.split("Sources:\n", 1)[1].splitlines()
    assert sources[0] == "- U0001:"
    assert sources[1] == f'    have a refund record: line 1: "{line_of("U0001", "refund")}"'
    assert sources[2] == f'    have a shipping record: line 42: "{line_of("U0001", "shipping")}"'
    assert sources[3] == "- U0003:"
    assert sources[4].startswith("    have a refund record: line 41:")
