"""The ``rlm/`` LiteLLM provider through the real litellm.completion and Router.

Inner model calls go to the repo's ScriptedModel double (answering by regex).
"""

from __future__ import annotations

import litellm
import pytest
from litellm_rlm_graph import PROVIDER, register

from ..conftest import numbered_paragraphs, text_reply

NEEDLE = "The secret code word is HELIOTROPE."
QUESTION = "What is the secret code word?"


@pytest.fixture
def provider():
    registered = register(context_window=4096, chunk_tokens=200)
    yield registered
    litellm.custom_provider_map = [
        e for e in litellm.custom_provider_map if e["provider"] != PROVIDER
    ]


def test_completion_answers_over_a_long_system_message_with_usage(scripted, provider):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(40, needle_at={27: NEEDLE})

    response = litellm.completion(
        model="rlm/scripted/m",
        messages=[
            {"role": "system", "content": text},
            {"role": "user", "content": QUESTION},
        ],
    )

    assert response.choices[0].message.content.startswith("HELIOTROPE")
    assert NEEDLE in response.choices[0].message.content
    assert response.usage.prompt_tokens == sum(r.prompt_tokens for r in double.requests)
    assert (
        response.usage.total_tokens
        == response.usage.prompt_tokens + response.usage.completion_tokens
    )
    assert len(double.requests) > 3
    assert {r.model for r in double.requests} == {"m"}, (
        "the worker model named after rlm/ read the spans"
    )


async def test_acompletion_and_streaming_report_usage(scripted, provider):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    message = numbered_paragraphs(40, needle_at={27: NEEDLE}) + "\n\n" + QUESTION
    other = numbered_paragraphs(40, needle_at={12: NEEDLE}) + "\n\n" + QUESTION

    response = await litellm.acompletion(
        model="rlm/scripted/m", messages=[{"role": "user", "content": message}]
    )
    double.reset()
    stream = await litellm.acompletion(
        model="rlm/scripted/m",
        messages=[{"role": "user", "content": other}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert response.choices[0].message.content.startswith("HELIOTROPE")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.startswith("HELIOTROPE")
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    # Calls answered from the run store's call log are not sent, so not counted:
    # the spans the two texts share cost nothing the second time.
    assert (
        usage
        and usage[-1].prompt_tokens == sum(r.prompt_tokens for r in double.requests) > 0
    )


async def test_router_deployment_reaches_the_provider(scripted, provider):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    router = litellm.Router(
        model_list=[
            {"model_name": "long-reader", "litellm_params": {"model": "rlm/scripted/m"}}
        ]
    )
    text = numbered_paragraphs(30, needle_at={9: NEEDLE})

    response = await router.acompletion(
        model="long-reader",
        messages=[
            {"role": "system", "content": text},
            {"role": "user", "content": QUESTION},
        ],
    )

    assert response.choices[0].message.content.startswith("HELIOTROPE")


def test_bad_requests_raise_litellm_bad_request_errors(scripted, provider):
    double = scripted(text_reply(r"(x)"))

    with pytest.raises(
        litellm.BadRequestError, match="Nothing to read besides the question"
    ):
        litellm.completion(
            model="rlm/scripted/m", messages=[{"role": "user", "content": QUESTION}]
        )
    with pytest.raises(litellm.BadRequestError, match="names no worker model"):
        litellm.completion(
            model="rlm/rlm/scripted/m", messages=[{"role": "user", "content": "a\n\nb"}]
        )
    with pytest.raises(litellm.BadRequestError, match="rlm-graph reads text only"):
        litellm.completion(
            model="rlm/scripted/m",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                }
            ],
        )
    assert double.requests == []
