"""rlm-graph as a LiteLLM provider: ``litellm.completion(model="rlm/<worker model>")``.

Call :func:`register` once; see :mod:`litellm_rlm_graph.provider` for how a
conversation becomes a run and for the LiteLLM proxy configuration.
"""

from __future__ import annotations

from litellm_rlm_graph.provider import (
    PROVIDER,
    RlmGraphProvider,
    register,
    rlm_provider,
)

__all__ = ["PROVIDER", "RlmGraphProvider", "register", "rlm_provider"]
