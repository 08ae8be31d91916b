"""Combine rows saved by ``rlm-graph eval --json`` into one table and one chart.

Run: ``.venv/bin/python benchmarks/eval_tables.py rows1.json [rows2.json ...]
--chart docs/eval/chart.png --title "..."``. The table (Markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlm_graph.eval import draw_chart, format_table
from rlm_graph.eval.harness import Row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="+", type=Path)
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--title", default="accuracy by input size")
    args = parser.parse_args()

    rows = [Row.model_validate(r) for path in args.rows for r in json.loads(path.read_text())]
    rows.sort(key=lambda r: (r.tokens, ["needle", "count", "compare", "pairs", "multidoc"].index(r.family)))
    print(format_table(rows))
    if args.chart:
        draw_chart(rows, args.chart, title=args.title)


if __name__ == "__main__":
    main()
