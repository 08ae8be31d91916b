"""The routing table of a run: roles, router groups, fallbacks and limits.

A run's models come either from flags (``--model``, ``--worker-model``,
``--judge-model``: one router group per role) or from a LiteLLM proxy-style YAML
file (``--router-config``). Either way this module produces one
:class:`RoutingTable`: the ``model_list`` and settings the LiteLLM Router is
built from, which group plays each role, the fallback chains, and for every
group what the client enforces itself (window, rpm/tpm pace, parallel calls,
the quota it draws on, prices).

It also holds the two small async limiters the client uses: a token bucket
(:class:`Pacer`) and a per-quota pause after a rate-limit answer
(:class:`QuotaGates`). It makes no model call.

The YAML file, with the rlm-graph extensions marked::

    model_list:
      - model_name: fast                 # a router group
        litellm_params:
          model: openai/small
          api_base: http://127.0.0.1:8000/v1
          api_key: os.environ/SMALL_KEY  # read by LiteLLM, never by us
          rpm: 600
          tpm: 200000
          max_parallel_requests: 8
          timeout: 60
        model_info:
          max_input_tokens: 8192
          input_cost_per_token: 0.0000001
          output_cost_per_token: 0.0000004
          quota: team-account            # rlm-graph: groups sharing one quota
    router_settings:
      fallbacks: [{fast: [big]}]
      context_window_fallbacks: [{fast: [big]}]
      cooldown_time: 30
      allowed_fails: 2
    roles: {root: big, worker: fast}     # rlm-graph: role -> group

Keys inside ``litellm_params`` and ``model_info`` are checked against the
fields of LiteLLM's own types (so a key a newer LiteLLM adds is known without
a list kept here): an unknown ``model_info`` key, or an unknown
``litellm_params`` key close to a known one, is refused with the closest
valid key. Other unknown ``litellm_params`` keys go to the provider as they
are (providers take parameters of their own), with a log line.

The flags ``--model``, ``--worker-model`` and ``--judge-model`` may name a
group of the file: the flag then picks that group for its role, over the
file's ``roles``.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError

__all__ = [
    "Deployment",
    "Group",
    "Pacer",
    "QuotaGates",
    "Role",
    "RoutingTable",
    "routing_table",
]

logger = logging.getLogger(__name__)

Role = Literal["root", "worker", "judge"]
ROLES: tuple[Role, ...] = ("root", "worker", "judge")

# Router settings passed through from the YAML file; anything else there is
# rejected so a misspelt setting is not silently ignored.
_ROUTER_SETTINGS = frozenset(
    {
        "cooldown_time",
        "allowed_fails",
        "routing_strategy",
        "retry_after",
        "disable_cooldowns",
        "enable_pre_call_checks",
    }
)
OUR_MODEL_INFO_KEYS = frozenset({"quota"})
"""``model_info`` keys rlm-graph reads that LiteLLM does not know."""
CLOSE_KEY_RATIO = 0.8
"""How alike (difflib ratio) an unknown key and a known one must be for the
unknown one to count as a misspelling of it."""
_ROLE_FLAGS: dict[Role, str] = {
    "root": "--model",
    "worker": "--worker-model",
    "judge": "--judge-model",
}
_ROLE_SETTINGS: dict[Role, str] = {
    "root": "model",
    "worker": "worker_model",
    "judge": "judge_model",
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """One entry of the model list: one place a call of its group may go."""

    id: str
    """The Router's deployment id (``model_info.id``; made up when not given)."""
    group: str
    model: str
    """Its LiteLLM model name."""
    api_base: str | None
    timeout_s: float
    """Per-attempt timeout, in seconds."""
    quota: str
    """The quota it draws on; a 429 from it pauses every deployment on it."""

    def describe(self) -> str:
        """The model and, when it has one, the server: for messages."""
        return f"{self.model} at {self.api_base}" if self.api_base else self.model


