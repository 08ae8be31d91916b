"""The graph the LangGraph server serves (named in ``integrations/langgraph.json``).

Input: ``{"question": ..., "text": ...}`` or ``{"question": ..., "paths": [...]}``
(paths on the server's machine). Output adds ``answer`` and ``result`` (the
whole :class:`rlm_graph.Result` as JSON data). Models and limits come from the
server's ``RLM_GRAPH_*`` environment variables (``RLM_GRAPH_MODEL``,
``RLM_GRAPH_API_BASE`` ...), read at each run; the server's checkpointer stores
the run's checkpoints and finished model calls.
"""

from __future__ import annotations

from langgraph_rlm_graph.subgraph import build_rlm_graph

__all__ = ["graph"]

graph = build_rlm_graph()
"""The compiled graph the server loads."""
