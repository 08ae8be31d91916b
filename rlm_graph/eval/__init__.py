"""The evaluation harness: seeded long-context tasks, three methods, a score table.

Use it from the command line (``rlm-graph eval --help``) or from Python::

    from rlm_graph.eval import needle_task, run_eval, format_table
    rows = await run_eval([needle_task(32_000, depth=0.9)], RunConfig())
    print(format_table(rows))

The PNG chart needs the ``eval`` extra (matplotlib).
"""

from __future__ import annotations

from rlm_graph.eval.generators import (
    Instance,
    Reading,
    make_instance,
    multidoc_task,
    needle_task,
    pairs_task,
    records_compare_task,
    records_count_task,
    suite,
)
from rlm_graph.eval.harness import (
    Row,
    draw_chart,
    format_table,
    instance_source,
    run_eval,
    score,
)
from rlm_graph.eval.methods import METHODS, MethodRun, run_method

__all__ = [
    "METHODS",
    "Instance",
    "MethodRun",
    "Reading",
    "Row",
    "draw_chart",
    "format_table",
    "instance_source",
    "make_instance",
    "multidoc_task",
    "needle_task",
    "pairs_task",
    "records_compare_task",
    "records_count_task",
    "run_eval",
    "run_method",
    "score",
    "suite",
]
