"""rlm-graph: answer questions over inputs far larger than a model's window.

A recursive language model splits the source into spans, gives each span a
focused sub-question in a fresh model call, verifies what comes back, and merges
the answers, as a LangGraph state machine whose every model call goes through
LiteLLM.
"""

from __future__ import annotations

from rlm_graph.api import aresume, arun, resume, run
from rlm_graph.config import RunConfig
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
from rlm_graph.result import Citation, Failure, Result, TaskNode, Usage

__all__ = [
    "BudgetExceeded",
    "Citation",
    "ConfigError",
    "ContextWindowError",
    "Failure",
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

__version__ = "0.1.0"
