"""The ``rlm-graph`` command line: argument parsing, progress display, exit codes.

It calls the public API and adds nothing the library lacks. Heavy imports
(LiteLLM takes seconds) happen inside the commands, so ``--help`` is instant.

Exit codes: 0 answered; 1 answered in part (some tasks failed); 2 bad input or
configuration; 3 the models could not be used, or no part could be answered;
130 interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

__all__ = ["main"]

EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rlm-graph")
def main() -> None:
    """Answer questions over inputs far larger than a model's context window."""


@main.command("run")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-q", "--question", required=True, help="The question to answer.")
@click.option("--model", help="Root model: any LiteLLM name (default: the embedded model).")
@click.option("--worker-model", help="Model for leaf calls (default: --model).")
@click.option("--api-base", help="Base URL of an OpenAI-compatible, Ollama or vLLM server.")
@click.option("--api-key", envvar="RLM_GRAPH_API_KEY", help="Key for --api-base (or RLM_GRAPH_API_KEY).")
@click.option("--max-depth", type=int, help="Deepest recursion level (default 4).")
@click.option("--chunk-tokens", type=int, help="Largest span a leaf call reads, in tokens.")
@click.option("--overlap-tokens", type=int, help="Tokens shared by neighbouring spans.")
@click.option("--concurrency", type=int, help="Most model calls in flight at once (default 8).")
@click.option("--fan-out", type=int, help="Most child spans one split makes (default 8).")
@click.option("--fan-in", type=int, help="Most answers one free-text merge call reads (default 8).")
@click.option("--kind", type=click.Choice(["auto", "text", "list", "count"]), help="Answer kind.")
@click.option("--filter", help="Regex: skip parts of the source with no match, unread.")
@click.option("--context-window", type=int, help="Worker window in tokens, for unknown models.")
@click.option("--max-output-tokens", type=int, help="Output tokens reserved per call.")
@click.option("--timeout", "timeout_s", type=float, help="Seconds per model call attempt.")
@click.option("--encoding", help="Encoding of the source files (default utf-8).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: milestones and retries; -vv: every call.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(
    sources: tuple[str, ...], question: str, as_json: bool, verbose: int, debug: bool,
    **options: Any,
) -> None:
    """Answer QUESTION over SOURCE files, directories or '-' (stdin)."""
    _configure_logging(verbose, debug)
    settings = {key: value for key, value in options.items() if value is not None}
    with _errors_to_exit_codes(debug):
        from rlm_graph.api import execute, prepare
        from rlm_graph.result import Result

        progress = _Progress(enabled=sys.stderr.isatty())
        from rlm_graph.source import decode_bytes

        stdin_text = None
        if "-" in sources:
            stdin_text = decode_bytes(sys.stdin.buffer.read(), "<stdin>", options.get("encoding") or "utf-8")
        engine = prepare(question, list(sources), stdin_text=stdin_text, on_event=progress.on_event, **settings)
        progress.start(engine)
        try:
            result: Result = _await(execute(engine))
        finally:
            progress.stop()

    if as_json:
        click.echo(json.dumps(result.model_dump(mode="json"), ensure_ascii=False, indent=2))
    else:
        _print_human(result)
    if result.status == "failed":
        sys.exit(EXIT_MODEL)
    if result.status != "done":
        sys.exit(EXIT_PARTIAL)


