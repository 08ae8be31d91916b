"""A LiteLLM proxy serves rlm-graph; any OpenAI client asks it over HTTP.

Run from the repository root: ``.venv/bin/python examples/litellm_proxy.py``.
It starts ``litellm --config`` on 127.0.0.1 with the ``rlm/`` provider named in
the config, asks it with the OpenAI SDK, and stops it. The worker model is
``RLM_GRAPH_WORKER_MODEL`` or ``RLM_GRAPH_MODEL`` (default: the embedded model),
read by the proxy process like every ``RLM_GRAPH_*`` setting. The proxy's server
packages come with the ``dev`` extra (``scripts/bootstrap`` installs them).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from rlm_graph import RunConfig

BOOK = Path(__file__).with_name("alice_in_wonderland.txt")
QUESTION = "What were the names of the three sisters in the Dormouse's story?"
CONFIG = """\
general_settings:
  master_key: {key}
litellm_settings:
  custom_provider_map:
    - {{"provider": "rlm", "custom_handler": litellm_rlm_graph.provider.rlm_provider}}
model_list:
  - model_name: "rlm/*"
    litellm_params: {{model: "rlm/*"}}
"""


def main() -> None:
    key = f"sk-{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "proxy.yaml"
        config.write_text(CONFIG.format(key=key), encoding="utf-8")
        port = free_port()
        env = {
            **os.environ,
            # Offline: LiteLLM's shipped price map, not a download at start-up.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_OFFLINE_MODE": "true",
            "RLM_GRAPH_FILTER": "sisters",
        }
        proxy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("litellm")),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, proxy)
            ask(f"{url}/v1", key)
        finally:
            proxy.terminate()
            proxy.wait(30)


def ask(base_url: str, key: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=key, timeout=600)
    response = client.chat.completions.create(
        model=f"rlm/{RunConfig().leaf_model}",
        messages=[
            {"role": "system", "content": BOOK.read_text(encoding="utf-8")},
            {"role": "user", "content": QUESTION},
        ],
    )

    print(response.choices[0].message.content)
    usage = response.usage
    print(f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(
    url: str, proxy: subprocess.Popen[bytes], timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            sys.exit(f"the LiteLLM proxy exited with {proxy.returncode}")
        try:
            if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"the LiteLLM proxy did not start within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
