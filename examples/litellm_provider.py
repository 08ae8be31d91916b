"""Any LiteLLM caller gets recursive answers: ``model="rlm/<worker model>"``.

Run from the repository root: ``.venv/bin/python examples/litellm_provider.py``.
The worker model is ``RLM_GRAPH_WORKER_MODEL`` or ``RLM_GRAPH_MODEL`` (default:
the embedded model).
"""

from __future__ import annotations

import os
from pathlib import Path

# LiteLLM fetches its price map from the internet when it is imported, unless
# told to use the copy it ships: set this before the first `import litellm`.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm_rlm_graph import register  # noqa: E402

from rlm_graph import RunConfig  # noqa: E402

BOOK = Path(__file__).with_name("alice_in_wonderland.txt")
QUESTION = "What were the names of the three sisters in the Dormouse's story?"


def main() -> None:
    register(filter="sisters")
    worker = RunConfig().leaf_model

    response = litellm.completion(
        model=f"rlm/{worker}",
        messages=[
            {"role": "system", "content": BOOK.read_text(encoding="utf-8")},
            {"role": "user", "content": QUESTION},
        ],
    )

    print(response.choices[0].message.content)
    print(
        f"model {response.model}; usage {response.usage.prompt_tokens} prompt + "
        f"{response.usage.completion_tokens} completion tokens"
    )


if __name__ == "__main__":
    main()