def _await(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


class _errors_to_exit_codes:
    """Turn library errors into one line on stderr and a documented exit code."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        from rlm_graph.errors import ConfigError, RlmGraphError, SourceError

        if isinstance(exc, KeyboardInterrupt):
            click.echo("interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if not isinstance(exc, RlmGraphError) or self.debug:
            return False
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE if isinstance(exc, ConfigError | SourceError) else EXIT_MODEL)


class _Progress:
    """A live line on stderr: tasks, depth, calls and tokens (rich)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.started = self.done = self.calls = self.cached = self.tokens = 0
        self.depth = 0
        self._live: Any = None
        self._t0 = time.monotonic()

    def start(self, engine: Any) -> None:
        plan = engine.plan
        click.echo(
            f"rlm-graph: {engine.source.describe()}, {plan.source_tokens:,} tokens; "
            f"{plan.kind} answer; leaves of up to {plan.leaf_tokens:,} tokens; "
            f"worker {engine.client.models['worker']}",
            err=True,
        )
        if not self.enabled:
            return
        from rich.console import Console
        from rich.live import Live

        self._live = Live(self._render(), console=Console(stderr=True), refresh_per_second=4, transient=True)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def on_event(self, event: Any) -> None:
        if event.kind == "task_started":
            self.started += 1
            self.depth = max(self.depth, event.depth)
        elif event.kind == "task_done":
            self.done += 1
        elif event.kind == "call_done":
            self.calls += 1
            self.cached += 1 if event.data.get("cached") else 0
            self.tokens += event.data.get("prompt_tokens", 0) + event.data.get("completion_tokens", 0)
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Any:
        from rich.text import Text

        elapsed = time.monotonic() - self._t0
        return Text(
            f"⠿ tasks {self.done}/{self.started} done · depth {self.depth} · "
            f"calls {self.calls} ({self.cached} cached) · {self.tokens:,} tokens · {elapsed:.0f}s",
            style="cyan",
        )


def _print_human(result: Any) -> None:
    if result.kind == "list":
        answer = "\n".join(f"- {item}" for item in result.answer or []) or "(nothing found)"
    elif not result.found and result.kind == "text":
        answer = "(no part of the source answered the question)"
    else:
        answer = str(result.answer)
    click.echo(answer)
    if result.citations:
        click.echo("\nCitations:")
        for citation in result.citations[:20]:
            quote = " ".join(citation.quote.split())
            click.echo(f"  {citation.source}:{citation.line}  \"{quote[:160]}\"")
        if len(result.citations) > 20:
            click.echo(f"  ... and {len(result.citations) - 20} more (see --json)")
    for failure in result.failures[:10]:
        click.echo(f"warning: part {failure.task_id} of {failure.source} was not answered: {failure.reason}", err=True)
    if result.status != "done":
        click.echo(f"note: this answer is {result.status}; {len(result.failures)} part(s) failed.", err=True)
    usage = result.usage
    cost = f"${usage.cost_usd:.4f}" if usage.cost_known else f"${usage.cost_usd:.4f} (some prices unknown)"
    click.echo(
        f"\n[{result.run_id} · {result.status} · {usage.calls} calls"
        f"{f' ({usage.cached_calls} cached)' if usage.cached_calls else ''} · "
        f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion tokens · "
        f"{cost} · {result.elapsed_s:.1f}s]",
    )


def _configure_logging(verbose: int, debug: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from rlm_graph.tokens import ensure_offline_litellm

    # Import LiteLLM now, so that the handlers it installs at import are there
    # to be replaced below.
    ensure_offline_litellm()
    import litellm

    litellm.suppress_debug_info = True

    level = logging.DEBUG if verbose >= 2 or debug else logging.INFO if verbose == 1 else logging.WARNING
    # Logs go to stderr: stdout carries only the answer (or the --json object).
    handler = RichHandler(
        console=Console(stderr=True), show_path=False, show_time=verbose >= 2, markup=False
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("rlm_graph").setLevel(level)
    for noisy in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "litellm"):
        other = logging.getLogger(noisy)
        other.setLevel(logging.ERROR if verbose < 2 else logging.INFO)
        # LiteLLM attaches its own handlers, which write to stdout: route its
        # records through ours (stderr) instead.
        other.handlers.clear()
        other.propagate = True


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; not loopback needs --token.")
@click.option("--port", default=8765, show_default=True, type=int, help="TCP port (0: any free port).")
@click.option("--token", envvar="RLM_GRAPH_SERVE_TOKEN", help="Bearer token clients must send (or RLM_GRAPH_SERVE_TOKEN).")
@click.option("--max-request-mb", default=16.0, show_default=True, type=float, help="Largest request body, in MB.")
@click.option("--max-runs", default=2, show_default=True, type=int, help="Runs at once; more requests wait.")
@click.option("--model", help="Root model: any LiteLLM name (default: the embedded model).")
@click.option("--worker-model", help="Model for leaf calls (default: --model).")
@click.option("--api-base", help="Base URL of an OpenAI-compatible, Ollama or vLLM server.")
@click.option("--api-key", envvar="RLM_GRAPH_API_KEY", help="Key for --api-base (or RLM_GRAPH_API_KEY).")
@click.option("--context-window", type=int, help="Worker window in tokens, for unknown models.")
@click.option("--chunk-tokens", type=int, help="Largest span a leaf call reads, in tokens.")
@click.option("--concurrency", type=int, help="Most model calls in flight per run (default 8).")
@click.option("-v", "--verbose", count=True, help="-v: milestones and retries; -vv: every call.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve_command(
    host: str, port: int, token: str | None, max_request_mb: float, max_runs: int,
    verbose: int, debug: bool, **options: Any,
) -> None:
    """Serve rlm-graph as an OpenAI-compatible chat model over HTTP.

    POST /v1/chat/completions answers over the whole conversation; GET /v1/models
    lists the model name to send (rlm/<worker model>). Stop with Ctrl-C.
    """
    _configure_logging(max(verbose, 1), debug)
    settings = {key: value for key, value in options.items() if value is not None}
    with _errors_to_exit_codes(debug):
        import asyncio

        from pydantic import ValidationError

        from rlm_graph.config import RunConfig
        from rlm_graph.errors import ConfigError
        from rlm_graph.serve import ServeSettings, serve, served_model_id

        try:
            config = RunConfig(**settings)
            serve_settings = ServeSettings(
                host=host, port=port, token=token, max_runs=max_runs,
                max_request_bytes=int(max_request_mb * 1024 * 1024),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"Invalid setting '{where}': {first.get('msg')}. See 'rlm-graph serve --help'."
            raise ConfigError(msg) from exc

        def announce(url: str) -> None:
            click.echo(f"rlm-graph serve: model {served_model_id(config)} at {url} (Ctrl-C stops)", err=True)

        try:
            asyncio.run(serve(config, serve_settings, on_ready=announce))
        except KeyboardInterrupt:
            click.echo("stopped.", err=True)
        except OSError as exc:
            msg = f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port."
            raise ConfigError(msg) from exc
