"""The evaluation harness: fixed generator instances, scoring, methods, table, chart."""

from __future__ import annotations

import re

import pytest

from rlm_graph.config import RunConfig
from rlm_graph.eval import (
    draw_chart,
    format_table,
    multidoc_task,
    needle_task,
    pairs_task,
    records_compare_task,
    records_count_task,
    run_eval,
    score,
    suite,
)
from rlm_graph.eval.generators import CHARS_PER_TOKEN
from rlm_graph.eval.reader import reading_responder

# Small fixed instances with their exact answers. The generators are seeded
# with strings (random.Random hashes them with SHA-512), so these hold on every
# machine and Python run.


def test_needle_instance_is_fixed_by_its_seed():
    task = needle_task(2000, seed=7, depth=0.25)

    assert task.question == "What is the secret code for the violet gate?"
    assert task.expected == "5543"
    text = task.files["haystack.txt"]
    at = text.index("The secret code for the violet gate is 5543.")
    assert 0.2 < at / len(text) < 0.3
    # Three distractors: codes for other colours of the same place.
    assert len(re.findall(r"The secret code for the \w+ gate is \d{4}\.", text)) == 4
    assert needle_task(2000, seed=7, depth=0.25).files == task.files


def test_straddling_needle_sits_across_a_span_boundary():
    task = needle_task(3000, seed=1, depth=0.5, straddle_tokens=500)

    assert task.expected == "7690"  # the same seed as above, other arguments
    text = task.files["haystack.txt"]
    needle = "The secret code for the amber locker is 7690."
    start = text.index(needle)
    step = int(500 * CHARS_PER_TOKEN)
    boundary = round(0.5 * len(text) / step) * step
    # The needle was centred on the nominal boundary, then moved back to a space.
    assert start == task.meta["needle_start"]
    assert start < boundary < start + len(needle)


def test_records_count_instance():
    task = records_count_task(2000, seed=3)

    assert task.question == "How many records have the label refund?"
    assert task.expected == 14
    text = task.files["records.txt"]
    assert len(re.findall(r"\| label: refund \|", text)) == 14
    assert task.meta["records"] == 98 == text.count("\n")


def test_records_compare_instance():
    task = records_compare_task(2000, seed=3)

    assert task.expected == "login"
    assert task.meta["counts"] == {"delivery": 21, "login": 24}
    assert task.kind == "table"


def test_pairs_instance():
    task = pairs_task(3000, seed=2)

    assert task.expected == [
        "U1301",
        "U3136",
        "U3727",
        "U3999",
        "U4424",
        "U6461",
        "U8036",
        "U9155",
        "U9918",
    ]
    text = task.files["records.txt"]
    for user in task.expected:
        assert re.search(rf"user {user} \| label: refund", text)
        assert re.search(rf"user {user} \| label: warranty", text)


def test_multidoc_instance_is_a_folder():
    task = multidoc_task(4000, seed=5, documents=6)

    assert sorted(task.files) == [f"memo_{i:04d}.txt" for i in range(6)]
    assert task.question == "How many memos report that project Osprey was delayed?"
    assert task.expected == 2
    delayed = [n for n, t in task.files.items() if "project Osprey was delayed by" in t]
    assert len(delayed) == 2


def test_sizes_follow_the_target():
    for tokens in (10_000, 40_000):
        task = needle_task(tokens, seed=0)
        assert abs(task.chars / CHARS_PER_TOKEN - tokens) / tokens < 0.05


@pytest.mark.parametrize(
    ("family", "answer", "expected"),
    [
        ("needle", "The code is 5543.", 1.0),
        ("needle", "5544", 0.0),
        ("count", 14, 1.0),
        ("count", "There are 15 of them", 0.0),
        ("compare", {"delivery": 21, "login": 24}, 1.0),
        ("compare", "delivery: 30, login: 24", 0.0),
        ("compare", "login is more common than delivery", 1.0),
        ("compare", "delivery is less common than login", 1.0),
        ("compare", "delivery is more common than login", 0.0),
        ("compare", {"delivery": 24, "login": 24}, 0.0),
        ("compare", "delivery or login", 0.0),
        ("needle", "The codes are 5543, 1234, 8765 and 4321.", 0.0),
        ("needle", "995543", 0.0),
        ("needle", "It is 5543 (the amber locker's 5543).", 1.0),
        ("pairs", ["U1301", "U3136"], 2 / 9),
        ("pairs", None, 0.0),
    ],
)
def test_score_is_exact(family, answer, expected):
    tasks = {
        "needle": needle_task(2000, seed=7, depth=0.25),
        "count": records_count_task(2000, seed=3),
        "compare": records_compare_task(2000, seed=3),
        "pairs": pairs_task(3000, seed=2),
    }
    assert score(tasks[family], answer) == pytest.approx(expected)


