"""Run methods over generated instances, score them, print a table, draw a chart.

Scoring is exact: a needle answer's only code (run of four or more digits)
must be the planted code, so a decoy's code or a longer number is wrong; a
count must equal the planted count; a comparison must name one winning label,
the more common one; a list
scores the Jaccard overlap of its set with the true set (1.0 only when equal).
A method that fails scores 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError
from rlm_graph.eval.generators import Instance
from rlm_graph.eval.methods import METHODS, MethodName, MethodRun, run_method
from rlm_graph.source import Source, source_from_documents

__all__ = ["Row", "draw_chart", "format_table", "instance_source", "run_eval", "score"]

logger = logging.getLogger(__name__)

REFERENCE_PRICES_USD_PER_M = (0.15, 0.60)
"""Input and output prices per million tokens used for the ``cost`` column when
the model has no price (local models, doubles): gpt-4o-mini's list price, so
the methods' costs compare on a realistic scale."""


class Row(BaseModel):
    """One method on one instance, scored."""

    instance: str
    family: str
    tokens: int
    """Target size of the source, in tokens."""
    method: str
    score: float
    expected: Any
    run: MethodRun

    @property
    def at_reference_prices(self) -> bool:
        """Whether :attr:`reference_cost_usd` uses the reference prices (the
        model had no price, or cost nothing)."""
        return not self.run.cost_usd

    @property
    def reference_cost_usd(self) -> float:
        """The run's cost at :data:`REFERENCE_PRICES_USD_PER_M` when it has none."""
        if not self.at_reference_prices:
            return self.run.cost_usd
        price_in, price_out = REFERENCE_PRICES_USD_PER_M
        return (
            self.run.prompt_tokens * price_in + self.run.completion_tokens * price_out
        ) / 1e6


def score(instance: Instance, answer: Any) -> float:
    """How right ``answer`` is for ``instance``, from 0 to 1."""
    if answer is None:
        return 0.0
    expected = instance.expected
    if instance.family == "needle":
        # The answer's code: its one run of four or more digits. Any other
        # such run (a decoy's code, "993749") makes the answer wrong.
        codes = set(re.findall(r"(?<!\d)\d{4,}(?!\d)", str(answer)))
        return float(codes == {str(expected)})
    if instance.family in ("count", "multidoc"):
        return float(_as_int(answer) == expected)
    if instance.family == "compare":
        return float(_named_label(answer, list(instance.meta["counts"])) == expected)
    got = {
        str(v).strip()
        for v in (
            answer if isinstance(answer, list) else re.split(r"[;,]", str(answer))
        )
    }
    got.discard("")
    want = set(expected)
    if not got and not want:
        return 1.0
    return len(got & want) / len(got | want)


