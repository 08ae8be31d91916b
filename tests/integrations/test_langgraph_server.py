"""The LangGraph CLI's in-memory dev server loads integrations/langgraph.json and serves.

Starts ``langgraph dev`` on 127.0.0.1 in a subprocess (offline: no browser, no
reload, analytics off; without ``--allow-blocking``, so that a blocking call on
the server's event loop fails the run), runs the graph through the LangGraph SDK's HTTP
client, and stops the server by its PID. The served graph's models are the
repo's FakeOpenAIServer double on 127.0.0.1, reached through the server
process's ``RLM_GRAPH_*`` environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlm_graph.store import open_store
from rlm_graph.testing import FakeOpenAIServer

from ..conftest import numbered_paragraphs, text_reply

CONFIG = Path(__file__).parents[2] / "integrations" / "langgraph.json"
NEEDLE = "The secret code word is HELIOTROPE."
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dev_server(tmp_path):
    langgraph = Path(sys.executable).parent / "langgraph"
    if not langgraph.exists() and shutil.which("langgraph") is None:
        pytest.fail(
            "the LangGraph CLI is missing; run scripts/bootstrap (it installs langgraph-cli[inmem])"
        )
    with FakeOpenAIServer(text_reply(r"The secret code word is (\w+)\.")) as models:
        port = _free_port()
        env = {
            **os.environ,
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGSMITH_TRACING": "false",
            "RLM_GRAPH_MODEL": "openai/fake-model",
            "RLM_GRAPH_API_BASE": models.api_base,
            "RLM_GRAPH_API_KEY": "sk-fake",
            "RLM_GRAPH_CONTEXT_WINDOW": "4096",
            "RLM_GRAPH_CHUNK_TOKENS": "200",
        }
        log = (tmp_path / "server.log").open("w")
        process = subprocess.Popen(
            [
                str(langgraph),
                "dev",
                "--config",
                str(CONFIG),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-browser",
                "--no-reload",
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, process, tmp_path / "server.log")
            yield url, models
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            log.close()


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"langgraph dev exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"langgraph dev did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


async def test_dev_server_serves_the_graph_from_langgraph_json(dev_server):
    from langgraph_sdk import get_client

    url, models = dev_server
    client = get_client(url=url)
    assistants = await client.assistants.search(graph_id="rlm-graph")
    assert [a["graph_id"] for a in assistants] == ["rlm-graph"]

    thread = await client.threads.create()
    text = numbered_paragraphs(40, needle_at={27: NEEDLE})
    output = await client.runs.wait(
        thread["thread_id"],
        "rlm-graph",
        input={"question": "What is the secret code word?", "text": text},
    )

    assert output["answer"] == "HELIOTROPE"
    assert output["result"]["citations"][0]["quote"] == NEEDLE
    assert output["result"]["status"] == "done"
    assert len(models.requests) == output["result"]["usage"]["calls"] > 3
    assert all(r.api_key == "sk-fake" for r in models.requests)
    state = await client.threads.get_state(thread["thread_id"])
    assert state["values"]["answer"] == "HELIOTROPE", (
        "the server's checkpointer kept the run's state"
    )
    async with open_store(os.environ["RLM_GRAPH_STORE"], create=False) as store:
        [listed] = await store.list_runs()
    assert listed.run_id == output["result"]["run_id"]
    assert listed.status == "done"
    assert listed.parent is not None
    assert listed.parent["thread_id"] == thread["thread_id"]