@dataclass(frozen=True, slots=True)
class Group:
    """One router group as the client sees it (limits summed over deployments)."""

    name: str
    models: tuple[str, ...]
    """LiteLLM model names of the group's deployments."""
    window: int
    """Smallest input window among the deployments, in tokens."""
    timeout_s: float
    """Longest per-attempt timeout among the deployments."""
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    quotas: frozenset[str] = frozenset()
    """Quotas the group's deployments draw on."""
    deployments: tuple[str, ...] = ()
    """Ids of the group's deployments (keys of :attr:`RoutingTable.deployments`)."""
    price_in: float | None = None
    """USD per prompt token (the dearest deployment's); None: unknown."""
    price_out: float | None = None

    @property
    def is_local(self) -> bool:
        """Whether every deployment is the embedded model (which costs nothing)."""
        return all(model.startswith("local/") for model in self.models)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Everything the client needs to build its Router and route calls."""

    model_list: list[dict[str, Any]]
    roles: dict[Role, str]
    groups: dict[str, Group]
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    context_fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    router_settings: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    """Every deployment, by id."""

    def chain(self, role: Role) -> list[str]:
        """The groups a call of ``role`` may go to, in order: its own, then fallbacks."""
        first = self.roles[role]
        return [first, *(g for g in self.fallbacks.get(first, ()) if g != first)]

    def sharing_quota(self, quota: str) -> list[Deployment]:
        """Every deployment, of any group, that draws on ``quota``."""
        return [d for d in self.deployments.values() if d.quota == quota]


class _Deployment(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_name: str = Field(min_length=1)
    litellm_params: dict[str, Any]
    model_info: dict[str, Any] = Field(default_factory=dict)


class _RouterFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_list: list[_Deployment] = Field(min_length=1)
    router_settings: dict[str, Any] = Field(default_factory=dict)
    litellm_settings: dict[str, Any] = Field(default_factory=dict)
    roles: dict[str, str] = Field(default_factory=dict)


def routing_table(
    config: RunConfig,
    window_of: Callable[[str], int],
    price_of: Callable[[str], tuple[float, float] | None],
    check_model: Callable[[str], None] = lambda model: None,
) -> RoutingTable:
    """Build the routing table from the router config file, or else the flags.

    Args:
        config: the run configuration.
        check_model: raises ConfigError for a model name LiteLLM cannot use;
            called for every model before anything else is asked about it.
        window_of: input window of a LiteLLM model name (price map or override).
        price_of: (USD per prompt token, per completion token) of a model name
            from LiteLLM's price map; None when it has none.

    Raises:
        ConfigError: the file cannot be read or does not describe a usable router.
    """
    if config.router_config is not None:
        data = _read_yaml(config.router_config)
        table = _table_from_file(
            data, config, check_model, price_of, config.router_config
        )
    else:
        for model in dict.fromkeys(
            (config.root_model, config.leaf_model, config.judge)
        ):
            check_model(model)
        table = _table_from_flags(config, price_of)
    _check_prices(config, table)

    return _with_windows(table, window_of)


def _check_prices(config: RunConfig, table: RoutingTable) -> None:
    """Refuse a cost budget when some model's price is unknown (it is never free)."""
    if config.max_cost is None:
        return
    unpriced = sorted(
        {m for g in table.groups.values() if g.price_in is None for m in g.models}
    )
    if unpriced:
        msg = (
            f"--max-cost needs prices, and LiteLLM's price map has none for "
            f"{', '.join(unpriced)}. Give them with --price-in and --price-out "
            "(USD per million prompt and completion tokens), or as "
            "input_cost_per_token/output_cost_per_token in the router config's model_info."
        )
        raise ConfigError(msg)


def _with_windows(table: RoutingTable, window_of: Callable[[str], int]) -> RoutingTable:
    """Fill in the windows the config did not state, from LiteLLM's model map."""
    for name, group in table.groups.items():
        if group.window <= 0:
            table.groups[name] = replace(
                group, window=min(window_of(m) for m in group.models)
            )
    return table