def test_suite_places_needles_at_each_depth_and_one_across_a_boundary():
    instances = suite(
        ["needle", "count"], [4000], depths=(0.0, 1.0), straddle_tokens=1000
    )

    assert [i.name for i in instances] == [
        "needle-4k-d0",
        "needle-4k-d100",
        "needle-4k-d50-x1000",
        "count-4k",
    ]
    last = instances[1].files["haystack.txt"]
    assert last.rstrip().endswith(f"is {instances[1].expected}.")


async def test_three_methods_side_by_side_with_the_reading_double(scripted, tmp_path):
    """Counting over 30K tokens with 8K windows: the direct call cannot see all
    records; the flat map-reduce's model merge adds up counts that overlapping
    spans both saw; rlm-graph's code merge removes them by span."""
    task = records_count_task(30_000, seed=11)
    needle = needle_task(30_000, seed=11, depth=0.9)
    double = scripted(reading_responder([task, needle]), provider="scripted")
    config = RunConfig(model="scripted/reader", context_window=8192, planner="rules")

    rows = await run_eval([task, needle], config)

    by = {(r.instance, r.method): r for r in rows}
    assert by[("count-30k", "rlm")].score == 1.0
    assert by[("count-30k", "direct")].score == 0.0
    assert by[("count-30k", "direct")].run.calls == 1
    merged = by[("count-30k", "mapreduce")].run.answer
    assert merged > task.expected, "the model merge counts overlap twice"
    assert by[("needle-30k-d90", "direct")].score == 0.0  # truncated away
    assert by[("needle-30k-d90", "rlm")].score == 1.0
    assert all(r.run.prompt_tokens > 0 and r.run.elapsed_s >= 0 for r in rows)
    assert len(double.requests) == sum(r.run.calls for r in rows)

    table = format_table(rows)
    assert "| count | 30,000 | rlm | 1 | 1.00 |" in table
    chart = draw_chart(rows, tmp_path / "chart.png", title="test")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reading_double_sees_only_what_it_is_sent():
    task = needle_task(2000, seed=7, depth=0.25)
    respond = reading_responder([task])
    from rlm_graph.testing import ModelRequest

    def ask(excerpt: str) -> str:
        prompt = f"Text:\n<<<\n{excerpt}\n>>>\n\nQuestion: {task.question}\n"
        request = ModelRequest(
            model="reader",
            messages=[],
            prompt=prompt,
            response_format=None,
            max_tokens=None,
            prompt_tokens=0,
            api_key=None,
            received_at=0.0,
        )
        return str(respond(request))

    text = task.files["haystack.txt"]
    at = text.index("The secret code for the violet gate")
    assert "5543" in ask(text[at - 100 : at + 100])
    assert "5543" not in ask(text[: at - 10])


def test_cli_eval_prints_the_table_and_writes_chart_and_rows(tmp_path):
    from click.testing import CliRunner

    from rlm_graph.cli import main

    chart, rows = tmp_path / "acc.png", tmp_path / "rows.json"
    out = CliRunner().invoke(main, [
        "eval", "--reading-double", "--task", "needle", "--task", "count", "--sizes", "4k,12k",
        "--depths", "0.9", "--planner", "rules", "--chart", str(chart), "--json", str(rows),
    ])

    assert out.exit_code == 0, out.output
    assert "| needle | 12,000 | rlm | 1 | 1.00 |" in out.stdout
    assert "| count | 12,000 | rlm | 1 | 1.00 |" in out.stdout
    assert chart.read_bytes()[:4] == b"\x89PNG"
    import json

    data = json.loads(rows.read_text())
    assert len(data) == 2 * 2 * 3 and {r["method"] for r in data} == {"direct", "mapreduce", "rlm"}


def test_cli_eval_rejects_a_bad_size():
    from click.testing import CliRunner

    from rlm_graph.cli import main

    out = CliRunner().invoke(main, ["eval", "--reading-double", "--sizes", "8q"])
    assert out.exit_code == 2 and "--sizes" in out.stderr and "Traceback" not in out.output
