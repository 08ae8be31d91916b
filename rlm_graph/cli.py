"""The ``rlm-graph`` command line: argument parsing, progress display, exit codes.

It calls the public API and adds nothing the library lacks. Heavy imports
(LiteLLM takes seconds) happen inside the commands, so ``--help`` is instant.

Exit codes: 0 answered; 1 answered in part (some tasks failed, or stopped);
2 bad input, configuration or store; 3 the models could not be used, or no part
could be answered; 130 interrupted (the run is kept: ``rlm-graph resume``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, ClassVar

import click

__all__ = ["entry", "main"]

EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_INTERRUPTED = 130


_STORE_HELP = (
    "Where runs are kept: an SQLite file or a postgresql:// URL "
    "(or RLM_GRAPH_STORE; default: a file in your user data folder)."
)


def _together(*options: Any) -> Any:
    """One decorator applying several click options, in the order given."""

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# Options `run` and `serve` share: defined once, so both take the same flags.
_model_options = _together(
    click.option("--model", help="Root model: any LiteLLM name (default: the embedded model)."),
    click.option("--worker-model", help="Model for leaf calls (default: --model)."),
    click.option(
        "--router-config", type=click.Path(dir_okay=False),
        help="LiteLLM proxy-style YAML (model_list, router_settings, roles): "
        "deployments, fallbacks, rpm/tpm, cooldowns. The model flags then name "
        "its groups.",
    ),
    click.option("--api-base", help="Base URL of an OpenAI-compatible, Ollama or vLLM server."),
    click.option("--api-key", envvar="RLM_GRAPH_API_KEY", help="Key for --api-base (or RLM_GRAPH_API_KEY)."),
)
_CHUNK_TOKENS = click.option("--chunk-tokens", type=int, help="Largest span a leaf call reads, in tokens.")
_CONCURRENCY = click.option("--concurrency", type=int, help="Most model calls in flight at once (default 8).")
_CONTEXT_WINDOW = click.option("--context-window", type=int, help="Worker window in tokens, for unknown models.")
_budget_options = _together(
    click.option("--max-calls", type=int, help="Budget: most model calls (retries count)."),
    click.option("--max-tokens", type=int, help="Budget: most prompt + completion tokens."),
    click.option("--max-cost", type=float, help="Budget: most US dollars (needs known prices)."),
    click.option("--max-time", "max_time_s", type=float, help="Budget: most seconds of wall time."),
    click.option("--price-in", type=float, help="USD per 1M prompt tokens (models without a known price)."),
    click.option("--price-out", type=float, help="USD per 1M completion tokens."),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rlm-graph")
def main() -> None:
    """Answer questions over inputs far larger than a model's context window."""


@main.command("run")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-q", "--question", required=True, help="The question to answer.")
@_model_options
@click.option("--max-depth", type=int, help="Deepest recursion level (default 4).")
@_CHUNK_TOKENS
@click.option("--overlap-tokens", type=int, help="Tokens shared by neighbouring spans.")
@_CONCURRENCY
@click.option("--fan-out", type=int, help="Most child spans one split makes (default 8).")
@click.option("--fan-in", type=int, help="Most answers one free-text merge call reads (default 8).")
@click.option("--kind", type=click.Choice(["auto", "text", "short", "list", "count", "table", "yesno", "schema", "join"]),
              help="Answer kind (default: the plan decides).")
@click.option("--condition", "conditions", multiple=True, metavar="TEXT",
              help="For --kind join, repeated: a condition each listed entity must meet "
              "('has a refund record'); each may be met in a different part of the source.")
@click.option("--entity", help="For --kind join: what the answer lists, as a plural noun ('users').")
@click.option("--schema", "schema_file", metavar="FILE",
              help="JSON Schema file of one record: the answer is a list of such records.")
@click.option("--sub-question", help="What each piece is asked (default: the plan decides).")
@click.option("--planner", type=click.Choice(["model", "rules"]),
              help="Who plans: the root model from a preview (default), or rules only.")
@click.option("--judge-model", help="Judge model: checks each leaf answer that found something against its span (not 'found nothing' answers). Default: no judge.")
@click.option("--filter", help="Regex: skip parts of the source with no match, unread "
              "('' : no filter, and the model's plan may not add one).")
