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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError

__all__ = ["Group", "Pacer", "QuotaGates", "Role", "RoutingTable", "routing_table"]

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
    """Quotas the group draws on; a 429 from it pauses every group sharing one."""
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

    def chain(self, role: Role) -> list[str]:
        """The groups a call of ``role`` may go to, in order: its own, then fallbacks."""
        first = self.roles[role]
        return [first, *(g for g in self.fallbacks.get(first, ()) if g != first)]


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
    model_list = [
        {"model_name": role, "litellm_params": _flag_params(config, model)}
        for role, model in names.items()
    ]
    groups = {
        role: Group(
            name=role,
            models=(model,),
            window=0,
            timeout_s=config.timeout_s,
            quotas=frozenset({f"model:{model}"}),
            **_prices(config, [(model, {})], price_of),
        )
        for role, model in names.items()
    }
    return RoutingTable(
        model_list=model_list, roles={role: role for role in ROLES}, groups=groups
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
        check_model(deployment.litellm_params["model"])
        by_group.setdefault(deployment.model_name, []).append(deployment)

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

    roles = _roles(parsed.roles, by_group, where)
    model_list = [
        {
            "model_name": d.model_name,
            "litellm_params": {
                "timeout": config.timeout_s,
                **d.litellm_params,
                "max_retries": 0,
            },
            "model_info": {k: v for k, v in d.model_info.items() if k != "quota"},
        }
        for d in parsed.model_list
    ]
    groups = {
        name: _group(name, deployments, config, price_of)
        for name, deployments in by_group.items()
    }
    return RoutingTable(
        model_list=model_list,
        roles=roles,
        groups=groups,
        fallbacks=fallbacks,
        context_fallbacks=context_fallbacks,
        router_settings=settings,
    )


def _group(
    name: str,
    deployments: list[_Deployment],
    config: RunConfig,
    price_of: Callable[[str], tuple[float, float] | None],
) -> Group:
    windows, timeouts, quotas = [], [], set()
    for d in deployments:
        info_window = d.model_info.get("max_input_tokens") or d.model_info.get(
            "max_tokens"
        )
        # 0: not stated; filled in from LiteLLM's model map afterwards.
        windows.append(int(info_window) if info_window else 0)
        timeouts.append(float(d.litellm_params.get("timeout") or config.timeout_s))
        quotas.add(str(d.model_info.get("quota") or f"group:{name}"))

    return Group(
        name=name,
        models=tuple(d.litellm_params["model"] for d in deployments),
        window=0 if 0 in windows else min(windows),
        timeout_s=max(timeouts),
        rpm=_summed(d.litellm_params.get("rpm") for d in deployments),
        tpm=_summed(d.litellm_params.get("tpm") for d in deployments),
        max_parallel=_summed(
            d.litellm_params.get("max_parallel_requests") for d in deployments
        ),
        quotas=frozenset(quotas),
        **_prices(
            config,
            [(d.litellm_params["model"], d.model_info) for d in deployments],
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
        elif config.price_in is not None or config.price_out is not None:
            given_in = (
                config.price_in if config.price_in is not None else config.price_out
            )
            given_out = (
                config.price_out if config.price_out is not None else config.price_in
            )
            price = (float(given_in or 0) / 1e6, float(given_out or 0) / 1e6)
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


def _roles(raw: dict[str, str], groups: dict[str, Any], where: str) -> dict[Role, str]:
    for role, group in raw.items():
        if role not in ROLES:
            msg = f"In the {where}, roles names '{role}'; roles are root, worker and judge."
            raise ConfigError(msg)
        if group not in groups:
            msg = f"In the {where}, role '{role}' names group '{group}', which no model_list entry defines."
            raise ConfigError(msg)
    chosen: dict[str, str] = {r: g for r, g in raw.items()}
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
    """Pauses every call to a quota after that quota answered "rate limited".

    Deployments that share one quota (one account behind two endpoints) would
    otherwise take turns failing: a retry or fallback sent at once to the
    twin meets the same exhausted quota.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock

    def block(self, quotas: Iterable[str], seconds: float) -> None:
        """Hold back calls to ``quotas`` for ``seconds`` from now."""
        until = self._clock() + seconds
        for quota in quotas:
            self._until[quota] = max(self._until.get(quota, 0.0), until)

    async def wait(self, quotas: Iterable[str]) -> float:
        """Sleep until none of ``quotas`` is held back; returns seconds waited."""
        waited = 0.0
        while True:
            now = self._clock()
            pause = max((self._until.get(q, 0.0) - now for q in quotas), default=0.0)
            if pause <= 0:
                return waited
            waited += pause
            await asyncio.sleep(pause)