def _table_from_flags(
    config: RunConfig,
    price_of: Callable[[str], tuple[float, float] | None],
) -> RoutingTable:
    names: dict[Role, str] = {
        "root": config.root_model,
        "worker": config.leaf_model,
        "judge": config.judge,
    }
    deployments = {
        f"{role}#0": Deployment(
            id=f"{role}#0",
            group=role,
            model=model,
            api_base=None if model.startswith("local/") else config.api_base,
            timeout_s=config.timeout_s,
            quota=f"model:{model}",
        )
        for role, model in names.items()
    }
    model_list = [
        {
            "model_name": d.group,
            "litellm_params": _flag_params(config, d.model),
            "model_info": {"id": d.id, **_flag_prices(config, d.model)},
        }
        for d in deployments.values()
    ]
    groups = {
        d.group: Group(
            name=d.group,
            models=(d.model,),
            window=0,
            timeout_s=config.timeout_s,
            quotas=frozenset({d.quota}),
            deployments=(d.id,),
            **_prices(config, [(d.model, {})], price_of),
        )
        for d in deployments.values()
    }
    return RoutingTable(
        model_list=model_list,
        roles={role: role for role in ROLES},
        groups=groups,
        deployments=deployments,
    )


def _flag_params(config: RunConfig, model: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": model,
        "timeout": config.timeout_s,
        "max_retries": 0,  # tenacity retries; never let the SDK nest its own
    }
    if config.api_base and not model.startswith("local/"):
        params["api_base"] = config.api_base
    if config.api_key is not None:
        params["api_key"] = config.api_key.get_secret_value()
    elif config.api_base and model.startswith("openai/") and not config.has_openai_key:
        # Local OpenAI-compatible servers rarely check keys, but the OpenAI
        # SDK refuses to send a request without one.
        params["api_key"] = "no-key-needed"
    return params


def _flag_prices(config: RunConfig, model: str) -> dict[str, float]:
    """User-given prices (``--price-in``/``--price-out``) as LiteLLM's model_info.

    LiteLLM then prices the deployment as rlm-graph does, for its own cost
    tracking and callbacks. It also spares LiteLLM's zero-cost diagnostic,
    which runs twice per reply of a deployment without a price and took a
    quarter of the event loop's time at 8 calls in flight (docs/design.md,
    "Throughput").
    """
    if model.startswith("local/") or (config.price_in is None and config.price_out is None):
        return {}
    given_in = config.price_in if config.price_in is not None else config.price_out
    given_out = config.price_out if config.price_out is not None else config.price_in
    price_in = float(given_in or 0) / 1e6
    # Cached prompt tokens at the full price, as rlm-graph's own accounting
    # counts them (never below the bill); it also keeps LiteLLM from warning
    # on every run that they would default to 0.
    return {
        "input_cost_per_token": price_in,
        "output_cost_per_token": float(given_out or 0) / 1e6,
        "cache_read_input_token_cost": price_in,
        "cache_creation_input_token_cost": price_in,
    }


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"Cannot read the router config {str(path)!r}: {exc.strerror}. Check the path."
        raise ConfigError(msg) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"The router config {str(path)!r} is not valid YAML: {exc}"
        raise ConfigError(msg) from exc


