"""``python -m rlm_graph``: the same command line as ``rlm-graph``."""

from rlm_graph.cli import main

if __name__ == "__main__":
    main()