async def run_eval(
    instances: Sequence[Instance],
    config: RunConfig,
    *,
    methods: Sequence[MethodName] = METHODS,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run every method on every instance, one at a time, and score them.

    Each method reads the instance's files as one source whose files are named
    ``<instance>/<file>`` (:func:`instance_source`): no machine path reaches a
    prompt, so a seed gives the same prompts, tokens and answers on every run
    and machine. The answer kind is fixed per instance for all methods alike
    (``config.kind`` is set to the instance's kind, and a join's conditions to
    the instance's), so the comparison measures structure, not wording.
    """
    rows: list[Row] = []
    for instance in instances:
        source = instance_source(instance)
        run_config = config.model_copy(update={
            "kind": instance.kind, "conditions": instance.conditions, "entity": instance.entity,
        })
        for method in methods:
            run = await run_method(method, instance, source, run_config)
            row = Row(
                instance=instance.name,
                family=instance.family,
                tokens=instance.target_tokens,
                method=method,
                score=score(instance, run.answer),
                expected=instance.expected,
                run=run,
            )
            logger.info(
                "%s %s: score %.2f, %d calls, %.1f s",
                instance.name,
                method,
                row.score,
                run.calls,
                run.elapsed_s,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def instance_source(instance: Instance) -> Source:
    """An instance's files as one source, named ``<instance name>/<file name>``."""
    return source_from_documents(
        [
            (f"{instance.name}/{name}", instance.files[name])
            for name in sorted(instance.files)
        ]
    )


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: accuracy, calls, tokens, cost and time per family, size
    and method (means over instances).

    A cost computed at the reference prices (the model had none) is marked
    ``*``, and a line under the table says so.
    """
    groups: dict[tuple[str, int, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.family, row.tokens, row.method), []).append(row)
    lines = [
        "| task | size (tokens) | method | n | accuracy | calls | tokens in+out | cost (USD) | time (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (family, tokens, method), group in groups.items():
        n = len(group)
        lines.append(
            f"| {family} | {tokens:,} | {method} | {n} "
            f"| {sum(r.score for r in group) / n:.2f} "
            f"| {sum(r.run.calls for r in group) / n:.0f} "
            f"| {sum(r.run.prompt_tokens + r.run.completion_tokens for r in group) / n:,.0f} "
            f"| {sum(r.reference_cost_usd for r in group) / n:.4f}"
            f"{'*' if any(r.at_reference_prices for r in group) else ''} "
            f"| {sum(r.run.elapsed_s for r in group) / n:.1f} |"
        )
    if any(row.at_reference_prices for row in rows):
        price_in, price_out = REFERENCE_PRICES_USD_PER_M
        lines.append(
            f"\n\\* cost at gpt-4o-mini reference prices (${price_in:.2f} in, "
            f"${price_out:.2f} out per 1M tokens): the model has no price."
        )
    return "\n".join(lines)


def draw_chart(rows: Sequence[Row], path: Path, *, title: str) -> Path:
    """Write a PNG of accuracy against input size, one panel per task family.

    Raises:
        ConfigError: matplotlib is missing (``pip install 'rlm-graph[eval]'``).
    """
    try:
        import matplotlib
    except ImportError as exc:
        msg = "The chart needs matplotlib: pip install 'rlm-graph[eval]'"
        raise ConfigError(msg) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows))
    figure, axes = plt.subplots(
        1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False
    )
    for axis, family in zip(axes[0], families, strict=True):
        for method in dict.fromkeys(r.method for r in rows):
            points: dict[int, list[float]] = {}
            for row in rows:
                if row.family == family and row.method == method:
                    points.setdefault(row.tokens, []).append(row.score)
            sizes = sorted(points)
            axis.plot(
                sizes, [sum(points[s]) / len(points[s]) for s in sizes], label=method,
                # Lines that coincide stay visible: own marker, dash and width.
                **_STYLES.get(method, {"marker": "o"}),
            )
        axis.set_xscale("log")
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(family)
        axis.set_xlabel("input size (tokens)")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


_STYLES: dict[str, dict[str, Any]] = {
    "direct": {"marker": "o", "linestyle": ":", "linewidth": 2.5, "markersize": 9},
    "mapreduce": {"marker": "s", "linestyle": "--", "linewidth": 2.0, "markersize": 7},
    "rlm": {"marker": "^", "linestyle": "-", "linewidth": 1.2, "markersize": 5},
}


def _as_int(answer: Any) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer
    match = re.search(r"\d+", str(answer))
    return int(match.group(0)) if match else None


def _named_label(answer: Any, labels: list[str]) -> str | None:
    """The one label an answer says is more common, or None when it names no
    single winner: the strictly larger count of a table; in a text, the only
    label named, or the one said to be "more"/"most" common."""
    if isinstance(answer, dict):
        known = {k: v for k, v in answer.items() if k in labels}
        return _strict_max(known)
    text = str(answer).casefold()
    table = dict(re.findall(r"(\w+): (\d+)", text))
    if all(label in table for label in labels):
        return _strict_max({label: int(table[label]) for label in labels})
    named = [label for label in labels if re.search(rf"\b{re.escape(label)}\b", text)]
    if len(named) == 1:
        return named[0]
    said = {
        label: {m.group(1) for m in re.finditer(
            rf"\b{re.escape(label)}\b[^.;]*?\b(more|most|less|fewer|least)\b", text
        )}
        for label in named
    }
    winners = [label for label, words in said.items() if words & {"more", "most"}]
    losers = [label for label, words in said.items() if words & {"less", "fewer", "least"}]
    if len(winners) == 1 and not losers:
        return winners[0]
    if len(losers) == 1 and not winners and len(named) == 2:
        return next(label for label in named if label not in losers)
    return None


def _strict_max(counts: dict[str, Any]) -> str | None:
    if not counts:
        return None
    best = max(counts.values())
    winners = [label for label, n in counts.items() if n == best]
    return winners[0] if len(winners) == 1 else None
