"""``python -m rlm_graph``: the same command line as ``rlm-graph``."""

from rlm_graph.cli import entry

if __name__ == "__main__":
    entry()
