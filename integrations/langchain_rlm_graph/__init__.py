"""LangChain integration of rlm-graph: a tool, a runnable and a chat model.

- :class:`RlmGraphTool`: lets any tool-calling agent ask a question over files,
  folders or a text too big for its context.
- :class:`RlmGraphRunnable`: the same as an LCEL runnable returning a
  :class:`rlm_graph.Result`.
- :class:`ChatRlmGraph`: a chat model answering over arbitrarily long messages.

All three report progress to callback handlers as ``rlm_graph_progress``
custom events.
"""

from __future__ import annotations

from langchain_rlm_graph._common import PROGRESS_EVENT, RlmGraphInput
from langchain_rlm_graph.chat_models import ChatRlmGraph
from langchain_rlm_graph.runnables import RlmGraphRunnable
from langchain_rlm_graph.tools import RlmGraphTool

__all__ = [
    "PROGRESS_EVENT",
    "ChatRlmGraph",
    "RlmGraphInput",
    "RlmGraphRunnable",
    "RlmGraphTool",
]
