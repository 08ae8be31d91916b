"""LangGraph integration of rlm-graph: a node for your own graph, and a server graph.

- :func:`rlm_node`: a node that runs rlm-graph from your graph's state (any
  state type), sharing your checkpointer and resuming inside your thread.
- :func:`build_rlm_graph`: a ready graph over :class:`RlmState`.
- ``langgraph_rlm_graph.server:graph``: what ``integrations/langgraph.json``
  hands to the LangGraph CLI's server.
"""

from __future__ import annotations

from langgraph_rlm_graph.subgraph import RlmState, build_rlm_graph, rlm_node

__all__ = ["RlmState", "build_rlm_graph", "rlm_node"]
