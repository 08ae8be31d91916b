"""The content-defined tree above the leaves, and its stability under edits."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from rlm_graph import api
from rlm_graph.testing import ModelRequest, Reply, ScriptedModel
from rlm_graph.tree import Group, boundary_levels, child_groups, root_height
from tests.conftest import excerpt_of


def all_groups(levels: list[int], fan_out: int, max_depth: int) -> list[tuple[int, int, int]]:
    """Every group of the tree as (first, stop, depth), walking it as the engine does."""
    found = []

    def walk(group: Group, depth: int) -> None:
        found.append((group.first, group.stop, depth))
        if group.size < 2:
            return
        for child in child_groups(levels, group, fan_out=fan_out, last_level=depth + 1 >= max_depth):
            walk(child, depth + 1)

    walk(Group(0, len(levels), root_height(levels)), 0)
    return found


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=400),
    st.integers(min_value=2, max_value=9),
    st.integers(min_value=1, max_value=6),
)
def test_children_partition_their_parent_and_respect_fan_out(texts, fan_out, max_depth):
    levels = boundary_levels(texts, fan_out)
    stack = [(Group(0, len(levels), root_height(levels)), 0)]
    leaves_seen = []
    while stack:
        group, depth = stack.pop()
        if group.size == 1:
            leaves_seen.append(group.first)
            continue
        last = depth + 1 >= max_depth
        children = child_groups(levels, group, fan_out=fan_out, last_level=last)
        assert children[0].first == group.first
        assert children[-1].stop == group.stop
        assert all(a.stop == b.first for a, b in zip(children, children[1:]))
        assert len(children) >= 2
        if not last:
            assert len(children) <= fan_out
        stack.extend((child, depth + 1) for child in children)
    assert sorted(leaves_seen) == list(range(len(texts)))


def test_an_edited_leaf_changes_only_the_groups_on_its_path():
    rng = random.Random(3)
    texts = [f"leaf {i} {rng.random()}" for i in range(3000)]
    before = {(f, s) for f, s, _ in all_groups(boundary_levels(texts, 8), 8, 6)}
    edited = texts[:]
    edited[1500] = "an edited leaf"
    after = {(f, s) for f, s, _ in all_groups(boundary_levels(edited, 8), 8, 6)}
    changed = after - before
    # Only groups containing leaf 1500 can change: one per level of the tree.
    assert all(f <= 1500 < s for f, s in changed), sorted(changed)
    assert len(changed) <= 8


def test_levels_depend_on_content_only():
    assert boundary_levels(["a", "b", "a"], 4)[0] == boundary_levels(["a"], 4)[0]
    assert boundary_levels(["x"] * 3, 4) == [boundary_levels(["x"], 4)[0]] * 3


def notes_text(seed: int, size: int) -> list[str]:
    rng = random.Random(seed)
    words = "the river ran slowly past an old mill while the town slept and lamps burned low".split()
    paragraphs, total = [], 0
    while total < size:
        paragraph = f"Note {len(paragraphs)}. " + " ".join(rng.choice(words) for _ in range(rng.randint(30, 160))) + "."
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return paragraphs


def note_lister(request: ModelRequest) -> Reply:
    """A reader double: lists each 'Note N.' in its excerpt."""
    excerpt = excerpt_of(request) or ""
    found = re.finditer(r"(Note \d+)\. \w+", excerpt)
    items = [{"item": m.group(1), "quote": m.group(0)} for m in found]
    return Reply(content=json.dumps({"items": items}))


def test_editing_one_paragraph_of_2_mb_costs_one_new_call(tmp_path: Path) -> None:
    paragraphs = notes_text(7, 2_000_000)
    middle = len(paragraphs) // 2
    edited = paragraphs[:]
    edited[middle] = edited[middle].replace("river", "stream", 1) + " One sentence was added here."
    double = ScriptedModel(note_lister).register()
    try:
        settings = {
            "model": "scripted/m", "context_window": 16384, "kind": "list", "chunk_tokens": 2000,
            "store": str(tmp_path / "s.sqlite"),
        }
        first = api.run("Which notes are there?", text="\n\n".join(paragraphs), **settings)
        calls_first = len(double.requests)
        second = api.run("Which notes are there?", text="\n\n".join(edited), **settings)
        new_calls = len(double.requests) - calls_first
    finally:
        double.unregister()
    assert first.status == second.status == "done"
    assert len(second.answer) == len(paragraphs)
    assert calls_first >= 100
    # The edited piece, plus at most its neighbour when the edit reaches the overlap.
    assert 1 <= new_calls <= 2, (new_calls, calls_first)
    assert second.usage.cached_calls >= calls_first - 2