def _table_from_file(
    data: Any,
    config: RunConfig,
    check_model: Callable[[str], None],
    price_of: Callable[[str], tuple[float, float] | None],
    path: Path,
) -> RoutingTable:
    where = f"router config {str(path)!r}"
    try:
        parsed = _RouterFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = (
            f"The {where} is not a LiteLLM model_list file: {loc}: {first['msg']}. "
            "It needs 'model_list: [{model_name: ..., litellm_params: {model: ...}}]'."
        )
        raise ConfigError(msg) from exc

    by_group: dict[str, list[_Deployment]] = {}
    for deployment in parsed.model_list:
        if not deployment.litellm_params.get("model"):
            msg = f"In the {where}, deployment '{deployment.model_name}' has no litellm_params.model."
            raise ConfigError(msg)
        _check_keys(deployment, where)
        check_model(deployment.litellm_params["model"])
        by_group.setdefault(deployment.model_name, []).append(deployment)
    deployments = _deployments(parsed.model_list, config, where)

    settings = {**parsed.litellm_settings, **parsed.router_settings}
    fallbacks = _fallback_map(settings.pop("fallbacks", None), by_group, where)
    context_fallbacks = _fallback_map(
        settings.pop("context_window_fallbacks", None), by_group, where
    )
    unknown = sorted(set(settings) - _ROUTER_SETTINGS)
    if unknown:
        msg = (
            f"The {where} has settings rlm-graph does not use: {', '.join(unknown)}. "
            f"Known: fallbacks, context_window_fallbacks, {', '.join(sorted(_ROUTER_SETTINGS))}."
        )
        raise ConfigError(msg)

    roles = _roles(parsed.roles, by_group, where, _flag_roles(config))
    model_list = [
        {
            "model_name": d.model_name,
            "litellm_params": {
                "timeout": config.timeout_s,
                **d.litellm_params,
                "max_retries": 0,
            },
            "model_info": {
                **{
                    k: v
                    for k, v in d.model_info.items()
                    if k not in OUR_MODEL_INFO_KEYS
                },
                "id": deployment_id,
            },
        }
        for d, deployment_id in zip(parsed.model_list, deployments, strict=True)
    ]
    groups = {
        name: _group(
            name,
            members,
            [d for d in deployments.values() if d.group == name],
            price_of,
            config,
        )
        for name, members in by_group.items()
    }
    return RoutingTable(
        model_list=model_list,
        roles=roles,
        groups=groups,
        fallbacks=fallbacks,
        context_fallbacks=context_fallbacks,
        router_settings=settings,
        deployments=deployments,
    )


def _deployments(
    entries: list[_Deployment], config: RunConfig, where: str
) -> dict[str, Deployment]:
    """The deployment records of a file's model list, in its order, by id."""
    found: dict[str, Deployment] = {}
    for index, entry in enumerate(entries):
        given = entry.model_info.get("id")
        deployment_id = str(given) if given else f"{entry.model_name}#{index}"
        if deployment_id in found:
            msg = (
                f"In the {where}, two deployments have the id '{deployment_id}'; "
                "give each model_info.id a name of its own."
            )
            raise ConfigError(msg)
        params = entry.litellm_params
        _check_limits(entry, where)
        found[deployment_id] = Deployment(
            id=deployment_id,
            group=entry.model_name,
            model=params["model"],
            api_base=params.get("api_base"),
            timeout_s=float(params.get("timeout") or config.timeout_s),
            quota=str(entry.model_info.get("quota") or f"group:{entry.model_name}"),
        )
    return found


_POSITIVE_PARAMS = {
    "rpm": int,
    "tpm": int,
    "max_parallel_requests": int,
    "timeout": float,
    "stream_timeout": float,
}
"""``litellm_params`` that must be positive numbers, and the kind of number."""


def _check_limits(entry: _Deployment, where: str) -> None:
    """Refuse a limit or timeout that is not a positive number.

    Raises:
        ConfigError: naming the deployment, the key and the value.
    """
    for key, kind in _POSITIVE_PARAMS.items():
        value = entry.litellm_params.get(key)
        if value is None:
            continue
        number: float | None
        if isinstance(value, bool) or not isinstance(value, int | float):
            number = None
        else:
            number = float(value)
        whole = kind is not int or (number is not None and number.is_integer())
        if number is None or not number > 0 or not whole or number == float("inf"):
            what = (
                "a positive whole number"
                if kind is int
                else "a positive number of seconds"
            )
            msg = (
                f"In the {where}, deployment '{entry.model_name}' "
                f"({entry.litellm_params.get('model')}) has {key}: {value!r}; "
                f"it must be {what} (leave it out for no limit)."
            )
            raise ConfigError(msg)


