"""The ``rlm/`` provider inside a real LiteLLM proxy (``litellm --config``).

The test starts the proxy on 127.0.0.1 in a subprocess with the provider
registered through the config's ``custom_provider_map``, asks it with the
OpenAI SDK over HTTP, and stops it by its PID. The runs' worker calls go to the
repo's FakeOpenAIServer double on 127.0.0.1, named by the proxy process's
``RLM_GRAPH_*`` environment. The proxy starts offline: LiteLLM's price map is
the copy it ships (``LITELLM_LOCAL_MODEL_COST_MAP``), and no database is used.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlm_graph.testing import FakeOpenAIServer

from ..conftest import numbered_paragraphs, text_reply

QUESTION = "What is the secret code word?"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
CONFIG = """\
general_settings:
  master_key: {key}
litellm_settings:
  custom_provider_map:
    - {{"provider": "rlm", "custom_handler": litellm_rlm_graph.provider.rlm_provider}}
model_list:
  - model_name: long-reader
    litellm_params: {{model: rlm/openai/fake-model}}
  - model_name: "rlm/*"
    litellm_params: {{model: "rlm/*"}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A running LiteLLM proxy: (base URL, master key, the worker model double)."""
    folder = tmp_path_factory.mktemp("proxy")
    binary = Path(sys.executable).parent / "litellm"
    if not binary.exists():
        pytest.fail("the LiteLLM CLI is missing; run scripts/bootstrap")
    key = f"sk-{secrets.token_hex(16)}"
    config = folder / "proxy.yaml"
    config.write_text(CONFIG.format(key=key), encoding="utf-8")

    with FakeOpenAIServer(text_reply(r"The secret code word is (\w+)\.")) as models:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RLM_GRAPH_")},
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_OFFLINE_MODE": "true",
            "RLM_GRAPH_API_BASE": models.api_base,
            "RLM_GRAPH_API_KEY": "sk-fake",
            "RLM_GRAPH_CONTEXT_WINDOW": "4096",
            "RLM_GRAPH_CHUNK_TOKENS": "200",
            "RLM_GRAPH_PLANNER": "rules",
            "RLM_GRAPH_STORE": str(folder / "store.sqlite"),
        }
        port = _free_port()
        log_path = folder / "proxy.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    str(binary),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_until_up(url, process, log_path)
                yield f"{url}/v1", key, models
            finally:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    def tail() -> str:
        return log.read_text()[-3000:]

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the proxy exited with {process.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the proxy did not answer within {START_TIMEOUT_S} s:\n{tail()}")


def _messages(word: str, at: int) -> list[dict[str, str]]:
    text = numbered_paragraphs(40, needle_at={at: f"The secret code word is {word}."})
    return [{"role": "system", "content": text}, {"role": "user", "content": QUESTION}]


def test_proxy_model_alias_answers_recursively_with_usage(proxy):
    import openai

    url, key, models = proxy
    models.reset()
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)

    response = client.chat.completions.create(
        model="long-reader", messages=_messages("HELIOTROPE", 27)
    )

    assert response.choices[0].message.content.startswith("HELIOTROPE")
    assert "The secret code word is HELIOTROPE." in response.choices[0].message.content
    assert len(models.requests) > 1, "the answer came from a recursive run"
    assert {r.model for r in models.requests} == {"fake-model"}
    assert response.usage.prompt_tokens == sum(r.prompt_tokens for r in models.requests)
    assert response.usage.completion_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_proxy_passes_any_rlm_model_name_and_streams_usage(proxy):
    import openai

    url, key, models = proxy
    models.reset()
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)

    chunks = list(
        client.chat.completions.create(
            model="rlm/openai/fake-model",
            messages=_messages("MARIGOLD", 6),
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.startswith("MARIGOLD")
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(models.requests) > 1
    assert usage and usage[-1].prompt_tokens == sum(
        r.prompt_tokens for r in models.requests
    )


def test_proxy_refuses_a_wrong_key_before_any_model_call(proxy):
    import openai

    url, _, models = proxy
    models.reset()
    client = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0, timeout=60)

    # Without a database the proxy answers 400 "No connected db" rather than
    # 401 (it would look the key up among virtual keys); refused either way.
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="long-reader", messages=_messages("X", 1))
    assert refused.value.status_code in (400, 401)
    assert models.requests == []
