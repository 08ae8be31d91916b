"""Any OpenAI client can use rlm-graph through ``rlm-graph serve``.

Run from the repository root: ``.venv/bin/python examples/openai_client.py``.
This script starts the server itself, on 127.0.0.1 and a free port, for the
length of the script; in real use run ``rlm-graph serve`` and point any client
(any language) at ``http://127.0.0.1:8765/v1``. Models come from
``RLM_GRAPH_*`` variables (default: the embedded model).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import openai

from rlm_graph import RunConfig
from rlm_graph.serve import ServeSettings, serve_in_thread, served_model_id

BOOK = Path(__file__).with_name("alice_in_wonderland.txt")
QUESTION = "What were the names of the three sisters in the Dormouse's story?"


def main() -> None:
    config = RunConfig(filter="sisters")
    token = secrets.token_urlsafe(16)
    with serve_in_thread(config, ServeSettings(port=0, token=token)) as url:
        client = openai.OpenAI(base_url=url, api_key=token)
        response = client.chat.completions.create(
            model=served_model_id(config),
            messages=[
                {"role": "system", "content": BOOK.read_text(encoding="utf-8")},
                {"role": "user", "content": QUESTION},
            ],
        )

    print(response.choices[0].message.content)
    print(
        f"usage: {response.usage.total_tokens} tokens; run {response.model_extra['rlm_graph']['run_id']}"
    )


if __name__ == "__main__":
    main()