def _group(
    name: str,
    entries: list[_Deployment],
    deployments: list[Deployment],
    price_of: Callable[[str], tuple[float, float] | None],
    config: RunConfig,
) -> Group:
    windows = []
    for d in entries:
        info_window = d.model_info.get("max_input_tokens") or d.model_info.get(
            "max_tokens"
        )
        # 0: not stated; filled in from LiteLLM's model map afterwards.
        windows.append(int(info_window) if info_window else 0)

    return Group(
        name=name,
        models=tuple(d.model for d in deployments),
        window=0 if 0 in windows else min(windows),
        timeout_s=max(d.timeout_s for d in deployments),
        deployments=tuple(d.id for d in deployments),
        rpm=_summed(d.litellm_params.get("rpm") for d in entries),
        tpm=_summed(d.litellm_params.get("tpm") for d in entries),
        max_parallel=_summed(
            d.litellm_params.get("max_parallel_requests") for d in entries
        ),
        quotas=frozenset(d.quota for d in deployments),
        **_prices(
            config,
            [(d.litellm_params["model"], d.model_info) for d in entries],
            price_of,
        ),
    )


def _prices(
    config: RunConfig,
    deployments: list[tuple[str, dict[str, Any]]],
    price_of: Callable[[str], tuple[float, float] | None],
) -> dict[str, float | None]:
    """Per-token prices of a group: the dearest deployment's; None if any is unknown."""
    prices_in, prices_out = [], []
    for model, info in deployments:
        if model.startswith("local/"):
            price: tuple[float, float] | None = (0.0, 0.0)
        elif info.get("input_cost_per_token") is not None:
            price = (
                float(info["input_cost_per_token"]),
                float(
                    info.get("output_cost_per_token") or info["input_cost_per_token"]
                ),
            )
        elif given := _flag_prices(config, model):
            price = (given["input_cost_per_token"], given["output_cost_per_token"])
        else:
            price = price_of(model)
        if price is None:
            return {"price_in": None, "price_out": None}
        prices_in.append(price[0])
        prices_out.append(price[1])
    return {"price_in": max(prices_in), "price_out": max(prices_out)}


