"""A fake API key never reaches logs, --json output, errors or stored checkpoints."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from click.testing import CliRunner

from rlm_graph.cli import main
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply

from .conftest import list_reply, numbered_paragraphs

KEY = "sk-secret-4f9a1c7e2b-do-not-log"
QUESTION = "List every visitor named in the text."
SEEN: set[str] = set()


@pytest.fixture
def book(tmp_path):
    SEEN.clear()
    path = tmp_path / "book.txt"
    needles = {
        3: "The visitor named Ada arrived.",
        17: "The visitor named Brook arrived.",
    }
    path.write_text(numbered_paragraphs(24, needle_at=needles))
    return path


def flaky_then_clean(request: ModelRequest) -> Reply | str:
    """Every prompt first meets a 429, then a clean answer: retries get logged."""
    if request.prompt not in SEEN:
        SEEN.add(request.prompt)
        return Reply(
            error="rate_limit",
            retry_after="0.05",
            error_message=f"slow down, key {KEY}",
        )
    return list_reply(r"The visitor named (\w+) arrived\.")(request)


def everything_said(result, caplog) -> str:
    records = "\n".join(
        f"{r.getMessage()} {r.args!r} {getattr(r, '__dict__', {})!r}"
        for r in caplog.records
    )
    said = "\n".join([result.stdout, result.stderr, records, repr(result.exception)])
    # Rich wraps log lines at the console width: a key cut in two must still be found.
    return said + "\n" + "".join(said.split())


def stored_bytes(folder) -> bytes:
    """Every file the store wrote (database, WAL, journal)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.startswith("store")]
    assert files, "the run was stored"
    return b"".join(p.read_bytes() for p in files)


def run_cli(*args: str, command: str = "run"):
    extra = ["-q", QUESTION, "--context-window", "4096", "--chunk-tokens", "200"]
    if command == "resume":
        extra = []
    return CliRunner().invoke(main, [command, *args, *extra, "-vv", "--json"])


def test_key_given_by_flag_stays_out_of_logs_json_and_store(book, tmp_path, caplog):
    store = tmp_path / "store.sqlite"
    with FakeOpenAIServer(flaky_then_clean) as server, caplog.at_level(logging.DEBUG):
        result = run_cli(
            str(book), "--model", "openai/fake-model", "--api-base", server.api_base,
            "--api-key", KEY, "--store", str(store), "--max-calls", "6",
        )
        run_id = json.loads(result.stdout)["run_id"]
        resumed = run_cli(run_id, "--store", str(store), "--api-base", server.api_base,
                          "--api-key", KEY, "--max-calls", "100", command="resume")
        assert all(r.api_key == KEY for r in server.requests), "the key was really used"

    assert result.exit_code == 1 and json.loads(result.stdout)["status"] == "stopped"
    assert resumed.exit_code == 0, resumed.output
    assert "retryingin" in "".join(result.stderr.split()), "-vv logged the retries"
    assert KEY not in everything_said(result, caplog) + everything_said(resumed, caplog)
    assert KEY.encode() not in stored_bytes(tmp_path)


def test_key_in_a_router_config_stays_out_of_logs_json_and_store(book, tmp_path, caplog):
    with FakeOpenAIServer(flaky_then_clean) as server, caplog.at_level(logging.DEBUG):
        config = tmp_path / "router.yaml"
        deployment = {
            "model_name": "worker",
            "litellm_params": {
                "model": "openai/fake-model", "api_base": server.api_base, "api_key": KEY,
            },
        }
        config.write_text(yaml.safe_dump({"model_list": [deployment]}))
        result = run_cli(
            str(book), "--router-config", str(config), "--store", str(tmp_path / "store.sqlite")
        )
        assert server.requests and all(r.api_key == KEY for r in server.requests)

    assert result.exit_code == 0, result.output
    assert KEY not in everything_said(result, caplog)
    assert KEY.encode() not in stored_bytes(tmp_path)


def test_rejected_key_error_does_not_repeat_the_key(book, tmp_path, caplog):
    reply = Reply(error="auth", error_message=f"Incorrect API key provided: {KEY}. Bearer {KEY}")
    with FakeOpenAIServer(lambda r: reply) as server, caplog.at_level(logging.DEBUG):
        result = run_cli(
            str(book), "--model", "openai/fake-model", "--api-base", server.api_base,
            "--api-key", KEY, "--store", str(tmp_path / "store.sqlite"),
        )

    assert result.exit_code == 3
    assert "rejected the API key" in result.stderr
    assert KEY not in everything_said(result, caplog)
    assert KEY.encode() not in stored_bytes(tmp_path)
