"""The run configuration: one pydantic model fed by flags, environment and code.

This is the only module that reads ``os.environ`` for rlm-graph settings. Every
setting can come from a keyword argument, a CLI flag, or an ``RLM_GRAPH_*``
environment variable (for example ``RLM_GRAPH_MODEL``); explicit values win.
Provider settings (``OPENAI_API_KEY``, ``OLLAMA_API_BASE`` ...) stay LiteLLM's
business and are read by LiteLLM itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import regex
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_graph.nodes.types import condition_key

__all__ = ["AnswerKind", "RunConfig"]

AnswerKind = Literal["auto", "text", "short", "list", "count", "table", "yesno", "schema", "join"]


class RunConfig(BaseSettings):
    """How a run reads its source and which models it calls.

    Unknown keys are rejected, so a misspelt setting fails loudly instead of
    being ignored (a silently ignored concurrency limit is a known failure of
    tools like this one).
    """

    model_config = SettingsConfigDict(
        env_prefix="RLM_GRAPH_",
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        protected_namespaces=(),
    )

    model: str | None = None
    """Root model (plans, merges free text). A LiteLLM model name; none means the
    embedded model."""

    worker_model: str | None = None
    """Worker model (leaf calls). Defaults to ``model``."""

    router_config: Path | None = None
    """A LiteLLM proxy-style YAML file (``model_list``, ``router_settings``):
    deployments, fallbacks, rpm/tpm limits, cooldowns and which group plays
    which role. With it, ``model``, ``worker_model`` and ``judge_model`` name
    groups of the file (and pick them for their roles)."""

    api_base: str | None = None
    """Base URL for an OpenAI-compatible, Ollama or vLLM server, for both roles."""

    api_key: SecretStr | None = None
    """API key for ``api_base``. Usually better left to the provider's own
    environment variable (``OPENAI_API_KEY`` ...)."""

    max_depth: int = Field(default=4, ge=1, le=16)
    """Deepest level of the recursion tree (the root is depth 0)."""

    chunk_tokens: int | None = Field(default=None, ge=16)
    """Largest span, in tokens, a leaf call reads. Default: what fits the worker's
    window after instructions and the output reserve."""

    overlap_tokens: int = Field(default=32, ge=0)
    """Tokens shared by neighbouring spans, so evidence on a boundary is seen whole."""

    fan_out: int = Field(default=8, ge=2, le=256)
    """Most children one split makes above the last level."""

    fan_in: int = Field(default=8, ge=2, le=64)
    """Most child answers one free-text merge call reads."""

    concurrency: int = Field(default=8, ge=1, le=100_000)
    """Most model calls in flight at once, over the whole run."""

    kind: AnswerKind = "auto"
    """Answer kind: free text, a list of items, a count, a table of labelled
    counts, yes/no, or records of ``answer_schema``; ``auto`` lets the plan
    decide."""

    answer_schema: dict[str, Any] | None = None
    """JSON Schema of one record (``--schema FILE``, or a pydantic model's
    ``model_json_schema()``); setting it makes the kind ``schema``."""

    sub_question: str | None = None
    """What each piece is asked, instead of the planned sub-question (not
    empty: leave it unset to let the plan decide)."""

    conditions: tuple[str, ...] = ()
    """For the ``join`` kind: the conditions an entity must meet, each of which
    may be met in a different part of the source (``--condition``, repeated).
    Setting them makes the kind ``join``; empty lets the plan find them in the
    question's wording."""

    entity: str | None = None
    """For the ``join`` kind: what the answer lists, as a plural noun
    (``users``); default: the noun the question names, else ``entities``."""

    planner: Literal["model", "rules"] = "model"
    """Who plans: the root model, from a preview of the source (fields it gets
    wrong fall back to rules), or the rules alone (no planning call)."""

    judge_model: str | None = None
    """Judge model: checks each leaf answer that found something against its
    span (one more call per such answer; "found nothing" answers are not
    judged). A LiteLLM name (or a router group); none means no judge."""

    filter: str | None = None
    """Regular expression (case-insensitive): parts of the source with no match are
    skipped without a model call. Ignored, with a warning, if it matches nowhere.
    ``""`` means no filter, and the model's plan may not add one; None lets the
    plan decide."""

    max_output_tokens: int = Field(default=384, ge=16)
    """Output tokens reserved for each model call."""

    context_window: int | None = Field(default=None, ge=256)
    """Worker context window in tokens, for models LiteLLM does not know."""

    timeout_s: float = Field(default=300.0, gt=0)
    """Timeout of one model call attempt, in seconds."""

    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries of a model call after a transient error (rate limit, 5xx, timeout)."""

    verify_retries: int = Field(default=1, ge=0, le=5)
    """Re-asks, with the reason, of an answer that fails verification before the
    task is split finer."""

    max_calls: int | None = Field(default=None, ge=1)
    """Budget: most model calls the run may send (retries count). None: no limit."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Budget: most prompt plus completion tokens the run may spend."""

    max_cost: float | None = Field(default=None, gt=0)
    """Budget: most US dollars the run may spend. Needs a price for every
    non-local model (LiteLLM's price map, ``price_in``/``price_out`` or the
    router config)."""

    max_time_s: float | None = Field(default=None, gt=0)
    """Budget: wall-clock seconds the run may take; then it stops cleanly."""

    price_in: float | None = Field(default=None, ge=0)
    """USD per million prompt tokens, for every non-local model; overrides
    LiteLLM's price map."""

    price_out: float | None = Field(default=None, ge=0)
    """USD per million completion tokens, for every non-local model."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature for every call."""

    encoding: str = "utf-8"
    """Text encoding of the source files."""

    @field_validator("filter")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value:
            try:
                regex.compile(value)
            except regex.error as exc:
                msg = f"--filter {value!r} is not a valid regular expression: {exc}"
                raise ValueError(msg) from exc
        return value

    @field_validator("sub_question")
    @classmethod
    def _sub_question_said(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            msg = (
                "the sub-question is empty; give --sub-question some words, or "
                "leave it out to let the plan decide"
            )
            raise ValueError(msg)
        return value

    @field_validator("conditions")
    @classmethod
    def _clean_conditions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(" ".join(c.split()) for c in value)
        if any(not c for c in cleaned):
            msg = "a join condition is empty; give each --condition some words"
            raise ValueError(msg)
        if any(len(c) > 200 for c in cleaned):
            msg = "a join condition is longer than 200 characters; shorten it"
            raise ValueError(msg)
        keys = [condition_key(c) for c in cleaned]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                first, condition = cleaned[keys.index(key)], cleaned[index]
                msg = (
                    f"the join conditions {first!r} and {condition!r} are the same (they differ "
                    "at most in case or spacing); give each --condition once"
                )
                raise ValueError(msg)
        return cleaned

    @field_validator("entity")
    @classmethod
    def _named_entity(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            msg = "--entity is empty; give the plural noun a join answer lists ('users'), or drop it"
            raise ValueError(msg)
        return " ".join(value.split()) if value is not None else None

    @field_validator("answer_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            msg = f"the answer schema is not a valid JSON Schema: {exc.message}"
            raise ValueError(msg) from None
        if value.get("type") != "object" or not value.get("properties"):
            msg = 'the answer schema must describe one record: {"type": "object", "properties": {...}}'
            raise ValueError(msg)
        _check_refs(value)
        return value

    @field_validator("model", "worker_model", "judge_model", "api_base")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @property
    def has_openai_key(self) -> bool:
        """Whether the provider's own OPENAI_API_KEY variable is set."""
        return bool(os.environ.get("OPENAI_API_KEY"))

    @property
    def root_model(self) -> str:
        """The model name used for the root role."""
        from rlm_graph.local import DEFAULT_LOCAL_MODEL

        return self.model or DEFAULT_LOCAL_MODEL

    @property
    def leaf_model(self) -> str:
        """The model name used for the worker role."""
        return self.worker_model or self.root_model

    @property
    def judge(self) -> str:
        """Where the judge role routes: ``judge_model``, else the root model (no
        judge call is made unless ``judge_model`` is set)."""
        return self.judge_model or self.root_model

    @property
    def has_budget(self) -> bool:
        """Whether any budget (calls, tokens, cost, time) is set."""
        limits = (self.max_calls, self.max_tokens, self.max_cost, self.max_time_s)
        return any(limit is not None for limit in limits)


def _check_refs(schema: dict[str, Any]) -> None:
    """Every ``$ref`` of a record schema must point inside it, at something there.

    A reference to another document would need a download (runs are offline),
    and a dangling one would only fail once replies come back, after calls
    were paid.

    Raises:
        ValueError: the first reference that points nowhere or outside.
    """
    import referencing.exceptions
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    resource = DRAFT202012.create_resource(schema)
    resolver = Registry().with_resource("urn:rlm-graph:record", resource).resolver(
        base_uri="urn:rlm-graph:record"
    )
    for ref in _refs(schema):
        if not ref.startswith("#"):
            msg = (
                f"the answer schema's $ref {ref!r} points outside the schema; refs "
                "to other documents are not fetched: put the definition under "
                '"$defs" and refer to it as "#/$defs/NAME".'
            )
            raise ValueError(msg)
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            msg = (
                f"the answer schema's $ref {ref!r} points nowhere in the schema; "
                'define it under "$defs".'
            )
            raise ValueError(msg) from None


def _refs(node: Any, *, named: bool = False) -> list[str]:
    """Every ``$ref`` string in a schema, data keywords (enum, const ...) aside.

    Args:
        named: ``node`` maps names to schemas (``properties``, ``$defs`` ...), so
            its keys are names, not keywords.
    """
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    if not isinstance(node, dict):
        return []
    if named:
        return [ref for value in node.values() for ref in _refs(value)]
    found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    for key, value in node.items():
        if key not in _DATA_KEYWORDS:
            found += _refs(value, named=key in _NAMED_KEYWORDS)
    return found


_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "$ref"})
_NAMED_KEYWORDS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