def _summed(values: Iterable[Any]) -> int | None:
    """Sum of per-deployment limits; None when any deployment is unlimited."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += int(value)
    return total


def _fallback_map(
    raw: Any, groups: dict[str, Any], where: str
) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    entries = raw if isinstance(raw, list) else [raw]
    result: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            msg = f"In the {where}, fallbacks must be a list of {{group: [other groups]}}, not {entry!r}."
            raise ConfigError(msg)
        for primary, backups in entry.items():
            names = (backups,) if isinstance(backups, str) else tuple(backups or ())
            for name in (primary, *names):
                if name not in groups:
                    msg = (
                        f"In the {where}, fallback names group '{name}', which no "
                        f"model_list entry defines (groups: {', '.join(sorted(groups))})."
                    )
                    raise ConfigError(msg)
            result[primary] = result.get(primary, ()) + names
    return result


def _flag_roles(config: RunConfig) -> dict[Role, str]:
    """The groups the model flags (or settings) pick, by role."""
    found: dict[Role, str] = {}
    for role, setting in _ROLE_SETTINGS.items():
        name = getattr(config, setting)
        if name:
            found[role] = name
    return found


def _roles(
    raw: dict[str, str],
    groups: dict[str, Any],
    where: str,
    flags: dict[Role, str] | None = None,
) -> dict[Role, str]:
    for role, group in raw.items():
        if role not in ROLES:
            msg = f"In the {where}, roles names '{role}'; roles are root, worker and judge."
            raise ConfigError(msg)
        if group not in groups:
            msg = f"In the {where}, role '{role}' names group '{group}', which no model_list entry defines."
            raise ConfigError(msg)
    for role, group in (flags or {}).items():
        if group not in groups:
            setting = f"{_ROLE_FLAGS[role]} ({_ROLE_SETTINGS[role]})"
            msg = (
                f"{setting} is '{group}', which names no group of the {where}; "
                f"with --router-config it must name one of its groups: "
                f"{', '.join(sorted(groups))}."
            )
            raise ConfigError(msg)
    chosen: dict[str, str] = {**raw, **(flags or {})}
    for role in ROLES:
        if role not in chosen and role in groups:
            chosen[role] = role
    if "root" not in chosen and "worker" in chosen:
        chosen["root"] = chosen["worker"]
    if "root" not in chosen:
        if len(groups) != 1:
            msg = (
                f"The {where} does not say which group is the root model: add "
                f"'roles: {{root: GROUP, worker: GROUP}}' or name a group 'root'."
            )
            raise ConfigError(msg)
        chosen["root"] = next(iter(groups))
    chosen.setdefault("worker", chosen["root"])
    chosen.setdefault("judge", chosen["root"])
    return {role: chosen[role] for role in ROLES}


def _check_keys(entry: _Deployment, where: str) -> None:
    """Refuse misspelt keys in a deployment's ``litellm_params`` and ``model_info``.

    Raises:
        ConfigError: naming the key, the deployment and the closest valid key.
    """
    known_params, known_info = _known_keys()
    if not known_params:
        return
    name = f"'{entry.model_name}' ({entry.litellm_params.get('model')})"
    for key in entry.model_info:
        if key in known_info:
            continue
        closest = _closest(key, known_info)
        hint = (
            f"the closest valid key is '{closest}'"
            if closest
            else "valid keys include max_input_tokens, input_cost_per_token, "
            "output_cost_per_token, quota and id"
        )
        msg = (
            f"In the {where}, deployment {name} has an unknown model_info key "
            f"'{key}'; {hint}."
        )
        raise ConfigError(msg)
    for key in entry.litellm_params:
        if key in known_params:
            continue
        closest = _closest(key, known_params)
        if closest is None:
            # Providers take parameters of their own (Ollama's keep_alive, ...).
            logger.info(
                "router config: deployment %s: litellm_params key '%s' is not one "
                "LiteLLM's types name; passed to the provider as it is",
                name,
                key,
            )
            continue
        msg = (
            f"In the {where}, deployment {name} has an unknown litellm_params key "
            f"'{key}'; the closest valid key is '{closest}'."
        )
        raise ConfigError(msg)


def _closest(key: str, known: frozenset[str]) -> str | None:
    """The known key ``key`` is most likely a misspelling of, if any."""
    lowered = key.lower()
    if lowered in known:
        return lowered
    # difflib scores a swap of two letters low on short keys ("rmp"/"rpm": 0.67).
    swapped = [k for k in known if len(k) == len(key) and sorted(k) == sorted(lowered)]
    if swapped:
        return min(swapped)
    found = difflib.get_close_matches(lowered, known, n=1, cutoff=CLOSE_KEY_RATIO)
    return found[0] if found else None


@functools.cache
def _known_keys() -> tuple[frozenset[str], frozenset[str]]:
    """Keys LiteLLM reads in ``litellm_params`` and ``model_info``, from its types.

    ``litellm_params``: the fields of the Router's params model and typed dict,
    and the arguments of ``litellm.completion`` (a deployment may fix any of
    them). ``model_info``: the Router's model-info model and the fields of the
    model map entries, plus rlm-graph's own keys.
    """
    import litellm
    from litellm.types import router as router_types
    from litellm.types import utils as util_types

    params: set[str] = set()
    for kind in ("LiteLLM_Params", "GenericLiteLLMParams", "LiteLLMParamsTypedDict"):
        params |= _fields_of(getattr(router_types, kind, None))
    info: set[str] = set()
    info |= _fields_of(getattr(router_types, "ModelInfo", None))
    for kind in ("ModelInfoBase", "ModelInfo", "ProviderSpecificModelInfo"):
        info |= _fields_of(getattr(util_types, kind, None))
    if not params or not info:
        # A LiteLLM whose types moved: checking against a partial list would
        # refuse valid keys, so nothing is checked (and the log says so).
        logger.warning(
            "LiteLLM's router types were not found; router config keys are not checked"
        )
        return frozenset(), frozenset()
    arguments = inspect.signature(litellm.completion).parameters.values()
    params |= {
        a.name
        for a in arguments
        if a.kind not in (a.VAR_KEYWORD, a.VAR_POSITIONAL)
        and a.name not in ("messages", "model_list")
    }
    return frozenset(params), frozenset(info | OUR_MODEL_INFO_KEYS)


def _fields_of(kind: Any) -> set[str]:
    """Field names of a pydantic model or a TypedDict; none for anything else."""
    if kind is None:
        return set()
    fields = getattr(kind, "model_fields", None)
    if isinstance(fields, dict):
        return set(fields)
    keys = getattr(kind, "__required_keys__", frozenset()) | getattr(
        kind, "__optional_keys__", frozenset()
    )
    return set(keys)


class Pacer:
    """A token bucket: at most ``rate_per_s`` units a second, ``burst`` at once.

    A request larger than the burst waits for a full bucket and then passes,
    leaving the bucket in debt, so no request is refused for its size.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self._level = self.burst
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """Whether a request is waiting its turn (it holds the lock)."""
        return self._lock.locked()

    def delay(self, amount: float) -> float:
        """Seconds ``amount`` would wait if asked now (others waiting not counted)."""
        elapsed = self._clock() - self._stamp
        level = min(self.burst, self._level + elapsed * self.rate_per_s)
        need = min(amount, self.burst)
        return max(need - level, 0.0) / self.rate_per_s

    async def take(self, amount: float) -> float:
        """Wait until ``amount`` may pass, then take it; returns seconds waited."""
        waited = 0.0
        async with self._lock:
            while True:
                self._refill()
                need = min(amount, self.burst)
                if self._level >= need:
                    self._level -= amount
                    return waited
                pause = (need - self._level) / self.rate_per_s
                waited += pause
                await asyncio.sleep(pause)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(
            self.burst, self._level + (now - self._stamp) * self.rate_per_s
        )
        self._stamp = now


