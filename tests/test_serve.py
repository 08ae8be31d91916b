"""``rlm-graph serve``: the OpenAI-compatible endpoint, through real HTTP clients.

Inner model calls go to the repo's doubles: ScriptedModel in-process, and
FakeOpenAIServer on 127.0.0.1 for the CLI test, whose server runs in a
subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlm_graph import ConfigError, RunConfig
from rlm_graph.serve import ServeSettings, create_app, serve_in_thread
from rlm_graph.testing import FakeOpenAIServer, Reply

from .conftest import numbered_paragraphs, text_reply

NEEDLE = "The secret code word is HELIOTROPE."
QUESTION = "What is the secret code word?"
CONFIG = RunConfig(model="scripted/m", context_window=4096, chunk_tokens=200)
TOKEN = "serve-token-5b1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def chat(text: str, **extra: object) -> dict[str, object]:
    return {
        "model": "rlm/scripted/m",
        "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": QUESTION},
        ],
        **extra,
    }


@pytest.fixture
def server(scripted):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    settings = ServeSettings(port=0, token=TOKEN, max_request_bytes=64 * 1024)
    with serve_in_thread(CONFIG, settings) as url:
        yield url, double


def test_openai_client_gets_a_cited_answer_with_usage(server):
    import openai

    url, double = server
    client = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0)
    text = numbered_paragraphs(40, needle_at={27: NEEDLE})

    models = client.models.list()
    response = client.chat.completions.create(**chat(text))

    assert [m.id for m in models.data] == ["rlm/scripted/m"]
    assert response.choices[0].message.content.startswith("HELIOTROPE")
    assert response.usage.prompt_tokens == sum(r.prompt_tokens for r in double.requests)
    extension = response.model_extra["rlm_graph"]
    assert extension["status"] == "done"
    assert extension["citations"][0]["quote"] == NEEDLE


def test_streaming_sends_openai_chunks_then_done(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0)
    text = numbered_paragraphs(40, needle_at={27: NEEDLE})

    chunks = list(
        client.chat.completions.create(
            **chat(text, stream=True, stream_options={"include_usage": True})
        )
    )

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.startswith("HELIOTROPE")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "fragment"),
    [
        ("POST", "/chat/completions", chat("x\n\ny"), {}, 401, "bearer token"),
        (
            "POST",
            "/chat/completions",
            chat("x"),
            {"Authorization": "Bearer wrong"},
            401,
            "bearer token",
        ),
        ("POST", "/chat/completions", b"{not json", AUTH, 400, "not valid JSON"),
        (
            "POST",
            "/chat/completions",
            {"model": "rlm/scripted/m", "messages": []},
            AUTH,
            400,
            "'messages'",
        ),
        (
            "POST",
            "/chat/completions",
            {"messages": [{"role": "user", "content": "q"}]},
            AUTH,
            400,
            "'model'",
        ),
        (
            "POST",
            "/chat/completions",
            {**chat("x"), "model": "gpt-4o"},
            AUTH,
            404,
            "not served here",
        ),
        (
            "POST",
            "/chat/completions",
            {
                "model": "rlm/scripted/m",
                "messages": [{"role": "user", "content": QUESTION}],
            },
            AUTH,
            400,
            "Nothing to read besides the question",
        ),
        (
            "POST",
            "/chat/completions",
            {
                "model": "rlm/scripted/m",
                "messages": [{"role": "wizard", "content": "q"}],
            },
            AUTH,
            400,
            "messages.0.role",
        ),
        (
            "POST",
            "/chat/completions",
            chat("x" * 70_000),
            AUTH,
            413,
            "limit of 65,536 bytes",
        ),
        ("GET", "/chat/completions", None, AUTH, 405, "allowed: POST"),
        ("GET", "/nowhere", None, AUTH, 404, "No such endpoint"),
    ],
)
def test_bad_requests_get_clear_json_4xx_errors(
    server, method, path, body, headers, status, fragment
):
    url, double = server
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) or body is None else body

    response = httpx.request(
        method, url + path, json=payload, content=content, headers=headers, timeout=30
    )

    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] in {"invalid_request_error", "authentication_error"}
    assert double.requests == []


def test_keys_and_tokens_never_reach_responses_or_logs(scripted, caplog):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    config = RunConfig(
        model="scripted/m",
        context_window=4096,
        chunk_tokens=200,
        api_key="sk-secret-api-key-77",
    )
    caplog.set_level(logging.DEBUG)
    with serve_in_thread(config, ServeSettings(port=0, token=TOKEN)) as url:
        ok = httpx.post(
            url + "/chat/completions",
            json=chat(numbered_paragraphs(20)),
            headers=AUTH,
            timeout=60,
        )
        denied = httpx.post(
            url + "/chat/completions",
            json=chat("a"),
            headers={"Authorization": "Bearer nope"},
        )

    assert ok.status_code == 200 and denied.status_code == 401
    for text in (ok.text, denied.text, caplog.text):
        assert "sk-secret-api-key-77" not in text
        assert TOKEN not in text


def test_other_hosts_need_a_token():
    with pytest.raises(ConfigError, match="without a token"):
        create_app(CONFIG, ServeSettings(host="0.0.0.0"))
    assert create_app(CONFIG, ServeSettings(host="0.0.0.0", token="t")) is not None
    assert create_app(CONFIG, ServeSettings(host="::1")) is not None


def test_cli_serve_answers_and_stops_on_ctrl_c(tmp_path):
    with FakeOpenAIServer(text_reply(r"The secret code word is (\w+)\.")) as models:
        env = {**os.environ, "RLM_GRAPH_SERVE_TOKEN": TOKEN}
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "rlm-graph"),
                "serve",
                "--port",
                "0",
                "--model",
                "openai/fake-model",
                "--api-base",
                models.api_base,
                "--api-key",
                "sk-fake",
                "--context-window",
                "4096",
                "--chunk-tokens",
                "200",
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            # As an interactive shell starts it: Ctrl-C not ignored, even if an
            # earlier test left SIGINT ignored in this process (children inherit that).
            preexec_fn=_default_sigint,
        )
        try:
            url = _announced_url(process)
            response = httpx.post(
                url + "/chat/completions",
                headers=AUTH,
                timeout=60,
                json={
                    **chat(numbered_paragraphs(30, needle_at={7: NEEDLE})),
                    "model": "rlm/openai/fake-model",
                },
            )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"].startswith(
                "HELIOTROPE"
            )
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
    assert process.returncode == 0
    assert "stopped." in process.stderr.read()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _announced_url(process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        found = re.search(r"at (http://\S+/v1)", line)
        if found:
            return found.group(1)
        if process.poll() is not None:
            break
    pytest.fail(f"rlm-graph serve did not announce its URL: {json.dumps(lines)}")


def _slow(responder, latency_s: float):
    def respond(request):
        reply = responder(request)
        return Reply(
            content=reply if isinstance(reply, str) else reply.content,
            latency_s=latency_s,
        )

    return respond


def _raw_post(url: str, body: dict[str, object]) -> socket.socket:
    """Send a chat request on a socket of its own and leave it open, unread."""
    parsed = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parsed.path}/chat/completions HTTP/1.1\r\n"
        f"Host: {parsed.host}:{parsed.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((parsed.host, parsed.port), timeout=10)
    sock.sendall(head + payload)
    return sock


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_its_run_and_keeps_its_calls(
    scripted, tmp_path, stream
):
    double = scripted(_slow(text_reply(r"The secret code word is (\w+)\."), 0.1))
    store = str(tmp_path / "serve.sqlite")
    config = RunConfig(
        model="scripted/m", context_window=4096, chunk_tokens=200, concurrency=1
    )
    body = chat(numbered_paragraphs(40, needle_at={27: NEEDLE}), stream=stream)
    with serve_in_thread(
        config, ServeSettings(port=0, token=TOKEN, store=store)
    ) as url:
        sock = _raw_post(url, body)
        _wait_for(lambda: len(double.requests) >= 4, 60, "the run's first calls")
        sock.close()
        cut_at = time.monotonic()
        _wait_for(lambda: double.in_flight == 0, 10, "the run to stop")
        stopped_after_s = time.monotonic() - cut_at
        sent_before = len(double.requests)
        time.sleep(1.0)  # ten call latencies: a run going on would send more
        sent_while_gone = len(double.requests) - sent_before
        runs = _cli_json("runs", "--store", store)
        double.reset()

        again = httpx.post(
            url + "/chat/completions",
            json=chat(body["messages"][0]["content"]),
            headers=AUTH,
            timeout=120,
        )

    assert stopped_after_s < 2.0, stopped_after_s
    assert sent_while_gone == 0
    assert [r["status"] for r in runs] == ["interrupted"]
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"].startswith("HELIOTROPE")
    usage = again.json()["rlm_graph"]
    # Every call the cut run finished answers from the call log; at most the
    # one in flight when the client left is sent again.
    assert usage["calls"] == len(double.requests)
    reused = [r for r in _cli_json("runs", "--store", store) if r["status"] == "done"]
    assert len(reused) == 1
    shown = _cli_json("show", reused[0]["run_id"], "--store", store)
    assert shown["result"]["usage"]["cached_calls"] >= sent_before - 1


def _cli_json(*args: str) -> object:
    from click.testing import CliRunner

    from rlm_graph.cli import main

    done = CliRunner().invoke(main, [*args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def test_a_large_source_is_read_off_the_event_loop(scripted, tmp_path):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    # About 8 MB: reading, counting and cutting it takes seconds of CPU.
    paragraph_chars = len(numbered_paragraphs(1))
    count = 8_000_000 // paragraph_chars
    text = numbered_paragraphs(count, needle_at={count // 2: NEEDLE})
    # The filter leaves one span to read: what is measured is the source's
    # reading and cutting, not the per-call work of hundreds of leaves.
    config = RunConfig(
        model="scripted/m",
        context_window=8192,
        chunk_tokens=2000,
        filter="secret code",
    )
    settings = ServeSettings(
        port=0,
        token=TOKEN,
        max_request_bytes=32 * 1024 * 1024,
        store=str(tmp_path / "serve.sqlite"),
    )
    with serve_in_thread(config, settings) as url:
        httpx.get(url + "/models", headers=AUTH, timeout=30)
        sock = _raw_post(url, chat(text))
        answered: list[float] = []
        try:
            while not double.requests:
                started = time.monotonic()
                # A loop busy with the source would hold this for seconds.
                listed = httpx.get(url + "/models", headers=AUTH, timeout=2.0)
                assert listed.status_code == 200
                answered.append(time.monotonic() - started)
        finally:
            sock.close()

    assert len(answered) >= 3, "the request's source took time to prepare"
    print(
        f"/v1/models while an 8 MB source was prepared: {len(answered)} answers, "
        f"slowest {max(answered):.2f} s"
    )


def test_cli_serve_takes_router_config_and_a_budget_per_request(tmp_path):
    import yaml

    with FakeOpenAIServer(text_reply(r"The secret code word is (\w+)\.")) as models:
        router = tmp_path / "router.yaml"
        router.write_text(
            yaml.safe_dump(
                {
                    "model_list": [
                        {
                            "model_name": "readers",
                            "litellm_params": {
                                "model": "openai/fake-model",
                                "api_base": models.api_base,
                                "api_key": "sk-fake",
                            },
                            "model_info": {"max_input_tokens": 4096},
                        }
                    ],
                    "roles": {"root": "readers", "worker": "readers"},
                }
            )
        )
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "rlm-graph"),
                "serve",
                "--port",
                "0",
                "--router-config",
                str(router),
                "--chunk-tokens",
                "200",
                "--max-calls",
                "3",
                "--store",
                str(tmp_path / "serve.sqlite"),
            ],
            env={**os.environ, "RLM_GRAPH_SERVE_TOKEN": TOKEN},
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        try:
            url = _announced_url(process)
            listed = httpx.get(url + "/models", headers=AUTH, timeout=30).json()
            body = {
                **chat(numbered_paragraphs(30, needle_at={25: NEEDLE})),
                "model": "rlm/readers",
            }
            replies = [
                httpx.post(
                    url + "/chat/completions", headers=AUTH, json=body, timeout=120
                )
                for _ in range(2)
            ]
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)

    assert [m["id"] for m in listed["data"]] == ["rlm/readers"]
    first, second = (r.json() for r in replies)
    assert first["rlm_graph"]["status"] == "stopped"
    assert first["rlm_graph"]["calls"] == 3, "the budget applies to the request's run"
    assert "the run stopped" in first["choices"][0]["message"]["content"]
    # A budget per request, not per server: the second run may spend 3 calls
    # again (calls the first one made are answered from the call log).
    assert second["rlm_graph"]["status"] == "stopped"
    assert len(models.requests) == 6


def test_cli_serve_refuses_unusable_settings_before_listening():
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "rlm-graph"),
            "serve",
            "--port",
            "0",
            "--model",
            "openai/not-a-priced-model",
            "--max-cost",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "--max-cost needs prices" in done.stderr
