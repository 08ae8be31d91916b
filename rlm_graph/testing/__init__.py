"""Model doubles for testing pipelines without a real model.

Two doubles answer from a script you write as a *responder*, a function from
the :class:`ModelRequest` received to the :class:`Reply` to act out:

- :class:`ScriptedModel`: an in-process LiteLLM provider, reached as
  ``model="scripted/<anything>"`` (also from a ``litellm.Router`` deployment).
- :class:`FakeOpenAIServer`: an OpenAI-compatible HTTP server on 127.0.0.1,
  reached as ``model="openai/<anything>"`` with ``api_base=server.api_base``.
  Use it to test what only HTTP shows: status codes, headers, stalls.

Both record every request (``requests``, ``calls_per_prompt``, ``in_flight``,
``max_in_flight``) and can enforce a context window. They are doubles: they
never produce a real answer, only what the script says.

Importing this package imports LiteLLM (about 3 s) with
``LITELLM_LOCAL_MODEL_COST_MAP`` and ``LITELLM_OFFLINE_MODE`` set by default.
"""

from __future__ import annotations

from rlm_graph.testing._replies import (
    ModelRequest,
    Reply,
    Responder,
    by_prompt,
    prompt_digest,
    sequence,
)
from rlm_graph.testing._scripted import ScriptedModel
from rlm_graph.testing._server import FakeOpenAIServer

__all__ = [
    "FakeOpenAIServer",
    "ModelRequest",
    "Reply",
    "Responder",
    "ScriptedModel",
    "by_prompt",
    "prompt_digest",
    "sequence",
]