@_CONTEXT_WINDOW
@click.option("--max-output-tokens", type=int, help="Output tokens reserved per call.")
@click.option("--timeout", "timeout_s", type=float, help="Seconds per model call attempt.")
@click.option("--encoding", help="Encoding of the source files (default utf-8).")
@_budget_options
@click.option(
    "--dry-run", is_flag=True,
    help="Print the plan, pieces, calls, tokens and cost, and stop. With the model "
    "planner this makes the one planning call (recorded in the store, so the run "
    "reuses it; not with --store memory); with --planner rules it calls no model.",
)
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@click.option("--run-id", help="Name the run (letters, digits, '._-'); default: a random id.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: milestones and retries; -vv: every call.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(
    sources: tuple[str, ...], question: str, store: str | None, run_id: str | None,
    as_json: bool, verbose: int, debug: bool, dry_run: bool, **options: Any,
) -> None:
    """Answer QUESTION over SOURCE files, directories or '-' (stdin)."""
    schema_file = options.pop("schema_file", None)
    settings = {key: value for key, value in options.items() if value is not None and value != ()}
    if settings.get("api_key"):
        _RedactSecrets.known.add(settings["api_key"])
    progress = _Progress(enabled=sys.stderr.isatty(), store=store)
    with _errors_to_exit_codes(debug, progress, as_json):
        _refuse_conflicts(
            settings, schema_file=schema_file, dry_run=dry_run, run_id=run_id
        )
        _configure_logging(verbose, debug)
        if schema_file:
            settings["answer_schema"] = _read_schema(schema_file)
        from rlm_graph.api import execute, prepare
        from rlm_graph.source import decode_bytes
        from rlm_graph.store import open_store

        stdin_text = None
        if "-" in sources:
            stdin_text = decode_bytes(sys.stdin.buffer.read(), "<stdin>", options.get("encoding") or "utf-8")
        engine = prepare(question, list(sources), stdin_text=stdin_text, on_event=progress.on_event, **settings)
        _refuse_clamped_overlap(engine, settings)
        if dry_run:
            if engine.config.planner == "model":
                _await(_plan_once(engine, store))
            from rlm_graph.store import resolve_location

            _print_estimate(engine, as_json, kept_nowhere=resolve_location(store) == "memory")
            return
        progress.start(engine)

        async def go() -> Any:
            async with open_store(store) as opened:
                return await execute(engine, store=opened, run_id=run_id)

        try:
            result = _await(go())
        finally:
            progress.stop()
    if verbose and result.plan:
        from rlm_graph.nodes.plan import render_plan
        from rlm_graph.nodes.types import Plan

        click.echo(render_plan(Plan.model_validate(result.plan)), err=True)
    _finish(result, as_json)


@main.command("resume")
@click.argument("run_id")
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@click.option("-q", "--question", help="Check that the run asked this question.")
@click.option("--stored-source", is_flag=True, help="Use the stored copy even if the files changed since.")
@click.option("--model", help="Must equal the run's root model.")
@click.option("--worker-model", help="Must equal the run's worker model.")
@click.option("--api-base", help="Base URL of the model server (may change).")
@click.option("--api-key", envvar="RLM_GRAPH_API_KEY", help="Key for --api-base (or RLM_GRAPH_API_KEY).")
@click.option("--concurrency", type=int, help="Most model calls in flight at once (may change).")
@click.option("--timeout", "timeout_s", type=float, help="Seconds per model call attempt (may change).")
@click.option("--max-retries", type=int, help="Retries per model call (may change).")
@click.option("--max-calls", type=int, help="Budget of this execution: most model calls (may change).")
@click.option("--max-tokens", type=int, help="Budget: most prompt + completion tokens (may change).")
@click.option("--max-cost", type=float, help="Budget: most US dollars (may change).")
@click.option("--max-time", "max_time_s", type=float, help="Budget: most seconds (may change).")
@click.option("--price-in", type=float, help="USD per 1M prompt tokens (may change).")
@click.option("--price-out", type=float, help="USD per 1M completion tokens (may change).")
@click.option("--chunk-tokens", type=int, help="Must equal the run's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: milestones and retries; -vv: every call.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def resume_command(
    run_id: str, store: str | None, question: str | None, stored_source: bool,
    as_json: bool, verbose: int, debug: bool, **options: Any,
) -> None:
    """Finish RUN_ID: continue a stopped or killed run, or retry its failed parts.

    Calls that already returned are answered from the store, not paid again.
    """
    settings = {key: value for key, value in options.items() if value is not None}
    if settings.get("api_key"):
        _RedactSecrets.known.add(settings["api_key"])
    progress = _Progress(enabled=sys.stderr.isatty(), store=store)
    with _errors_to_exit_codes(debug, progress, as_json):
        _configure_logging(verbose, debug)
        from rlm_graph.api import aresume

        progress.start(None)
        try:
            result = _await(aresume(
                run_id, store=store, question=question, stored_source=stored_source,
                on_event=progress.on_event, **settings,
            ))
        finally:
            progress.stop()
    _finish(result, as_json)


