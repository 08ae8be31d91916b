"""Offline token counting and context windows for any model name.

Counting never touches the network. Embedded (``local/...``) models are counted
with their own tokenizer. Every other name is counted with tiktoken's BPE files
bundled inside the LiteLLM wheel (``o200k_base`` for the newer OpenAI families,
``cl100k_base`` otherwise). Models of other vendors tokenize differently, so for
them the count is scaled up by :data:`FOREIGN_TOKENIZER_MARGIN`; the engine also
keeps a safety margin below the window and splits finer on a context error.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "TokenCounter",
    "context_window",
    "ensure_offline_litellm",
    "tiktoken_encoding",
    "token_counter",
    "tokenizer_margin",
]

logger = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]

# A GPT tokenizer undercounts other vendors' tokenizers by up to ~20 % on English
# prose (Llama 3, Mistral, Qwen); the margin keeps planned spans inside the window.
FOREIGN_TOKENIZER_MARGIN = 1.2
DEFAULT_CONTEXT_WINDOW = 8192
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt", "text-embedding", "davinci")


def ensure_offline_litellm() -> None:
    """Make LiteLLM and tiktoken work without network access.

    Sets LiteLLM's switches for its bundled cost map and offline mode, and points
    tiktoken at the BPE files bundled in the LiteLLM wheel, unless the user set
    those variables already. Call before importing litellm or tiktoken.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        spec = importlib.util.find_spec("litellm")
        if spec and spec.origin:
            bundled = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
            os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)


def token_counter(model: str) -> TokenCounter:
    """Return a function counting tokens of a text as ``model`` would, offline.

    Args:
        model: any LiteLLM model name, or ``local/<name or path>``.
    """
    if model.startswith("local/"):
        from rlm_graph.local import register_local_provider

        models = register_local_provider()
        name = model.removeprefix("local/")
        return functools.partial(models.count_tokens, name)

    bare = model.split("/", 1)[-1].lower()
    encoding = tiktoken_encoding("o200k_base" if bare.startswith(_O200K_PREFIXES) else "cl100k_base")
    return functools.partial(_count, encoding, tokenizer_margin(model))


def tokenizer_margin(model: str) -> float:
    """How much :func:`token_counter` scales its count for ``model`` up.

    1.0 for models counted with their own tokenizer (OpenAI's, the embedded
    ones); :data:`FOREIGN_TOKENIZER_MARGIN` for the rest, whose count is a GPT
    tokenizer's plus a safety margin for fitting windows.
    """
    if model.startswith("local/"):
        return 1.0
    bare = model.split("/", 1)[-1].lower()
    is_openai = model.startswith(("openai/", "azure/")) or "/" not in model
    if is_openai and bare.startswith(_OPENAI_PREFIXES):
        return 1.0
    return FOREIGN_TOKENIZER_MARGIN


def context_window(model: str, override: int | None = None) -> int:
    """Return the model's input window in tokens.

    Args:
        model: a LiteLLM model name or ``local/...``.
        override: the user's ``--context-window``; wins when given.
    """
    if override:
        return override
    if model.startswith("local/"):
        from rlm_graph.local import register_local_provider

        return register_local_provider().context_window(model.removeprefix("local/"))

    ensure_offline_litellm()
    import litellm

    try:
        info = litellm.get_model_info(model)
    except Exception:  # litellm raises a bare Exception for unmapped models
        logger.warning(
            "context window of %s is unknown; assuming %d tokens (set --context-window)",
            model, DEFAULT_CONTEXT_WINDOW,
        )
        return DEFAULT_CONTEXT_WINDOW
    return int(info.get("max_input_tokens") or info.get("max_tokens") or DEFAULT_CONTEXT_WINDOW)


@functools.cache
def tiktoken_encoding(name: str) -> Any:
    """Return a tiktoken encoding loaded offline from LiteLLM's bundled files."""
    ensure_offline_litellm()
    import tiktoken

    return tiktoken.get_encoding(name)


def _count(encoding: object, margin: float, text: str) -> int:
    tokens = len(encoding.encode(text, disallowed_special=()))  # type: ignore[attr-defined]
    return int(tokens * margin + 0.999) if margin != 1.0 else tokens
