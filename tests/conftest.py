"""Shared fixtures: offline switches, the scripted model double, reading prompts.

The responders here play a *model* for the engine's tests. They read the
excerpt out of the engine's leaf prompt and answer by a fixed rule (a regex),
the way a perfect reader would; the engine's own logic (split, verify, merge,
retry) is what the tests exercise.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from rlm_graph.testing import ModelRequest, Reply, ScriptedModel  # noqa: E402



@pytest.fixture(autouse=True)
def _store_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run of a test is checkpointed in a fresh SQLite file, never in the user's store."""
    folder = tmp_path_factory.mktemp("store")
    monkeypatch.setenv("RLM_GRAPH_STORE", str(folder / "store.sqlite"))


EXCERPT = re.compile(r"<<<\n(.*)\n>>>", re.DOTALL)


def excerpt_of(request: ModelRequest) -> str | None:
    """The span text of a leaf prompt; None for other prompts (merges)."""
    match = EXCERPT.search(request.prompt)
    return match.group(1) if match else None


def is_merge(request: ModelRequest) -> bool:
    """Whether a request is a free-text merge call."""
    return "partial answers" in request.prompt


def text_reply(pattern: str, answer: Callable[[re.Match[str]], str] | None = None) -> Callable[[ModelRequest], Reply | str]:
    """A responder answering text questions by finding ``pattern`` in the excerpt.

    The quote is the whole match, the answer its first group (or ``answer(m)``).
    Merge calls get the partial answers joined with "; ".
    """
    regex = re.compile(pattern)

    def respond(request: ModelRequest) -> Reply | str:
        if is_merge(request):
            parts = re.findall(r"^\[\d+\] (.*)$", request.prompt, re.MULTILINE)
            return json.dumps({"answer": "; ".join(parts)})
        excerpt = excerpt_of(request) or ""
        match = regex.search(excerpt)
        if match is None:
            return json.dumps({"relevant": False, "quote": "", "answer": ""})
        value = answer(match) if answer else match.group(1)
        return json.dumps({"relevant": True, "quote": match.group(0), "answer": value})

    return respond


def list_reply(pattern: str) -> Callable[[ModelRequest], Reply | str]:
    """A responder listing every match of ``pattern``'s first group, quoted."""
    regex = re.compile(pattern)

    def respond(request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request) or ""
        items = [{"item": m.group(1), "quote": m.group(0)} for m in regex.finditer(excerpt)]
        return json.dumps({"items": items})

    return respond


def count_reply(pattern: str) -> Callable[[ModelRequest], Reply | str]:
    """A responder counting whole matches of ``pattern``, quoting each one."""
    regex = re.compile(pattern)

    def respond(request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request) or ""
        quotes = [m.group(0) for m in regex.finditer(excerpt)]
        return json.dumps({"count": len(quotes), "quotes": quotes})

    return respond


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedModel]]:
    """Register scripted model doubles; all are unregistered after the test."""
    made: list[ScriptedModel] = []

    def make(responder: Callable[[ModelRequest], Reply | str], **kwargs: object) -> ScriptedModel:
        double = ScriptedModel(responder, **kwargs).register()  # type: ignore[arg-type]
        made.append(double)
        return double

    yield make
    for double in made:
        double.unregister()


def numbered_paragraphs(count: int, *, needle_at: dict[int, str] | None = None, words: int = 60) -> str:
    """Plain prose paragraphs; ``needle_at`` puts extra sentences in some of them."""
    filler = (
        "The river ran slowly past the old mill while the town slept and the "
        "lamps burned low along the quiet street near the square. "
    )
    body = (filler * (words // 20 + 1)).split()[:words]
    paragraphs = []
    for index in range(count):
        extra = (needle_at or {}).get(index, "")
        paragraphs.append(f"Paragraph {index}. {' '.join(body)}. {extra}".strip())
    return "\n\n".join(paragraphs) + "\n"


POSTGRES_URL = os.environ.get("RLM_GRAPH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A store URL on the real PostgreSQL server, in a schema of its own (dropped after)."""
    import uuid

    import psycopg

    schema = f"rlm_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is needed for this test: {exc}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
