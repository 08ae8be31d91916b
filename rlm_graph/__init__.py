"""rlm-graph: answer questions over inputs far larger than a model's window.

A recursive language model splits the source into spans, gives each span a
focused sub-question in a fresh model call, verifies what comes back, and merges
the answers, as a LangGraph state machine whose every model call goes through
LiteLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm_graph.errors import (
        BudgetExceeded,
        ConfigError,
        ContextWindowError,
        ModelCallError,
        ResumeMismatchError,
        RlmGraphError,
        RunBusyError,
        SourceError,
        StoreError,
    )
    from rlm_graph.result import Citation, Failure, Joined, Result, TaskNode, Usage
    from rlm_graph.config import RunConfig
    from rlm_graph.api import aresume, arun, resume, run

__all__ = [
    "BudgetExceeded",
    "Citation",
    "ConfigError",
    "ContextWindowError",
    "Failure",
    "Joined",
    "ModelCallError",
    "Result",
    "ResumeMismatchError",
    "RlmGraphError",
    "RunBusyError",
    "RunConfig",
    "SourceError",
    "StoreError",
    "TaskNode",
    "Usage",
    "aresume",
    "arun",
    "resume",
    "run",
]

# Imported on first use: `rlm-graph --help` and a Ctrl-C during start-up must
# not wait for LangGraph and LiteLLM to load.
_WHERE = {
    "BudgetExceeded": "rlm_graph.errors",
    "Citation": "rlm_graph.result",
    "ConfigError": "rlm_graph.errors",
    "ContextWindowError": "rlm_graph.errors",
    "Failure": "rlm_graph.result",
    "Joined": "rlm_graph.result",
    "ModelCallError": "rlm_graph.errors",
    "Result": "rlm_graph.result",
    "ResumeMismatchError": "rlm_graph.errors",
    "RlmGraphError": "rlm_graph.errors",
    "RunBusyError": "rlm_graph.errors",
    "RunConfig": "rlm_graph.config",
    "SourceError": "rlm_graph.errors",
    "StoreError": "rlm_graph.errors",
    "TaskNode": "rlm_graph.result",
    "Usage": "rlm_graph.result",
    "aresume": "rlm_graph.api",
    "arun": "rlm_graph.api",
    "resume": "rlm_graph.api",
    "run": "rlm_graph.api",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        msg = f"module 'rlm_graph' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