class QuotaGates:
    """Pauses every deployment on a quota after that quota answered "rate limited".

    Deployments that share one quota (one account behind two endpoints) would
    otherwise take turns failing: a retry or fallback sent at once to the
    twin meets the same exhausted quota. A group waits only while every one
    of its deployments is paused; the Router is told to skip the paused ones.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock

    def block(self, quota: str, seconds: float) -> None:
        """Hold back calls to ``quota`` for ``seconds`` from now."""
        until = self._clock() + seconds
        self._until[quota] = max(self._until.get(quota, 0.0), until)

    def paused_for(self, quota: str) -> float:
        """Seconds left of ``quota``'s pause; 0 when it is open."""
        return max(self._until.get(quota, 0.0) - self._clock(), 0.0)

    def pause_any(self, quotas: Iterable[str]) -> float:
        """Seconds until at least one of ``quotas`` is open; 0 if one is now."""
        return min((self.paused_for(q) for q in quotas), default=0.0)

    async def wait_any(self, quotas: Iterable[str], margin_s: float = 0.0) -> float:
        """Sleep until at least one of ``quotas`` is open; returns seconds waited.

        Args:
            quotas: the quotas of a group's deployments.
            margin_s: extra wait after a pause ends, so that whoever else
                keeps the same pause (the Router's cooldown) has ended it too.
        """
        waited = 0.0
        quotas = tuple(quotas)
        while True:
            pause = self.pause_any(quotas)
            if pause <= 0:
                return waited
            waited += pause + margin_s
            await asyncio.sleep(pause + margin_s)
