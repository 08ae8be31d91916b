"""Ask a question over a book with the plain Python API.

Run from the repository root: ``.venv/bin/python examples/python_api.py [FILE]``
(default FILE: the bundled book).
With no model configured it uses the embedded model; point it at any LiteLLM
model with ``RLM_GRAPH_MODEL`` (and ``RLM_GRAPH_API_BASE`` for a local server).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlm_graph import run

BOOK = Path(__file__).with_name("alice_in_wonderland.txt")
QUESTION = "What were the names of the three sisters in the Dormouse's story?"


def main() -> None:
    # filter= skips the parts of the book with no match unread (a pre-filter).
    source = sys.argv[1] if len(sys.argv) > 1 else BOOK
    result = run(QUESTION, [source], filter="sisters")

    if result.status == "failed":
        print("no answer: every part failed")
    else:
        print(result.answer)
    for failure in result.failures:
        print(f"  not answered: {failure.source} ({failure.reason[:80]})")
    for citation in result.citations:
        print(f"  {citation.source}:{citation.line}  {citation.quote[:80]!r}")
    print(f"[{result.status} · {result.usage.calls} calls · {result.elapsed_s:.1f}s]")


if __name__ == "__main__":
    main()
