"""The command line, driven in-process through click's runner."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from rlm_graph.cli import main

from .conftest import numbered_paragraphs, text_reply

SCRIPTED = ["--model", "scripted/m", "--context-window", "4096", "--chunk-tokens", "200"]


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(numbered_paragraphs(40, needle_at={31: "The secret code word is MARIGOLD."}))
    return path


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def test_json_output_has_the_documented_fields(scripted, book):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    result = invoke("run", str(book), "--question", "What is the secret code word?", "--json", *SCRIPTED)

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "done" and data["answer"] == "MARIGOLD"
    assert data["run_id"].startswith("run-")
    citation = data["citations"][0]
    assert set(citation) >= {"source", "start", "end", "quote"}
    assert book.read_text()[citation["start"] : citation["end"]] == citation["quote"]
    assert set(data["usage"]) >= {"calls", "prompt_tokens", "completion_tokens", "cost_usd"}
    tree = data["tree"]
    assert set(tree) >= {"start", "end", "depth", "question", "answer", "verdict", "children"}
    assert tree["children"]


def test_human_output_shows_answer_citation_and_usage(scripted, book):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    result = invoke("run", str(book), "-q", "What is the secret code word?", *SCRIPTED)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "MARIGOLD"
    assert f"{book}:" in result.stdout and "The secret code word is MARIGOLD." in result.stdout
    assert "calls" in result.stdout and "tokens" in result.stdout


def test_stdin_source(scripted):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(10, needle_at={3: "The secret code word is TULIP."})
    result = invoke("run", "-", "-q", "What is the secret code word?", "--json", *SCRIPTED, input=text)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == "TULIP"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.txt"], "No such file or directory: 'missing.txt'"),
        (["{empty}"], "is empty"),
        (["{binary}"], "looks binary"),
        (["{latin}"], "--encoding"),
        (["{emptydir}"], "holds no text files"),
        (["{book}", "--model", "gpt4o-typo"], "Unknown model 'gpt4o-typo'"),
        (["{book}", "--model", "local/./nowhere.gguf"], "No GGUF model"),
        (["{book}", "--max-depth", "0"], "max_depth"),
    ],
    ids=["missing", "empty", "binary", "bad-utf8", "empty-dir", "unknown-model", "missing-gguf", "bad-depth"],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, book, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    (tmp_path / "emptydir").mkdir()
    paths = {
        "{empty}": "empty.txt", "{binary}": "binary.dat", "{latin}": "latin.txt",
        "{emptydir}": "emptydir", "{book}": str(book),
    }
    argv = ["run", *[paths.get(a, a) for a in args], "-q", "What?"]
    result = invoke(*argv)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_api_base_is_a_clear_error(book):
    port = _free_port()
    result = invoke(
        "run", str(book), "-q", "What?", "--model", "openai/m", "--api-base",
        f"http://127.0.0.1:{port}/v1", "--api-key", "sk-test-not-real", "--context-window", "4096",
        "--timeout", "5",
    )
    assert result.exit_code == 3, result.output
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output
    assert "sk-test-not-real" not in result.output


def test_verbose_logs_never_reach_stdout_with_json(scripted, book):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    result = invoke("run", str(book), "-q", "What is the secret code word?", "--json", "-vv", *SCRIPTED)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == "MARIGOLD"


def test_log_lines_from_litellm_have_keys_masked():
    import logging

    from rlm_graph.cli import _RedactSecrets

    _RedactSecrets.known.add("flag-key-12345")
    record = logging.LogRecord(
        "LiteLLM", logging.INFO, __file__, 1,
        "Exception: Incorrect API key provided: sk-secret-XYZ; Bearer tok123456; %s", ("flag-key-12345",), None,
    )
    _RedactSecrets().filter(record)
    line = record.getMessage()
    assert "sk-secret-XYZ" not in line and "tok123456" not in line and "flag-key-12345" not in line
    assert "API key provided: ***" in line
