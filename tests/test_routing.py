"""Routing through the LiteLLM Router: router config, fallbacks, limits, quotas."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest
import yaml

from rlm_graph import ConfigError, ContextWindowError, RunConfig
from rlm_graph.models import ModelClient
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply

KEY = "sk-fake-routing-key"


def ask(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def deployment(server: FakeOpenAIServer, group: str, model: str, **extra) -> dict:
    info = extra.pop("model_info", {"max_input_tokens": 4096})
    params = {
        "model": f"openai/{model}",
        "api_base": server.api_base,
        "api_key": KEY,
        **extra,
    }
    return {"model_name": group, "litellm_params": params, "model_info": info}


def client_with(tmp_path, model_list: list[dict], **settings) -> ModelClient:
    router_settings = settings.pop("router_settings", {})
    roles = settings.pop("roles", None)
    data = {"model_list": model_list, "router_settings": router_settings}
    if roles:
        data["roles"] = roles
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(data))
    return ModelClient(RunConfig(router_config=path, **settings))


def by_model(**replies) -> callable:
    """A responder choosing each reply by the model name the request was sent to."""

    def respond(request: ModelRequest) -> Reply | str:
        reply = replies[request.model]
        return reply(request) if callable(reply) else reply

    return respond


def sent_to(server: FakeOpenAIServer, model: str) -> list[ModelRequest]:
    return [r for r in server.requests if r.model == model]


async def test_router_config_maps_roles_to_groups(tmp_path):
    with FakeOpenAIServer(by_model(small="from small", large="from large")) as server:
        client = client_with(
            tmp_path,
            [
                deployment(
                    server, "fast", "small", model_info={"max_input_tokens": 2000}
                ),
                deployment(
                    server, "big", "large", model_info={"max_input_tokens": 30000}
                ),
            ],
            roles={"root": "big", "worker": "fast"},
        )
        worker = await client.complete("worker", ask(), max_tokens=8)
        root = await client.complete("root", ask(), max_tokens=8)
        judge = await client.complete("judge", ask("judge this"), max_tokens=8)

    assert (worker.text, root.text, judge.text) == (
        "from small",
        "from large",
        "from large",
    )
    assert client.window("worker") == 2000 and client.window("root") == 30000
    assert client.models == {
        "root": "openai/large",
        "worker": "openai/small",
        "judge": "openai/large",
    }


async def test_fallback_after_retries_logs_one_line_with_the_reason(tmp_path, caplog):
    replies = by_model(primary=Reply(error="server_error"), backup="from backup")
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "primary"),
                deployment(server, "spare", "backup"),
            ],
            router_settings={"fallbacks": [{"worker": ["spare"]}]},
            max_retries=1,
        )
        with caplog.at_level(logging.INFO, logger="rlm_graph"):
            completion = await client.complete("worker", ask(), max_tokens=8)

    assert completion.text == "from backup"
    assert len(sent_to(server, "primary")) == 2 and len(sent_to(server, "backup")) == 1
    retries = [
        r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()
    ]
    fallbacks = [
        r.getMessage() for r in caplog.records if "falling back" in r.getMessage()
    ]
    assert len(retries) == 1 and "InternalServerError" in retries[0]
    assert len(fallbacks) == 1 and "from worker to spare" in fallbacks[0]
    assert "InternalServerError" in fallbacks[0]


async def test_fallback_with_a_smaller_window_never_gets_a_larger_prompt(tmp_path):
    long_prompt = ask("word " * 300)
    replies = by_model(primary=Reply(error="server_error"), tiny="from tiny")
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "primary"),
                deployment(
                    server, "spare", "tiny", model_info={"max_input_tokens": 100}
                ),
            ],
            router_settings={"fallbacks": [{"worker": ["spare"]}]},
            max_retries=0,
        )
        with pytest.raises(ContextWindowError, match="spare"):
            await client.complete("worker", long_prompt, max_tokens=8)
        assert sent_to(server, "tiny") == [], (
            "the small fallback must not see the long prompt"
        )

        short = await client.complete("worker", ask("short"), max_tokens=8)
    assert short.text == "from tiny"
    assert all(r.prompt_tokens + 8 <= 100 for r in sent_to(server, "tiny"))


async def test_context_error_goes_to_a_larger_group_not_the_same_one_again(tmp_path):
    wording = "the request exceeds the available context size, try increasing it"
    replies = by_model(
        small=Reply(error="bad_request", error_message=wording), large="from large"
    )
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "small"),
                deployment(
                    server, "big", "large", model_info={"max_input_tokens": 100000}
                ),
            ],
            router_settings={"context_window_fallbacks": [{"worker": ["big"]}]},
            max_retries=3,
        )
        completion = await client.complete("worker", ask(), max_tokens=8)

    assert completion.text == "from large"
    assert len(sent_to(server, "small")) == 1, "a context error is never resent as is"


async def test_deployments_sharing_a_quota_are_not_retried_back_to_back(tmp_path):
    replies = by_model(
        east=Reply(error="rate_limit", retry_after="1"), west="from west"
    )
    shared = {"max_input_tokens": 4096, "quota": "one-account"}
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "east", model_info=shared),
                deployment(server, "twin", "west", model_info=shared),
            ],
            router_settings={"fallbacks": [{"worker": ["twin"]}]},
            max_retries=0,
        )
        completion = await client.complete("worker", ask(), max_tokens=8)
        gap = (
            sent_to(server, "west")[0].received_at
            - sent_to(server, "east")[0].received_at
        )

    assert completion.text == "from west"
    assert gap >= 0.95, f"twin on the same quota was called {gap:.2f} s after the 429"


async def test_separate_quotas_fall_back_at_once(tmp_path):
    replies = by_model(
        east=Reply(error="rate_limit", retry_after="1"), west="from west"
    )
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "east"),
                deployment(server, "other", "west"),
            ],
            router_settings={"fallbacks": [{"worker": ["other"]}]},
            max_retries=0,
        )
        await client.complete("worker", ask(), max_tokens=8)
        gap = (
            sent_to(server, "west")[0].received_at
            - sent_to(server, "east")[0].received_at
        )

    assert gap < 0.5


async def test_a_rate_limit_pauses_other_calls_to_the_same_quota(tmp_path):
    seen: list[str] = []

    def respond(request: ModelRequest) -> Reply | str:
        seen.append(request.prompt)
        if request.prompt == "first" and seen.count("first") == 1:
            return Reply(error="rate_limit", retry_after="1")
        return "ok"

    with FakeOpenAIServer(respond) as server:
        client = client_with(
            tmp_path, [deployment(server, "worker", "m")], max_retries=2
        )
        first = asyncio.create_task(
            client.complete("worker", ask("first"), max_tokens=8)
        )
        await asyncio.sleep(0.3)
        await client.complete("worker", ask("second"), max_tokens=8)
        await first
        times = {r.prompt: r.received_at for r in server.requests}
        t0 = server.requests[0].received_at

    assert times["second"] - t0 >= 0.95, (
        "a call to a rate-limited quota waited for Retry-After"
    )


async def test_rpm_limit_paces_requests(tmp_path):
    with FakeOpenAIServer(lambda r: "ok") as server:
        client = client_with(
            tmp_path, [deployment(server, "worker", "m", rpm=120)], concurrency=8
        )
        await asyncio.gather(
            *(client.complete("worker", ask(f"q{i}"), max_tokens=8) for i in range(6))
        )
        times = sorted(r.received_at for r in server.requests)

    # 120 rpm is 2 a second: a burst of 2, then one every 0.5 s.
    assert times[-1] - times[0] >= 1.9
    gaps = [b - a for a, b in itertools.pairwise(times[2:])]
    assert min(gaps) >= 0.4


async def test_tpm_limit_paces_by_tokens(tmp_path):
    with FakeOpenAIServer(lambda r: "ok") as server:
        client = client_with(
            tmp_path, [deployment(server, "worker", "m", tpm=3000)], concurrency=8
        )
        requests = [ask(f"question number {i} " + "pad " * 20) for i in range(5)]
        tokens = client.count_tokens("worker", requests[0][0]["content"]) + 50
        await asyncio.gather(
            *(client.complete("worker", m, max_tokens=50) for m in requests)
        )
        times = sorted(r.received_at for r in server.requests)

    # 50 tokens a second with a 50-token bucket: every request after the
    # first waits for its own tokens.
    expected = 4 * tokens / 50
    assert times[-1] - times[0] >= 0.9 * expected


async def test_per_model_parallel_limit_under_a_larger_global_one(tmp_path):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.15)) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "m", max_parallel_requests=2),
            ],
            concurrency=8,
        )
        await asyncio.gather(
            *(client.complete("worker", ask(f"q{i}"), max_tokens=8) for i in range(8))
        )
        assert server.max_in_flight == 2


async def test_cooldown_takes_a_failing_deployment_out_of_its_group(tmp_path):
    replies = by_model(broken=Reply(error="server_error"), good="ok")
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "broken"),
                deployment(server, "worker", "good"),
            ],
            router_settings={"allowed_fails": 0, "cooldown_time": 60},
            max_retries=3,
            concurrency=1,
        )
        for i in range(12):
            assert (
                await client.complete("worker", ask(f"q{i}"), max_tokens=8)
            ).text == "ok"

    assert len(sent_to(server, "broken")) <= 1, (
        "a cooled-down deployment gets no more calls"
    )
    assert len(sent_to(server, "good")) == 12


async def test_per_call_timeout_from_the_router_config(tmp_path):
    replies = by_model(slow=Reply(error="timeout"), quick="quick")
    with FakeOpenAIServer(replies) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "slow", timeout=0.5),
                deployment(server, "spare", "quick"),
            ],
            router_settings={"fallbacks": [{"worker": ["spare"]}]},
            max_retries=0,
        )
        started = time.monotonic()
        completion = await client.complete("worker", ask(), max_tokens=8)

    assert completion.text == "quick"
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model_list: []", "model_list"),
        (
            "model_list: [{model_name: w, litellm_params: {}}]",
            "has no litellm_params.model",
        ),
        (
            "model_list: [{model_name: w, litellm_params: {model: openai/x}}]\n"
            "router_settings: {fallbacks: [{w: [nowhere]}]}",
            "group 'nowhere'",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x}},"
            " {model_name: b, litellm_params: {model: openai/y}}]",
            "roles: {root: GROUP",
        ),
        (
            "model_list: [{model_name: w, litellm_params: {model: openai/x}}]\n"
            "router_settings: {cooldown_tme: 3}",
            "cooldown_tme",
        ),
        ("model_list: [ {", "not valid YAML"),
    ],
    ids=[
        "empty",
        "no-model",
        "unknown-fallback",
        "no-root",
        "misspelt-setting",
        "bad-yaml",
    ],
)
def test_router_config_mistakes_are_config_errors(tmp_path, content, message):
    path = tmp_path / "router.yaml"
    path.write_text(content)
    with pytest.raises(
        ConfigError, match=message.replace("{", r"\{").replace("'", "'")
    ):
        ModelClient(RunConfig(router_config=path))


def test_missing_router_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read the router config"):
        ModelClient(RunConfig(router_config=tmp_path / "nope.yaml"))


async def test_a_429_pauses_every_deployment_on_its_quota_and_no_other(tmp_path):
    limited: list[float] = []

    def respond(request: ModelRequest) -> Reply | str:
        if request.model == "east" and not limited:
            limited.append(request.received_at)
            return Reply(error="rate_limit", retry_after="1")
        return f"from {request.model}"

    team = {"max_input_tokens": 4096, "quota": "team-account"}
    own = {"max_input_tokens": 4096, "quota": "own-account"}
    with FakeOpenAIServer(respond) as server:
        client = client_with(
            tmp_path,
            [
                deployment(server, "worker", "east", model_info=team),
                deployment(server, "worker", "west", model_info=team),
                deployment(server, "worker", "north", model_info=own),
                deployment(server, "big", "south", model_info=team),
            ],
            roles={"root": "big", "worker": "worker"},
            max_retries=2,
            concurrency=1,
        )
        root_call = None
        for i in range(400):
            await client.complete("worker", ask(f"q{i}"), max_tokens=8)
            if limited and root_call is None:
                # A group of one deployment on the paused quota waits it out.
                root_call = asyncio.create_task(
                    client.complete("root", ask("root"), max_tokens=8)
                )
            if limited and time.monotonic() - limited[0] > 1.3:
                break
        await root_call

    pause = (limited[0], limited[0] + 0.95)
    during = [r for r in server.requests if pause[0] < r.received_at < pause[1]]
    on_team = [r.model for r in during if r.model in ("east", "west", "south")]
    assert on_team == [], f"deployments on the paused quota were called: {on_team}"
    assert any(r.model == "north" for r in during), "another quota kept working"
    assert sent_to(server, "south")[0].received_at >= pause[1]
    assert client.usage.calls == len(server.requests)


@pytest.mark.parametrize(
    ("section", "entry", "key", "closest"),
    [
        (
            "model_info",
            {"max_input_token": 8192},
            "max_input_token",
            "max_input_tokens",
        ),
        ("model_info", {"qouta": "team"}, "qouta", "quota"),
        (
            "model_info",
            {"input_cost_per_tokn": 1e-6},
            "input_cost_per_tokn",
            "input_cost_per_token",
        ),
        ("litellm_params", {"rmp": 60}, "rmp", "rpm"),
        ("litellm_params", {"api_bse": "http://127.0.0.1:9/v1"}, "api_bse", "api_base"),
        ("litellm_params", {"timout": 3}, "timout", "timeout"),
        (
            "litellm_params",
            {"max_parallel_request": 2},
            "max_parallel_request",
            "max_parallel_requests",
        ),
    ],
)
def test_misspelt_deployment_keys_are_refused_with_the_closest_key(
    tmp_path, section, entry, key, closest
):
    item = {
        "model_name": "fast",
        "litellm_params": {"model": "openai/small"},
        "model_info": {},
    }
    item[section].update(entry)
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model_list": [item]}))
    with pytest.raises(ConfigError) as caught:
        ModelClient(RunConfig(router_config=path))

    message = str(caught.value)
    assert f"'{key}'" in message and f"'{closest}'" in message, message
    assert "'fast' (openai/small)" in message and section in message
    assert "\n" not in message


def test_every_key_litellms_types_name_is_accepted(tmp_path):
    from litellm.types.router import LiteLLM_Params, ModelInfo

    params = {k: None for k in LiteLLM_Params.model_fields if k not in ("model",)}
    info = {k: None for k in ModelInfo.model_fields if k != "id"}
    item = {
        "model_name": "fast",
        # Keys of LiteLLM's own, and one a provider takes that no type names.
        "litellm_params": {"model": "openai/small", **params, "keep_alive": "5m"},
        "model_info": {**info, "max_input_tokens": 8192, "quota": "team"},
    }
    from rlm_graph._routing import _check_keys, _Deployment

    _check_keys(_Deployment.model_validate(item), "router config")
    # The Router takes these too, though its pydantic model does not list them.
    for key in ("weight", "order", "max_parallel_requests", "seed", "extra_headers"):
        _check_keys(
            _Deployment.model_validate(
                {**item, "litellm_params": {"model": "openai/x", key: 1}}
            ),
            "router config",
        )


async def test_model_flags_pick_router_groups_for_their_roles(tmp_path):
    with FakeOpenAIServer(by_model(small="from small", large="from large")) as server:
        path = tmp_path / "router.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "model_list": [
                        deployment(server, "fast", "small"),
                        deployment(server, "big", "large"),
                    ],
                    "roles": {"root": "big", "worker": "fast"},
                }
            )
        )
        client = ModelClient(
            RunConfig(router_config=path, model="fast", worker_model="big")
        )
        root = await client.complete("root", ask(), max_tokens=8)
        worker = await client.complete("worker", ask(), max_tokens=8)

        # Two groups and no roles: --model alone says which is the root.
        path.write_text(
            yaml.safe_dump(
                {
                    "model_list": [
                        deployment(server, "fast", "small"),
                        deployment(server, "big", "large"),
                    ]
                }
            )
        )
        only_model = ModelClient(RunConfig(router_config=path, model="big"))

    assert (root.text, worker.text) == ("from small", "from large")
    assert client.table.roles == {"root": "fast", "worker": "big", "judge": "fast"}
    assert only_model.table.roles == {"root": "big", "worker": "big", "judge": "big"}


@pytest.mark.parametrize(
    ("setting", "flag"),
    [
        ("model", "--model"),
        ("worker_model", "--worker-model"),
        ("judge_model", "--judge-model"),
    ],
)
def test_a_model_flag_naming_no_group_is_refused_with_the_groups(
    tmp_path, setting, flag
):
    path = tmp_path / "router.yaml"
    path.write_text(
        "model_list:\n"
        "  - {model_name: fast, litellm_params: {model: openai/small}}\n"
        "  - {model_name: big, litellm_params: {model: openai/large}}\n"
        "roles: {root: big, worker: fast}\n"
    )
    with pytest.raises(ConfigError) as caught:
        ModelClient(RunConfig(router_config=path, **{setting: "openai/gpt-4o"}))

    message = str(caught.value)
    assert flag in message and "'openai/gpt-4o'" in message
    assert "big, fast" in message and "\n" not in message


def test_cli_model_flag_with_router_config_naming_no_group_exits_2(tmp_path):
    from click.testing import CliRunner

    from rlm_graph.cli import main

    path = tmp_path / "router.yaml"
    path.write_text(
        "model_list: [{model_name: fast, litellm_params: {model: openai/small}}]\n"
    )
    source = tmp_path / "notes.txt"
    source.write_text("Some notes.\n")
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "What?",
            "--router-config",
            str(path),
            "--worker-model",
            "openai/gpt-4o",
        ],
    )

    assert result.exit_code == 2, result.output
    assert "--worker-model" in result.stderr and "fast" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_router_refusals_are_not_calls_and_do_not_spend_the_budget(
    tmp_path, caplog
):
    with FakeOpenAIServer(lambda r: "ok") as server:
        client = client_with(
            tmp_path,
            [deployment(server, "worker", "a"), deployment(server, "worker", "b")],
            max_retries=3,
            max_calls=1,
        )
        # Both deployments cooling down (as after failures with allowed_fails):
        # the Router refuses the first attempt without sending anything.
        cooldowns = client.router.health().cooldowns
        for deployment_id in client.table.groups["worker"].deployments:
            cooldowns.add_deployment_to_cooldown(
                deployment_id, RuntimeError("failed"), 500, 0.5
            )
        with caplog.at_level(logging.DEBUG, logger="rlm_graph"):
            completion = await client.complete("worker", ask(), max_tokens=8)

    refusals = [
        r for r in caplog.records if "No deployments available" in r.getMessage()
    ]
    assert completion.text == "ok"
    assert refusals, "the Router refused an attempt while both cooled down"
    assert len(refusals) == 1 and refusals[0].levelno == logging.DEBUG, (
        "refusals of one call are logged once, at debug"
    )
    assert len(server.requests) == 1
    assert client.usage.calls == client.budget.calls == 1, (
        "a refused attempt is no call, and --max-calls 1 still let the real one go"
    )


def test_a_hosted_worker_from_a_router_config_reads_window_sized_spans(tmp_path):
    from rlm_graph.api import prepare
    from rlm_graph.nodes.plan import LOCAL_LEAF_TOKENS

    path = tmp_path / "router.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: worker\n"
        "    litellm_params: {model: openai/small, api_base: 'http://127.0.0.1:9/v1'}\n"
        "    model_info: {max_input_tokens: 16000}\n"
    )
    engine = prepare("What?", text="word " * 20000, router_config=path)

    assert engine.plan.leaf_tokens > 4 * LOCAL_LEAF_TOKENS, (
        "only the embedded model reads 1,500-token spans by default"
    )