@main.command("runs")
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def runs_command(store: str | None, as_json: bool, debug: bool) -> None:
    """List the runs in the store, newest first."""
    with _errors_to_exit_codes(debug):
        from rlm_graph.store import open_store

        async def listing() -> Any:
            async with open_store(store, create=False) as opened:
                return opened.location, await opened.list_runs()

        from rlm_graph.store import is_postgres, resolve_location

        where = resolve_location(store)
        if where != "memory" and not is_postgres(where) and not Path(where).expanduser().exists():
            if as_json:
                click.echo("[]")
            else:
                click.echo(f"No runs in {where} (no store there yet).", err=True)
            return
        location, records = _await(listing())
    if as_json:
        click.echo(json.dumps([_run_row(r) for r in records], ensure_ascii=False, indent=2))
        return
    if not records:
        click.echo(f"No runs in {location}.", err=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    widths = {"run": 16, "status": 11, "question": 24, "source": 14, "progress": 12, "cost": 8, "age": 8}
    for column, width in widths.items():
        table.add_column(column, min_width=width, no_wrap=True, overflow="ellipsis")
    for record in records:
        row = _run_row(record)
        table.add_row(
            row["run_id"], row["status"], _clip(row["question"], 48), _clip(row["source"], 32),
            row["progress"], f"${row['cost_usd']:.4f}" + ("" if row["cost_known"] else "+?"),
            _age(row["updated_at"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


@main.command("show")
@click.argument("run_id")
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the run's record as JSON.")
@click.option("--depth", "max_depth", type=int, default=3, show_default=True, help="Tree levels to draw.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def show_command(run_id: str, store: str | None, as_json: bool, max_depth: int, debug: bool) -> None:
    """Show a run: its result (or progress so far) and its recursion tree."""
    with _errors_to_exit_codes(debug):
        from rlm_graph.store import open_store

        async def fetch() -> Any:
            async with open_store(store, create=False) as opened:
                record = await opened.get_run(run_id)
                runs = {r.run_id: r for r in await opened.list_runs()}
                return runs.get(record.run_id, record)

        record = _await(fetch())
    if as_json:
        click.echo(json.dumps(record.model_dump(mode="json"), ensure_ascii=False, indent=2))
        return
    _show_record(record, max_depth, store)


@main.command("rm")
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def rm_command(run_ids: tuple[str, ...], store: str | None, debug: bool) -> None:
    """Delete runs: their records, checkpoints and (if unused) stored sources.

    Recorded model calls stay, so other runs keep reusing them.
    """
    with _errors_to_exit_codes(debug):
        from rlm_graph.store import open_store

        async def remove() -> list[str]:
            async with open_store(store, create=False) as opened:
                return [(await opened.delete_run(run_id)).run_id for run_id in run_ids]

        for removed in _await(remove()):
            click.echo(f"removed {removed}", err=True)


def entry() -> None:
    """The ``rlm-graph`` console script: :func:`main`, with a Ctrl-C at any moment
    (even while LiteLLM is still loading) ending in one line and exit 130."""
    try:
        code = main.main(prog_name="rlm-graph", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("stopped.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _finish(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.model_dump(mode="json"), ensure_ascii=False, indent=2))
    else:
        _print_human(result)
    if result.status == "failed":
        sys.exit(EXIT_MODEL)
    if result.status != "done":
        sys.exit(EXIT_PARTIAL)


@main.command("eval")
@click.option("--task", "families", multiple=True,
              type=click.Choice(["needle", "count", "compare", "pairs", "multidoc"]),
              help="Task family (repeatable; default: needle).")
@click.option("--sizes", default="8k,32k", show_default=True,
              help="Comma-separated source sizes in tokens (k and m suffixes), 1k to 10m.")
@click.option("--method", "methods", multiple=True, type=click.Choice(["direct", "mapreduce", "rlm"]),
              help="Method (repeatable; default: all three).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generators.")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True,
              help="Needle depths, as shares of the source.")
@click.option("--straddle-tokens", type=int,
              help="Also place a needle across a span boundary every this many tokens.")
@click.option("--model", help="Model for every role (default: the embedded model).")
@click.option("--reading-double", is_flag=True,
              help="Use the reading double (a scripted model that answers from what it is sent).")
@click.option("--context-window", type=int, help="Window in tokens (default 8192 for the double).")
@click.option("--chunk-tokens", type=int, help="Largest span a leaf call reads, in tokens.")
@click.option("--concurrency", type=int, help="Most model calls in flight at once.")
@click.option("--filter", "filter_", help="Pre-filter regex for rlm-graph and the map-reduce (not the direct call).")
@click.option("--planner", type=click.Choice(["model", "rules"]),
              help="Who plans rlm-graph's runs (default: model; rules with --reading-double, "
              "which cannot plan).")
@click.option("--chart", metavar="FILE", help="Write a PNG chart here.")
@click.option("--json", "json_path", metavar="FILE", help="Write every row as JSON here.")
@click.option("-v", "--verbose", count=True, help="-v: one line per method run.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(
    families: tuple[str, ...], sizes: str, methods: tuple[str, ...], seed: int, depths: str,
    straddle_tokens: int | None, model: str | None, reading_double: bool,
    context_window: int | None, chunk_tokens: int | None, concurrency: int | None,
    filter_: str | None, planner: str | None, chart: str | None, json_path: str | None, verbose: int, debug: bool,
) -> None:
    """Compare a direct call, a flat map-reduce and rlm-graph on generated tasks."""
    with _errors_to_exit_codes(debug):
        from rlm_graph.errors import ConfigError

        if reading_double and model:
            msg = (
                "--reading-double is the model of the evaluation; drop --model, "
                "or drop --reading-double."
            )
            raise ConfigError(msg)
        needles = "needle" in (families or ("needle",))
        depths_given = click.get_current_context().get_parameter_source("depths")
        by_hand = depths_given == click.core.ParameterSource.COMMANDLINE
        if not needles and (straddle_tokens or by_hand):
            msg = (
                "--depths and --straddle-tokens place needles; add --task needle "
                "or drop them."
            )
            raise ConfigError(msg)
        parsed_sizes, parsed_depths = _parse_sizes(sizes), _parse_depths(depths)
        for flag, number in (
            ("--straddle-tokens", straddle_tokens), ("--chunk-tokens", chunk_tokens),
            ("--concurrency", concurrency), ("--context-window", context_window),
        ):
            if number is not None and number < 1:
                msg = f"{flag} must be a whole number of at least 1, not {number}."
                raise ConfigError(msg)
        if reading_double:
            # The double answers leaf prompts only: a planning call would be
            # one wasted call per rlm row ("model plan rejected: empty").
            planner = planner or "rules"
            model = "scripted/reader"
            context_window = context_window or 8192
        settings: dict[str, Any] = {
            key: value for key, value in
            {"chunk_tokens": chunk_tokens, "concurrency": concurrency, "filter": filter_,
             "planner": planner}.items() if value is not None
        }
        config = _eval_config(model, context_window, settings)
        for flag, path in (("--chart", chart), ("--json", json_path)):
            if path:
                _check_writable(flag, path)
        _configure_logging(verbose, debug)
        from pathlib import Path

        from rlm_graph.eval import draw_chart, format_table, run_eval, suite
        from rlm_graph.eval.harness import Row

        instances = suite(
            list(families or ["needle"]), parsed_sizes, seed=seed,
            depths=parsed_depths, straddle_tokens=straddle_tokens,
        )
        double = None
        if reading_double:
            from rlm_graph.eval.reader import reading_responder
            from rlm_graph.testing import ScriptedModel

            double = ScriptedModel(reading_responder(instances)).register()

        done: list[Row] = []

        def show(row: Row) -> None:
            done.append(row)
            if json_path:  # rewritten after every row: a long run keeps what it has
                Path(json_path).write_text(
                    json.dumps([r.model_dump(mode="json") for r in done], indent=1), encoding="utf-8"
                )
            click.echo(
                f"{row.instance:<24} {row.method:<9} score {row.score:.2f}  "
                f"calls {row.run.calls:>5}  {row.run.elapsed_s:>7.1f}s"
                + (f"  ({row.run.error})" if row.run.error else "")
                + (f"  [plan: {row.run.plan_made_by}]" if row.run.plan_made_by else ""),
                err=True,
            )

        try:
            rows = _await(run_eval(instances, config, methods=list(methods or ["direct", "mapreduce", "rlm"]), on_row=show))
        finally:
            if double is not None:
                double.unregister()

        click.echo(format_table(rows))
        name = "reading double" if reading_double else config.root_model
        if chart:
            draw_chart(rows, Path(chart), title=f"accuracy by input size ({name}, seed {seed})")
            click.echo(f"chart written to {chart}", err=True)


MIN_EVAL_TOKENS = 1_000
"""Smallest evaluation source: below it a generator cannot place its records,
needle and decoys."""
MAX_EVAL_TOKENS = 10_000_000
"""Largest evaluation source (about 40 MB of text, generated in memory)."""


def _check_writable(flag: str, path: str) -> None:
    """Refuse an output path that cannot be written, before any work.

    The file is opened for appending (which leaves an existing file as it
    is), and removed again if that created it: permission bits alone miss
    folders such as /proc, read-only mounts and a full disk's quotas.
    """
    from pathlib import Path

    from rlm_graph.errors import ConfigError

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    problem = None
    if target.is_dir():
        problem = "is a folder"
    elif not folder.is_dir():
        problem = f"its folder {str(folder)!r} does not exist"
    else:
        existed = target.exists()
        try:
            with target.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            problem = f"cannot be written ({exc.strerror or exc})"
        else:
            if not existed:
                target.unlink(missing_ok=True)
    if problem:
        msg = f"{flag} {path}: {problem}; give a file path that can be written."
        raise ConfigError(msg)


def _parse_sizes(text: str) -> list[int]:
    """Sizes like ``8k,32k,1.5m``: whole token counts from 1k to 10m."""
    import re

    from rlm_graph.errors import ConfigError

    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", part)
        if match is None:
            msg = (
                f"--sizes: {part!r} is not a size; write token counts with an "
                "optional k or m, e.g. 8k,32k,1m."
            )
            raise ConfigError(msg)
        scale = {"k": 1_000, "m": 1_000_000, "": 1}[match.group(2)]
        tokens = float(match.group(1)) * scale
        if tokens < MIN_EVAL_TOKENS or not tokens.is_integer():
            msg = (
                f"--sizes: {part!r} is too small or not whole; each size must be "
                "at least 1k tokens."
            )
            raise ConfigError(msg)
        if tokens > MAX_EVAL_TOKENS:
            msg = f"--sizes: {part!r} is too large; each size must be at most 10m tokens."
            raise ConfigError(msg)
        sizes.append(int(tokens))
    if not sizes:
        msg = "--sizes is empty; give at least one size, e.g. --sizes 8k."
        raise ConfigError(msg)
    return sizes


def _parse_depths(text: str) -> tuple[float, ...]:
    """Needle depths like ``0.1,0.5,0.9``: shares of the source from 0 to 1."""
    from rlm_graph.errors import ConfigError

    depths = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            depth = float(part)
        except ValueError:
            depth = -1.0
        if not 0.0 <= depth <= 1.0:
            msg = (
                f"--depths: {part!r} is not a share of the source; write numbers "
                "from 0 to 1, e.g. 0.1,0.5,0.9."
            )
            raise ConfigError(msg)
        depths.append(depth)
    if not depths:
        msg = "--depths is empty; give at least one depth, e.g. --depths 0.5."
        raise ConfigError(msg)
    return tuple(depths)


def _eval_config(model: str | None, context_window: int | None, settings: dict[str, Any]) -> Any:
    """The evaluation's run configuration; a bad setting is one ConfigError line."""
    from pydantic import ValidationError

    from rlm_graph.config import RunConfig
    from rlm_graph.errors import ConfigError

    try:
        return RunConfig(model=model, context_window=context_window, **settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + ".".join(str(p) for p in first.get("loc", ())).replace("_", "-")
        message = str(first.get("msg", "")).removeprefix("Value error, ").rstrip(".")
        said = message if message.startswith(flag) else f"Invalid {flag}: {message}"
        msg = f"{said}. See 'rlm-graph eval --help'."
        raise ConfigError(msg) from None


def _read_schema(path: str) -> dict[str, Any]:
    from rlm_graph.errors import ConfigError

    try:
        data = json.loads(open(path, encoding="utf-8").read())  # noqa: SIM115
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"--schema {path}: not a readable JSON file ({exc}). Pass a JSON Schema of one record."
        raise ConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f'--schema {path}: expected a JSON object like {{"type": "object", "properties": {{...}}}}.'
        raise ConfigError(msg)
    return data


def _await(coro: Any) -> Any:
    """Run a coroutine; a Ctrl-C cancels it and always ends in KeyboardInterrupt.

    asyncio's own handler raises KeyboardInterrupt only if the cancelled task
    ends with CancelledError; one that swallowed the cancel (a library
    catching it mid-call) would otherwise run on and exit 0. A second Ctrl-C
    stops at once.
    """
    import asyncio
    import signal

    asked: list[bool] = []

    async def guarded() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_sigint(signum: int, frame: Any) -> None:
            if asked:
                raise KeyboardInterrupt
            asked.append(True)
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        import threading

        if threading.current_thread() is not threading.main_thread():
            return await coro  # signals reach only the main thread
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            return await coro
        finally:
            signal.signal(signal.SIGINT, previous)

    try:
        result = asyncio.run(guarded())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    if asked:
        raise KeyboardInterrupt
    return result


def _run_row(record: Any) -> dict[str, Any]:
    progress = record.progress or {}
    files = record.source.files
    source = files[0]["name"] if files else "?"
    if len(files) > 1:
        source += f" +{len(files) - 1}"
    if record.status in ("done", "partial", "failed") and record.result:
        done = f"{record.result.get('usage', {}).get('calls', 0)} calls"
    else:
        done = f"{progress.get('leaves_done', 0)}/~{progress.get('leaves_estimate', '?')} pieces"
    usage = (record.result or {}).get("usage") or progress.get("usage") or {}
    return {
        "run_id": record.run_id, "status": record.status, "question": record.question,
        "source": source, "progress": done, "cost_usd": usage.get("cost_usd", 0.0),
        "cost_known": usage.get("cost_known", True),
        "created_at": record.created_at, "updated_at": record.updated_at,
    }


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _age(when: float) -> str:
    seconds = max(0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _show_record(record: Any, max_depth: int, store: str | None) -> None:
    from rich.console import Console
    from rich.tree import Tree

    from rlm_graph.result import Result

    console = Console()
    console.print(f"[bold]{record.run_id}[/bold] · {record.status} · {record.question}", highlight=False)
    names = ", ".join(f["name"] for f in record.source.files[:3])
    console.print(f"source: {names} ({record.source.chars:,} characters, sha256 {record.source.digest[:12]})",
                  highlight=False)
    if record.parent is not None:
        console.print(
            f"inside LangGraph thread {record.parent.get('thread_id')!r}, "
            f"node {record.parent.get('namespace')!r}",
            highlight=False,
        )
    if record.error:
        console.print(f"stopped by: {record.error}", highlight=False)
    if record.result is not None:
        result = Result.model_validate(record.result)
        click.echo("")
        _print_human(result)
        if result.tree is not None:
            tree = Tree(_node_label(result.tree.id, result.tree.status, result.tree.verdict, result.tree.answer))
            _add_result_children(tree, result.tree, max_depth)
            console.print(tree)
        return
    progress = record.progress or {}
    click.echo(
        f"progress: {progress.get('leaves_done', 0)} of ~{progress.get('leaves_estimate', '?')} pieces read, "
        f"{progress.get('calls', 0)} calls ({progress.get('cached_calls', 0)} cached), "
        f"${progress.get('cost_usd', 0.0):.4f}"
    )
    tasks = progress.get("tasks") or {}
    tree = Tree("0 (root)")
    nodes = {"0": tree}
    for task_id in sorted(tasks, key=lambda t: [int(p) for p in t.split(".")]):
        if task_id.count(".") > max_depth:
            continue
        start, end, status = tasks[task_id]
        parent = nodes.get(task_id.rsplit(".", 1)[0], tree)
        nodes[task_id] = parent.add(f"{task_id} [{start}:{end}] {status}")
    Console().print(tree)
    if record.status in ("interrupted", "stopped", "partial", "failed"):
        from rlm_graph.store import redact

        where = f" --store {redact(store)}" if store else ""
        if record.parent is not None:
            thread = record.parent.get("thread_id")
            click.echo(f"resume by resuming its LangGraph graph's thread {thread!r}")
        else:
            click.echo(f"resume with: rlm-graph resume {record.run_id}{where}")


def _node_label(task_id: str, status: str, verdict: str, answer: Any) -> str:
    shown = "" if answer in (None, "", []) else f" → {_clip(str(answer), 60)}"
    return f"{task_id} {status} ({verdict}){shown}"


def _add_result_children(tree: Any, node: Any, max_depth: int) -> None:
    for child in node.children:
        branch = tree.add(_node_label(child.id, child.status, child.verdict, child.answer))
        if child.depth < max_depth:
            _add_result_children(branch, child, max_depth)


class _errors_to_exit_codes:
    """Turn library errors into one line on stderr and a documented exit code."""

    def __init__(
        self, debug: bool, progress: _Progress | None = None, as_json: bool = False
    ) -> None:
        self.debug = debug
        self.progress = progress
        self.as_json = as_json

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        from rlm_graph.errors import ConfigError, RlmGraphError, SourceError, StoreError

        hint = self.progress.resume_hint() if self.progress is not None else None
        if isinstance(exc, KeyboardInterrupt):
            click.echo("stopped." + (f" Nothing finished is lost; resume with: {hint}" if hint else ""), err=True)
            sys.exit(EXIT_INTERRUPTED)
        if not isinstance(exc, RlmGraphError):
            return False
        if self.debug:
            # The traceback, and the same exit code as without --debug.
            traceback.print_exception(exc, file=sys.stderr)
        usage = isinstance(exc, ConfigError | SourceError | StoreError)
        click.echo(f"error: {exc}", err=True)
        if hint and not usage:
            click.echo(f"The run is kept; once fixed, resume with: {hint}", err=True)
        if self.as_json and not usage:
            # --json promises one object on stdout, also when the run failed.
            failed = {"status": "failed", "error": str(exc)}
            run_id = self.progress.run_id if self.progress is not None else None
            if run_id:
                failed["run_id"] = run_id
            click.echo(json.dumps(failed, ensure_ascii=False, indent=2))
        sys.exit(EXIT_USAGE if usage else EXIT_MODEL)


def _join_conditions(conditions: tuple[str, ...], entity: str | None) -> str:
    """The conditions of a join plan, for the start line."""
    numbered = "; ".join(f"{i + 1}. {c}" for i, c in enumerate(conditions))
    return f"; conditions: {numbered} (listed: the {entity or 'entities'} meeting all)"


class _Progress:
    """A live line on stderr: tasks, depth, calls and tokens (rich)."""

    def __init__(self, *, enabled: bool, store: str | None = None) -> None:
        self.enabled = enabled
        self.store = store
        self.run_id: str | None = None
        self.started = self.done = self.calls = self.cached = self.tokens = 0
        self.depth = 0
        self._live: Any = None
        self._engine: Any = None
        self._t0 = time.monotonic()

    def start(self, engine: Any) -> None:
        self._engine = engine
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

    def resume_hint(self) -> str | None:
        if self.run_id is None:
            return None
        from rlm_graph.store import redact

        store = f" --store {redact(self.store)}" if self.store else ""
        return f"rlm-graph resume {self.run_id}{store}"

    def on_event(self, event: Any) -> None:
        if event.kind == "run_started":
            self.run_id = event.data["run_id"]
            message = f"rlm-graph: run {self.run_id} (if stopped: {self.resume_hint()})"
            self._say(message)
        elif event.kind == "plan_ready" and self._engine is not None:
            # Said once the plan is final: the model's plan may change the kind
            # and the span size the rules chose.
            engine = self._engine
            plan = engine.plan
            self._say(
                f"rlm-graph: {engine.source.describe()}, {plan.source_tokens:,} tokens; "
                f"{plan.kind} answer; leaves of up to {plan.leaf_tokens:,} tokens; "
                f"plan by {plan.made_by.split(' (')[0]}; worker {engine.client.models['worker']}"
                + (_join_conditions(plan.conditions, plan.entity) if plan.kind == "join" else "")
            )
        elif event.kind == "task_started":
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

    def _say(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message, highlight=False)
        else:
            click.echo(message, err=True)

    def _render(self) -> Any:
        from rich.text import Text

        elapsed = time.monotonic() - self._t0
        return Text(
            f"⠿ tasks {self.done}/{self.started} done · depth {self.depth} · "
            f"calls {self.calls} ({self.cached} cached) · {self.tokens:,} tokens · {elapsed:.0f}s",
            style="cyan",
        )


def _refuse_conflicts(
    settings: dict[str, Any],
    *,
    schema_file: str | None,
    dry_run: bool,
    run_id: str | None,
) -> None:
    """Refuse flags that contradict each other, before anything is read or paid."""
    from rlm_graph.errors import ConfigError

    kind = settings.get("kind")
    if schema_file and kind not in (None, "auto", "schema"):
        msg = (
            f"--kind {kind} and --schema conflict: with a schema the answer is a list "
            "of records (kind schema). Drop one of them."
        )
        raise ConfigError(msg)
    if settings.get("conditions") and (schema_file or kind not in (None, "auto", "join")):
        given = "--schema" if schema_file else f"--kind {kind}"
        msg = f"--condition is for --kind join; {given} conflicts with it. Drop one of them."
        raise ConfigError(msg)
    if settings.get("entity") and not settings.get("conditions") and kind not in (None, "auto", "join"):
        msg = f"--entity is for --kind join, not --kind {kind}. Drop it."
        raise ConfigError(msg)
    if dry_run and run_id:
        msg = "--dry-run makes no run, so --run-id has nothing to name. Drop one."
        raise ConfigError(msg)


def _refuse_clamped_overlap(engine: Any, settings: dict[str, Any]) -> None:
    """Refuse an --overlap-tokens the plan had to cut (at most a quarter of a leaf)."""
    from rlm_graph.errors import ConfigError

    asked = settings.get("overlap_tokens")
    if asked is not None and engine.plan.overlap_tokens < asked:
        msg = (
            f"--overlap-tokens {asked} is more than a quarter of the "
            f"{engine.plan.leaf_tokens:,}-token leaf spans; use at most "
            f"{engine.plan.leaf_tokens // 4}, or a larger --chunk-tokens."
        )
        raise ConfigError(msg)


async def _plan_once(engine: Any, store: str | None) -> None:
    """Make the model's plan with the run's store as the call log, so the run
    that follows answers its planning call from there instead of paying again."""
    from rlm_graph.store import open_store

    async with open_store(store) as opened:
        engine.client.call_log = opened
        await engine.plan_with_model()


def _print_estimate(engine: Any, as_json: bool, *, kept_nowhere: bool = False) -> None:
    from rlm_graph.budget import estimate
    from rlm_graph.nodes.plan import render_plan

    figures = estimate(engine)
    usage = engine.client.usage
    planning = usage.calls + usage.cached_calls
    if as_json:
        data = figures.model_dump(mode="json")
        data["plan"] = engine.plan.model_dump(mode="json")
        data["planning_calls"] = {"sent": usage.calls, "recorded": usage.cached_calls}
        click.echo(json.dumps(data, indent=2))
        return
    if planning:
        paid = "from the store's call log" if usage.cached_calls else (
            f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} "
            "completion tokens"
        )
        reuse = (
            "--store memory keeps nothing, so the run pays for it again"
            if kept_nowhere else "the run reuses it from the store instead of paying again"
        )
        click.echo(f"planning: 1 call to the root model ({paid}); {reuse}")
    else:
        click.echo("planning: by rules, no model call")
    click.echo(render_plan(engine.plan))
    cost = (
        "unknown (no price for a model; see --price-in)"
        if figures.cost_usd is None
        else f"up to ${figures.cost_usd:.4f}"
    )
    plan = "1 plan + " if figures.plan_calls else ""
    skipped = (
        f"skipped by the plan's filter ({_filter_origin(engine.plan)}): {figures.skipped:,}"
        if engine.plan.filter else "no filter: every piece is read"
    )
    merges = (
        f" (+ up to {figures.merge_prompt_tokens:,} in merges)"
        if figures.merge_prompt_tokens
        else ""
    )
    click.echo(
        f"dry run: {engine.source.describe()}, {engine.plan.source_tokens:,} tokens, "
        f"{engine.plan.kind} answer\n"
        f"  pieces:     {figures.pieces:,} ({skipped}; depth {figures.depth})\n"
        f"  calls:      {figures.calls:,} ({plan}{figures.leaf_calls:,} leaf + "
        f"up to {figures.merge_calls:,} merge)\n"
        f"  tokens:     {figures.prompt_tokens:,} prompt{merges} + up to "
        f"{figures.completion_tokens:,} completion\n"
        f"  cost:       {cost}\n"
        "  (first attempts only: retries, re-asks and finer splits add to these)"
    )


JOINED_SHOWN = 20


def _joined_text(result: Any) -> str:
    """A join answer: each entity, then per condition where the source shows it."""
    conditions = (result.plan or {}).get("conditions") or []
    if not result.joined:
        return f"(no entity meets all {len(conditions)} conditions)"
    lines = []
    for joined in result.joined[:JOINED_SHOWN]:
        lines.append(f"- {joined.entity}")
        for condition, citation in joined.citations.items():
            quote = " ".join(citation.quote.split())
            lines.append(f"    {condition}: {citation.source}:{citation.line}  \"{quote[:120]}\"")
    if len(result.joined) > JOINED_SHOWN:
        rest = result.joined[JOINED_SHOWN:]
        lines.append(f"- ... and {len(rest)} more: {', '.join(j.entity for j in rest)}")
    return "\n".join(lines)


def _print_human(result: Any) -> None:
    if result.status == "failed":
        answer = "no answer: every part failed (see failures)"
    elif result.status == "stopped" and result.answer is None and result.kind != "text":
        answer = "no answer yet: the run stopped before any part was answered"
    elif result.kind == "list":
        answer = "\n".join(f"- {item}" for item in result.answer or []) or "(nothing found)"
    elif result.kind == "join":
        answer = _joined_text(result)
    elif result.kind == "table":
        answer = "\n".join(f"{label}: {n}" for label, n in (result.answer or {}).items()) or "(nothing found)"
    elif result.kind == "yesno":
        answer = "yes" if result.answer else "no"
        if not result.found:
            answer = "no (no evidence found)"
    elif result.kind == "schema":
        records = [json.dumps(r, ensure_ascii=False) for r in result.answer or []]
        answer = "\n".join(records) or "(nothing found)"
    elif not result.found and result.kind in ("text", "short"):
        answer = "(no part of the source answered the question)"
    else:
        answer = str(result.answer)
    click.echo(answer)
    if result.status == "partial":
        parts = len(result.failures)
        click.echo(
            f"(partial answer: {parts} part{'s' if parts != 1 else ''} of the "
            "source could not be answered, so this covers the rest only; see "
            "the warnings)"
        )
    if result.citations and result.kind != "join":  # a join shows its quotes per entity
        click.echo("\nCitations:")
        for citation in result.citations[:20]:
            quote = " ".join(citation.quote.split())
            click.echo(f"  {citation.source}:{citation.line}  \"{quote[:160]}\"")
        if len(result.citations) > 20:
            click.echo(f"  ... and {len(result.citations) - 20} more (see --json)")
    skipped = _skipped_note(result)
    if skipped:
        click.echo(f"({skipped})")
    for failure in result.failures[:10]:
        click.echo(f"warning: part {failure.task_id} of {failure.source} was not answered: {failure.reason}", err=True)
    if result.status == "stopped":
        click.echo(
            f"note: this answer is partial: {result.stop_reason or 'a budget was reached'}; "
            f"{len(result.failures)} part(s) not answered. Finish it (recorded calls are "
            f"free) with: rlm-graph resume {result.run_id} and a larger budget",
            err=True,
        )
    elif result.status == "failed":
        click.echo(f"note: no part was answered; {len(result.failures)} part(s) failed.", err=True)
    elif result.status != "done":
        click.echo(f"note: this answer is {result.status}; {len(result.failures)} part(s) failed.", err=True)
    usage = result.usage
    cost = f"${usage.cost_usd:.4f}" if usage.cost_known else f"${usage.cost_usd:.4f} (some prices unknown)"
    unjudged = (
        f" · judge gave no verdict on {result.unjudged_parts} of {result.judged_parts} answers"
        if result.unjudged_parts else ""
    )
    click.echo(
        f"\n[{result.run_id} · {result.status}{unjudged} · {usage.calls} calls"
        f"{f' ({usage.cached_calls} cached)' if usage.cached_calls else ''} · "
        f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion tokens · "
        f"{cost} · {result.elapsed_s:.1f}s]",
    )


def _filter_origin(plan: Any) -> str:
    """Who chose a plan's filter, in words: the user's flag or the model."""
    overridden = plan.get("overridden", ()) if isinstance(plan, dict) else plan.overridden
    return "given by --filter" if "filter" in overridden else "made by model"


def _skipped_note(result: Any) -> str | None:
    """Says that the plan's filter left parts unread (the answer covers the rest)."""
    plan = result.plan or {}
    if not result.skipped_parts or not plan.get("filter"):
        return None
    rerun = "; --filter '' reads them all" if "filter" not in plan.get("overridden", ()) else ""
    return (
        f"the plan's filter {plan['filter']!r} ({_filter_origin(plan)}) skipped "
        f"{result.skipped_parts:,} of {result.parts:,} parts unread{rerun}"
    )


class _RedactSecrets(logging.Filter):
    """Masks API keys in every log line, LiteLLM's own included (a server that
    rejects a key often repeats it: "Incorrect API key provided: sk-...")."""

    _PATTERNS = (
        (r"(API key provided:?\s*)\S+", r"\1***"),
        (r"(Bearer\s+)[A-Za-z0-9._~+/=-]{4,}", r"\1***"),
        (r"\b(sk-[A-Za-z0-9]{0,3})[A-Za-z0-9_\-]{4,}", r"\1***"),
    )

    known: ClassVar[set[str]] = set()
    """Keys given on the command line (``--api-key``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        import re

        message = record.getMessage()
        redacted = message
        for pattern, replacement in self._PATTERNS:
            redacted = re.sub(pattern, replacement, redacted)
        secrets = {os.environ.get(n) for n in ("RLM_GRAPH_API_KEY", "OPENAI_API_KEY")} | self.known
        for secret in secrets:
            if secret and len(secret) >= 4:
                redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class _OneLineFormatter(logging.Formatter):
    """Log records as single lines: line breaks inside a record become ' | '."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return " | ".join(part for part in text.splitlines() if part.strip())


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
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True), show_path=False, show_time=verbose >= 2, markup=False
        )
    else:
        # A file or a pipe: one record, one physical line (rich wraps at 80 columns).
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _OneLineFormatter(
                ("%(asctime)s " if verbose >= 2 else "") + "%(levelname)-8s %(message)s"
            )
        )
    handler.addFilter(_RedactSecrets())
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
@click.option("--store", "store", envvar="RLM_GRAPH_STORE", help=_STORE_HELP)
@_model_options
@_CONTEXT_WINDOW
@_CHUNK_TOKENS
@_CONCURRENCY
@_budget_options
@click.option("-v", "--verbose", count=True, help="-v: milestones and retries; -vv: every call.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve_command(
    host: str, port: int, token: str | None, max_request_mb: float, max_runs: int,
    store: str | None, verbose: int, debug: bool, **options: Any,
) -> None:
    """Serve rlm-graph as an OpenAI-compatible chat model over HTTP.

    POST /v1/chat/completions answers over the whole conversation; GET /v1/models
    lists the model name to send (rlm/<worker model>). Concurrency and budgets
    apply to each request's run. Stop with Ctrl-C.
    """
    _configure_logging(max(verbose, 1), debug)
    settings = {key: value for key, value in options.items() if value is not None}
    if settings.get("api_key"):
        _RedactSecrets.known.add(settings["api_key"])
    with _errors_to_exit_codes(debug):
        import asyncio

        from pydantic import ValidationError

        from rlm_graph.config import RunConfig
        from rlm_graph.errors import ConfigError
        from rlm_graph.serve import ServeSettings, serve, served_model_id

        try:
            config = RunConfig(**settings)
            serve_settings = ServeSettings(
                host=host, port=port, token=token, max_runs=max_runs, store=store,
                max_request_bytes=int(max_request_mb * 1024 * 1024),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"Invalid setting '{where}': {first.get('msg')}. See 'rlm-graph serve --help'."
            raise ConfigError(msg) from exc

        model_id = served_model_id(config)

        def announce(url: str) -> None:
            click.echo(f"rlm-graph serve: model {model_id} at {url} (Ctrl-C stops)", err=True)

        try:
            asyncio.run(serve(config, serve_settings, on_ready=announce))
        except KeyboardInterrupt:
            click.echo("stopped.", err=True)
        except OSError as exc:
            msg = f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port."
            raise ConfigError(msg) from exc
