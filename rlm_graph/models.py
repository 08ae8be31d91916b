"""Model access: the one place that talks to LiteLLM.

:class:`ModelClient` wraps a :class:`litellm.Router` whose model groups are the
roles of a run (``root``, ``worker``). It adds what the engine needs around each
call: a global concurrency limit, retries of transient errors with tenacity
(honouring ``Retry-After`` on every attempt), recognition of context-window
errors however the server words them, usage and cost accounting, and a call log
that answers a call already made with the recorded result instead of paying
for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from rlm_graph._routing import (
    Deployment,
    Group,
    Pacer,
    QuotaGates,
    Role,
    routing_table,
)
from rlm_graph._wire import WireTicket, current_ticket, session_for_this_loop
from rlm_graph.budget import Budget
from rlm_graph.config import RunConfig
from rlm_graph.errors import (
    BudgetExceeded,
    ConfigError,
    ContextWindowError,
    ModelCallError,
    StoreError,
)
from rlm_graph.result import Usage
from rlm_graph.tokens import (
    context_window,
    ensure_offline_litellm,
    token_counter,
    tokenizer_margin,
)

__all__ = ["CallLog", "Completion", "MemoryCallLog", "ModelClient", "Role", "call_key"]

logger = logging.getLogger(__name__)

MAX_RETRY_WAIT_S = 120.0
MIN_MASKED_KEY_CHARS = 4
DEFAULT_RATE_LIMIT_PAUSE_S = 1.0
"""How long a quota pauses after a 429 that gave no Retry-After."""
QUOTA_MARGIN_S = 0.02
LONG_PACE_WAIT_S = 5.0
"""A pacing wait at least this long is logged (at info) before it starts."""
"""Extra wait after a quota pause, so that the Router's cooldown of the same
length (started a moment later) is over too and it does not refuse the call."""
MAX_LOCAL_REFUSALS = 8
"""Most times one call is refused by the Router without being sent (every
deployment cooling down) before it fails; each waits the time the Router names."""
_QUOTA_PAUSED = "_rlm_quota_paused_s"
# Phrases servers use for "prompt too long" when they do not send a typed error:
# OpenAI, vLLM, llama.cpp server, SGLang, Ollama, Anthropic, Gemini (K05).
_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|context window|maximum context|context size|"
    r"exceeds? the (?:model'?s? )?(?:maximum|max|available)|"
    r"prompt is too long|too many tokens|input is too long|"
    r"longer than the model'?s? context|input length .* exceeds|"
    r"n_ctx|requested \d+ tokens",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Completion:
    """One model answer, as the engine sees it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = 0.0
    cost_known: bool = True
    model: str = ""
    refusal: str | None = None
    cached: bool = False
    paid_by: str = ""
    """``run id/session`` of the session that paid for it, when a run did."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class CallLog(Protocol):
    """Where finished model calls are recorded, keyed by what was sent."""

    async def get(self, key: str) -> Completion | None:
        """Return the recorded completion for ``key``, if any."""
        ...

    async def put(self, key: str, completion: Completion) -> None:
        """Record a completion as soon as it returns (durably, when this returns)."""
        ...


class MemoryCallLog:
    """A call log held in memory: reuse within one process only."""

    durable = False
    """Forgotten when the process ends (the graph then makes calls durable tasks)."""

    def __init__(self) -> None:
        self._entries: dict[str, Completion] = {}

    async def get(self, key: str) -> Completion | None:
        """Return the recorded completion for ``key``, if any."""
        return self._entries.get(key)

    async def put(self, key: str, completion: Completion) -> None:
        """Record a completion."""
        self._entries[key] = completion

    def __len__(self) -> int:
        return len(self._entries)


def call_key(model: str, messages: list[dict[str, str]], params: Mapping[str, Any]) -> str:
    """Return the call-log key of a request: a hash of everything sent."""
    payload = json.dumps(
        {"model": model, "messages": messages, "params": dict(params)},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class ModelClient:
    """Sends the engine's model calls through one LiteLLM Router.

    Each role (root, worker, judge) maps to a router group, and each group may
    have fallback groups. A call goes to its role's group, is retried there on
    transient errors (honouring ``Retry-After`` on every attempt), and then
    moves down the fallback chain, skipping any group whose window cannot hold
    the request. Around every attempt the client enforces, in this order: the
    group's parallel-call limit, the pause of a rate-limited quota, the
    group's rpm/tpm pace, the global concurrency limit, and the run's budget.
    Once a group's requests are seen passing the client's HTTP session, these
    are taken as each request leaves rather than before LiteLLM prepares it
    (:mod:`rlm_graph._wire`).

    Args:
        config: the run configuration (models or router config, limits, budgets).
        call_log: where finished calls are recorded and looked up.
        on_call: called after every completed or cached call (for progress).

    Raises:
        ConfigError: an unknown model, an unusable router config, or
            ``max_cost`` with a model whose price is unknown.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        call_log: CallLog | None = None,
        on_call: Callable[[Role, Completion], None] | None = None,
    ) -> None:
        ensure_offline_litellm()
        import litellm

        self._litellm = litellm
        self.config = config
        # Before the Router exists: it registers unknown deployments with a
        # price of 0, which would make every unpriced model look free (K17).
        windows: dict[str, int] = {}

        def window_of(model: str) -> int:
            if model not in windows:
                windows[model] = context_window(model, config.context_window)
            return windows[model]

        self.table = routing_table(
            config, window_of=window_of, price_of=lambda model: _price_of(litellm, model),
            check_model=lambda model: _check_model_name(litellm, model),
        )
        self.models: dict[Role, str] = {
            role: _describe(self.table.groups[group]) for role, group in self.table.roles.items()
        }
        self.usage = Usage()
        self.budget = Budget(config)
        self.call_log: CallLog = call_log if call_log is not None else MemoryCallLog()
        self._on_call = on_call
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._admission = {
            name: asyncio.Semaphore(config.concurrency + _spare(config.concurrency))
            for name in self.table.groups
        }
        self._at_wire: set[str] = set()
        """Groups whose calls take their slots when the request leaves (_wire)."""
        self._never_at_wire: set[str] = {
            name for name in self.table.groups
            if not _may_wait_at_wire(name, self.table.model_list, self.table.router_settings)
        }
        self._gates = QuotaGates()
        self._group_limits = {name: _GroupLimits(g) for name, g in self.table.groups.items()}
        self.run_id: str | None = None
        """The run this client's calls belong to (set when a run starts)."""
        self._session = uuid.uuid4().hex[:12]
        self._rejected: dict[str, ModelCallError] = {}
        """Groups whose server rejected the key (401/403), with the error."""
        self.router = litellm.Router(
            model_list=self.table.model_list, num_retries=0, **self.table.router_settings
        )
        self._secrets = _secrets_of(config, self.table.model_list)

    def window(self, role: Role) -> int:
        """Input window, in tokens, of the group that serves ``role``."""
        return self.table.groups[self.table.roles[role]].window

    def prices(self, role: Role) -> tuple[float, float] | None:
        """USD per (prompt, completion) token of ``role``'s group; None if unknown."""
        group = self.table.groups[self.table.roles[role]]
        if group.price_in is None or group.price_out is None:
            return None
        return group.price_in, group.price_out

    def is_local(self, role: Role) -> bool:
        """Whether ``role``'s group runs only the embedded model."""
        return self.table.groups[self.table.roles[role]].is_local

    def count_margin(self, role: Role) -> float:
        """How much :meth:`count_tokens` overcounts ``role``'s model on purpose.

        Counts for other vendors' models carry a safety margin for fitting
        windows; an estimate of what is billed divides it out.
        """
        return tokenizer_margin(self.table.groups[self.table.roles[role]].models[0])

    def count_tokens(self, role: Role, text: str) -> int:
        """Count tokens of ``text`` with the tokenizer of ``role``'s model."""
        return self._limits_of(self.table.roles[role]).count(text)

    async def complete(
        self,
        role: Role,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """Send one chat call (or answer it from the call log).

        Args:
            role: which model group answers.
            messages: OpenAI-style chat messages.
            max_tokens: output limit of this call.
            schema: JSON schema the answer must follow (sent as response_format).

        Raises:
            ContextWindowError: the prompt does not fit the window of any group
                that could take it.
            ModelCallError: the call failed after retries and fallbacks;
                ``retryable`` says whether a later resume may succeed.
            BudgetExceeded: the run reached one of its budgets; nothing was sent.
        """
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.config.temperature}
        if schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": False},
            }
        key = call_key(self.models[role], messages, params)
        recorded = await self.call_log.get(key)
        if recorded is not None:
            completion = _replace(recorded, cached=True)
            if not self._paid_earlier_in_this_run(recorded):
                self.usage.cached_calls += 1
            self._notify(role, completion)
            return completion

        completion = await self._send_routed(role, messages, params, key)
        self._notify(role, completion)

        return completion

    def _paid_earlier_in_this_run(self, recorded: Completion) -> bool:
        """Whether an earlier session of this run paid for a recorded call.

        A resume replays those from the log; they were counted as paid in
        ``calls`` by that session, and are not counted again as cached.
        """
        if self.run_id is None or not recorded.paid_by:
            return False
        run_id, _, session = recorded.paid_by.rpartition("/")
        return run_id == self.run_id and session != self._session

    async def _send_routed(
        self, role: Role, messages: list[dict[str, str]], params: dict[str, Any], key: str
    ) -> Completion:
        """Try the role's group, then its fallbacks, each with its own retries."""
        prompt = "\n".join(m["content"] for m in messages)
        chain = self.table.chain(role)
        failure: ModelCallError | None = None
        too_small: list[str] = []
        for index, name in enumerate(chain):
            prompt_tokens = self._limits_of(name).count(prompt)
            need = prompt_tokens + params["max_tokens"]
            group = self.table.groups[name]
            if need > group.window:
                too_small.append(f"{name} ({group.window})")
                if index:
                    logger.info("%s call: fallback %s skipped: a %d-token request exceeds its "
                                "%d-token window", role, name, need, group.window)
                continue
            if index and failure is not None:
                logger.info("%s call: falling back from %s to %s (%s)",
                            role, chain[index - 1], name, failure)
            try:
                return await self._send_to_group(
                    role, name, messages, params, key, prompt_tokens
                )
            except ContextWindowError as exc:
                return await self._context_fallback(role, name, prompt, messages, params, key, exc)
            except ModelCallError as exc:
                failure = exc

        if failure is None or too_small:
            # Smaller pieces fit the groups that are left: the engine splits finer.
            raise ContextWindowError(
                f"no model that could take this {role} call has room for it "
                f"(windows: {', '.join(too_small)})"
                + (f"; the others failed: {failure}" if failure else "")
            )
        raise failure

    async def _context_fallback(
        self,
        role: Role,
        name: str,
        prompt: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        key: str,
        error: ContextWindowError,
    ) -> Completion:
        """After a context-window error, try the larger groups configured for it."""
        for other in self.table.context_fallbacks.get(name, ()):
            prompt_tokens = self._limits_of(other).count(prompt)
            need = prompt_tokens + params["max_tokens"]
            if need > self.table.groups[other].window:
                continue
            logger.info("%s call: falling back from %s to %s (context window)", role, name, other)
            try:
                return await self._send_to_group(
                    role, other, messages, params, key, prompt_tokens
                )
            except ContextWindowError:
                continue
        raise error

    async def _send_to_group(
        self,
        role: Role,
        name: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        key: str,
        prompt_tokens: int,
    ) -> Completion:
        """Send to one group, retrying there; ``prompt_tokens`` is the prompt
        counted with the group's tokenizer (by the caller, which needed it to
        check the window: counted once per call, not once per attempt)."""
        if name in self._rejected:
            # The group's key was rejected: no call to it can succeed.
            raise self._rejected[name]
        tally = _Tally()
        retrying = AsyncRetrying(
            stop=tally.stop_after(self.config.max_retries + 1),
            wait=_wait_retry_after,
            retry=retry_if_exception(
                lambda exc: _is_transient(exc) and name not in self._rejected
            ),
            sleep=self._sleep_before_retry,
            before_sleep=functools.partial(
                _log_retry, role, name, self._mask, self._pause_of(name), tally
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._send_once(
                        role, name, messages, params, key, tally, prompt_tokens
                    )
        except (ModelCallError, BudgetExceeded, StoreError):
            raise
        except Exception as exc:
            if name in self._rejected and _refused_locally(exc):
                raise self._rejected[name] from exc
            error = self._translate(name, exc, tally)
            if _is_auth_error(exc):
                self._rejected.setdefault(name, error)
            raise error from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(
        self,
        role: Role,
        name: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        key: str,
        tally: _Tally,
        prompt_tokens: int,
    ) -> Completion:
        group = self.table.groups[name]
        estimate = prompt_tokens + params["max_tokens"]
        at_wire = name in self._at_wire
        metadata: dict[str, Any] = {}
        async with contextlib.AsyncExitStack() as held:
            if at_wire:
                # LiteLLM prepares the call outside the slots (see _wire); this
                # bounds how many of the group's calls are past this point at
                # once. Per group: one waiting out its pace holds up no other.
                admission = self._admission[name]
                await self.budget.within_time(
                    admission.acquire(), admission.release, ready=not admission.locked()
                )
                held.callback(admission.release)
            ticket = WireTicket(
                functools.partial(self._take_slots, role, name, estimate, metadata)
            )
            held.callback(ticket.release)
            if not at_wire:
                await ticket.take()
            started = time.monotonic()
            try:
                response = await self._post(name, group, messages, params, metadata, ticket)
            except BaseException as exc:
                if ticket.stopped is not None:
                    # The budget stopped the run while the request waited for a slot.
                    raise ticket.stopped from None
                if ticket.reservation is not None:
                    self._learn(name, ticket)
                    self._record_failure(
                        group, ticket.reservation, exc, prompt_tokens, metadata, tally
                    )
                elif ticket.seen or _never_left(exc):
                    # Ended (cancelled, out of time, refused by the Router)
                    # before its request left: nothing was sent.
                    tally.refused += int(_refused_locally(exc))
                else:
                    reservation = self._went_out_unseen(name, estimate)
                    self._record_failure(group, reservation, exc, prompt_tokens, metadata, tally)
                raise
            if ticket.reservation is not None:
                self._learn(name, ticket)
                reservation = ticket.reservation
            else:
                reservation = self._went_out_unseen(name, estimate)
            tally.sent += 1
            self.usage.calls += 1
            completion = self._completion_from(
                role, group, messages, response, metadata
            )
            self.budget.settle(reservation, completion.total_tokens, completion.cost_usd)
            _raise_if_error_body(response)
            # Recorded before the slots are freed: at any moment at most
            # `concurrency` calls are paid for and not yet in the call log.
            # A reply no run could use (empty, refused, not the JSON asked
            # for) is not recorded: once the server is fixed, it is asked again.
            if _usable(completion, params):
                if self.run_id is not None:
                    paid_by = f"{self.run_id}/{self._session}"
                    completion = _replace(completion, paid_by=paid_by)
                await self.call_log.put(key, completion)
        logger.debug(
            "%s call to %s: %d+%d tokens, %s, %.2f s", role, name,
            completion.prompt_tokens, completion.completion_tokens,
            completion.finish_reason, time.monotonic() - started,
        )
        self._account(completion)

        return completion

    async def _take_slots(
        self, role: Role, name: str, estimate: int, metadata: dict[str, Any]
    ) -> tuple[Any, Callable[[], None]]:
        """Wait for everything a call needs before it goes out, in this order:
        the group's parallel slot, its quota and pace, the global slot, the
        budget. Returns the budget's reservation and what frees the slots.

        The pace comes before the global slot, so a call waiting out its own
        group's pace does not keep another group's call from going out. A
        quota paused (by a 429) while the call waited for the global slot is
        waited out again, without the slot: at the wire the Router has already
        chosen the deployment (``metadata``), so its cooldown would not stop
        the request.
        """
        group = self.table.groups[name]
        limits = self._limits_of(name)
        budget = self.budget
        taken: list[Callable[[], None]] = []

        def give_back() -> None:
            while taken:
                taken.pop()()

        try:
            # Every wait below ends when the run's time is up (or a budget stops it).
            if limits.parallel is not None:
                slot = limits.parallel
                await budget.within_time(slot.acquire(), slot.release, ready=not slot.locked())
                taken.append(slot.release)
            await self._wait_for_quota(role, name, group)
            delay, limit = limits.pace_delay(estimate)
            if delay >= LONG_PACE_WAIT_S:
                logger.info(
                    "%s call to %s: waiting %.0f s for the group's %s pace "
                    "(a bucket in debt after a larger request)",
                    role, name, delay, limit,
                )
            await budget.within_time(limits.pace(estimate), ready=limits.pace_free(estimate))
            semaphore = self._semaphore
            while True:
                await budget.within_time(
                    semaphore.acquire(), semaphore.release, ready=not semaphore.locked()
                )
                quotas = self._quotas_chosen(group, metadata)
                if self._gates.pause_any(quotas) <= 0:
                    break
                semaphore.release()
                await self._wait_for_quota(role, name, group, quotas)
            taken.append(semaphore.release)
            reservation = await budget.admit(estimate, _cost_of(group, estimate, 0))
        except BaseException:
            give_back()
            raise
        return reservation, give_back

    def _learn(self, name: str, ticket: WireTicket) -> None:
        """A request seen in the session moves its group's slots to the wire
        (see :mod:`rlm_graph._wire`), unless the group cannot go there."""
        if ticket.seen and name not in self._at_wire and name not in self._never_at_wire:
            self._at_wire.add(name)
            logger.debug("calls to %s take their slots when the request goes out", name)

    def _went_out_unseen(self, name: str, estimate: int) -> Any:
        """A call counting on the wire went out another way: from now on its
        group takes its slots before each call. Returns its budget hold."""
        self._at_wire.discard(name)
        self._never_at_wire.add(name)
        logger.info(
            "a call to %s went out without passing the slots at the wire; "
            "its calls take them beforehand from now on", name,
        )
        return self.budget.count_unreserved(
            estimate, _cost_of(self.table.groups[name], estimate, 0)
        )

    async def _wait_for_quota(
        self, role: Role, name: str, group: Group, quotas: list[str] | None = None
    ) -> None:
        """Wait while every quota of the group (or of ``quotas``) is paused;
        stop if it outlasts the run."""
        quotas = quotas if quotas is not None else self._quotas_of(group)
        pause = self._gates.pause_any(quotas)
        if pause <= 0:
            return
        remaining = self.budget.remaining_s()
        if remaining is not None and pause + QUOTA_MARGIN_S >= remaining:
            logger.info(
                "%s call to %s: its quota is paused %.1f s, longer than the %.1f s "
                "the run has left", role, name, pause, max(remaining, 0.0),
            )
            raise self.budget.time_up()
        await self.budget.within_time(
            self._gates.wait_any(quotas, margin_s=QUOTA_MARGIN_S)
        )

    async def _sleep_before_retry(self, seconds: float) -> None:
        """Tenacity's sleep: a wait longer than the time left stops the run now."""
        remaining = self.budget.remaining_s()
        if remaining is not None and seconds >= remaining:
            logger.info(
                "a retry wait of %.1f s is longer than the %.1f s the run has left",
                seconds, max(remaining, 0.0),
            )
            raise self.budget.time_up()
        await self.budget.within_time(asyncio.sleep(seconds))

    async def _post(
        self,
        name: str,
        group: Group,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        metadata: dict[str, Any],
        ticket: WireTicket,
    ) -> Any:
        """One request through the Router, cut short when the run's time is up.

        ``metadata`` must be a fresh dict: LiteLLM writes into it (STACK-FINDINGS
        2), among other things the deployment the Router chose. ``ticket``
        takes the call's slots if they are not held yet, when the request
        leaves; the call's timeout counts from then.
        """
        timeout = group.timeout_s + 5
        cut_by_budget = False

        def deadline() -> float:
            nonlocal cut_by_budget
            remaining = self.budget.remaining_s()
            cut_by_budget = remaining is not None and remaining < timeout
            return min(timeout, remaining) if cut_by_budget and remaining else timeout

        def until_taken() -> float | None:
            # Before its slots are taken a call is not at the server: only the
            # run's time bounds it (the waits themselves end with it too).
            nonlocal cut_by_budget
            remaining = self.budget.remaining_s()
            cut_by_budget = remaining is not None
            return None if remaining is None else max(remaining, 0.0)

        session = await session_for_this_loop()
        token = current_ticket().set(ticket)
        try:
            # asyncio.timeout, not wait_for: it runs the call in this task
            # rather than a new one, one event-loop hop less per call.
            async with asyncio.timeout(deadline() if ticket.held else until_taken()) as scope:
                loop = asyncio.get_running_loop()

                def restart_timeout() -> None:
                    if not scope.expired():
                        scope.reschedule(loop.time() + deadline())

                ticket.on_taken = restart_timeout
                return await self.router.acompletion(
                    model=name, messages=messages, metadata=metadata,
                    shared_session=session, **params,
                )
        except TimeoutError as exc:
            if not cut_by_budget:
                raise
            stop = self.budget.stop("max-time", f"{self.config.max_time_s:g} s")
            raise stop from exc
        finally:
            current_ticket().reset(token)

    def _record_failure(
        self,
        group: Group,
        reservation: Any,
        exc: BaseException,
        prompt_tokens: int,
        metadata: dict[str, Any],
        tally: _Tally,
    ) -> None:
        """Count an attempt that raised: in usage and budget only if it was sent."""
        if _refused_locally(exc):
            # The Router sent nothing (every deployment cooling down): no call.
            self.budget.cancel(reservation)
            tally.refused += 1
            return
        tally.sent += 1
        self.usage.calls += 1
        deployment = self._deployment_of(metadata)
        if deployment is not None:
            tally.deployment = deployment
        if _is_auth_error(exc):
            # Not transient: later attempts of this call (and other calls to
            # the group) fail at once instead of waiting out cooldowns.
            rejected = self._translate(group.name, exc, tally)
            self._rejected.setdefault(group.name, rejected)
        if not _timed_out(exc):
            self.budget.settle(reservation, 0, 0.0)
            self._block_quota_after(group, deployment, exc)
            return
        # The prompt went out and a provider may bill it though no answer came.
        tally.timed_out += 1
        cost = _cost_of(group, prompt_tokens, 0)
        self.budget.settle(reservation, prompt_tokens, cost or 0.0)
        self.usage.timed_out_calls += 1
        self.usage.prompt_tokens += prompt_tokens
        self.usage.cost_usd += cost or 0.0
        self.usage.cost_known = self.usage.cost_known and cost is not None

    def _deployment_of(self, metadata: dict[str, Any]) -> Deployment | None:
        """The deployment the Router chose for a call, from the metadata it filled."""
        info = metadata.get("model_info")
        deployment_id = info.get("id") if isinstance(info, dict) else None
        return self.table.deployments.get(str(deployment_id)) if deployment_id else None

    def _pause_of(self, name: str) -> Callable[[], float]:
        """Seconds until some deployment of group ``name`` has an open quota."""
        quotas = self._quotas_of(self.table.groups[name])
        return lambda: self._gates.pause_any(quotas)

    def _quotas_chosen(self, group: Group, metadata: dict[str, Any]) -> list[str]:
        """The quota of the deployment the Router chose, once it has; else the group's."""
        deployment = self._deployment_of(metadata)
        return [deployment.quota] if deployment is not None else self._quotas_of(group)

    def _quotas_of(self, group: Group) -> list[str]:
        return [self.table.deployments[d].quota for d in group.deployments]

    def _block_quota_after(
        self, group: Group, deployment: Deployment | None, exc: BaseException
    ) -> None:
        """After a 429, pause the quota that gave it, on every deployment using it."""
        if not isinstance(exc, Exception) or not isinstance(
            exc, self._litellm.RateLimitError
        ):
            return
        wait = retry_after_seconds(_headers_of(exc))
        wait = wait if wait is not None else DEFAULT_RATE_LIMIT_PAUSE_S
        # Not knowing which deployment answered, pause them all.
        quotas = {deployment.quota} if deployment is not None else set(group.quotas)
        for quota in sorted(quotas):
            self._gates.block(quota, wait)
            paused = self.table.sharing_quota(quota)
            logger.info(
                "quota %s paused %.1f s%s after a rate limit from %s: %s wait",
                quota,
                wait,
                _capped_note(_headers_of(exc)),
                deployment.describe() if deployment else group.name,
                # Roles may share a deployment's model and server: name each once.
                ", ".join(dict.fromkeys(d.describe() for d in paused)),
            )
            cooldowns = self.router.health().cooldowns
            for other in paused:
                # The Router then picks another deployment of the group, if any.
                cooldowns.add_deployment_to_cooldown(other.id, exc, 429, wait)
        setattr(exc, _QUOTA_PAUSED, wait)

    def _limits_of(self, name: str) -> _GroupLimits:
        return self._group_limits[name]

    def _completion_from(
        self,
        role: Role,
        group: Group,
        messages: list[dict[str, str]],
        response: Any,
        metadata: dict[str, Any],
    ) -> Completion:
        choice = response.choices[0]
        message = choice.message
        text = message.content or ""
        refusal = getattr(message, "refusal", None)
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        if not prompt_tokens:
            # A response without usage is counted from what was actually sent.
            limits = self._limits_of(group.name)
            prompt_tokens = limits.count("\n".join(m["content"] for m in messages))
            completion_tokens = limits.count(text)
        cost = _cost_of(group, prompt_tokens, completion_tokens)
        deployment = self._deployment_of(metadata)

        return Completion(
            text=text,
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost or 0.0,
            cost_known=cost is not None,
            model=deployment.model if deployment else _model_of(group, response),
            refusal=refusal,
        )

    def _account(self, completion: Completion) -> None:
        self.usage.prompt_tokens += completion.prompt_tokens
        self.usage.completion_tokens += completion.completion_tokens
        self.usage.cost_usd += completion.cost_usd
        self.usage.cost_known = self.usage.cost_known and completion.cost_known

    def _notify(self, role: Role, completion: Completion) -> None:
        if self._on_call is not None:
            self._on_call(role, completion)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _translate(
        self, name: str, exc: BaseException, tally: _Tally
    ) -> ModelCallError:
        litellm = self._litellm
        group = self.table.groups[name]
        deployment = tally.deployment
        model = deployment.model if deployment else _describe(group)
        detail = self._mask(_short(exc))
        if isinstance(exc, litellm.ContextWindowExceededError) or _mentions_context(exc):
            return ContextWindowError(f"{model}: prompt too long for its context window ({detail})")
        if _timed_out(exc):
            return self._timeout_error(name, group, tally)
        if _is_unreachable(exc):
            where = deployment.api_base if deployment else None
            where = where or self.config.api_base
            return ModelCallError(
                f"Cannot reach {where or 'the provider'} for model {model} (connection "
                f"failed after {tally.sent} attempts). Check that the server is "
                "running and that --api-base is right.",
                retryable=True,
                # A refused connection fails every call alike.
                systemic=True,
            )
        if _is_auth_error(exc):
            return ModelCallError(
                f"{model} rejected the API key ({detail}). Set the provider's key "
                "variable (e.g. OPENAI_API_KEY) or pass --api-key.",
                systemic=True,
            )
        if isinstance(exc, litellm.NotFoundError):
            return ModelCallError(
                f"Model {model} was not found by its server ({detail}).", systemic=True
            )
        retryable = _is_transient(exc)
        return ModelCallError(f"{model} call failed: {detail}", retryable=retryable)

    def _timeout_error(self, name: str, group: Group, tally: _Tally) -> ModelCallError:
        """A call whose attempts timed out: which model, where, and after how long."""
        deployment = tally.deployment
        seconds = deployment.timeout_s if deployment else group.timeout_s
        who = deployment.describe() if deployment else _describe(group)
        if self.config.router_config is not None:
            who += f" (group '{name}')"
        return ModelCallError(
            f"Model {who} timed out: no answer within {seconds:g} s "
            f"({tally.timed_out} of {tally.sent} attempts timed out). If the model "
            "is slow rather than stuck, raise --timeout (or the deployment's "
            "timeout in the router config).",
            retryable=True,
            # A timeout may be one stalled request: only this task fails.
            systemic=False,
        )


class _Tally:
    """What the attempts of one call to one group did, for retries and messages."""

    def __init__(self) -> None:
        self.sent = 0
        """Attempts that went out (whatever came back)."""
        self.refused = 0
        """Attempts the Router refused without sending anything."""
        self.timed_out = 0
        self.deployment: Deployment | None = None
        """The deployment the last failed attempt went to, when known."""

    def stop_after(self, attempts: int) -> Callable[[RetryCallState], bool]:
        """A tenacity stop: ``attempts`` sent, or too many local refusals."""

        def stop(state: RetryCallState) -> bool:
            return self.sent >= attempts or self.refused >= MAX_LOCAL_REFUSALS

        return stop


class _GroupLimits:
    """What the client enforces per router group: tokenizer, parallel calls, pace."""

    def __init__(self, group: Group) -> None:
        self.count = token_counter(group.models[0])
        self.parallel = (
            asyncio.Semaphore(group.max_parallel) if group.max_parallel else None
        )
        # A bucket holding one second's worth: steady pacing, no minute-long bursts.
        self._rpm = Pacer(group.rpm / 60, group.rpm / 60) if group.rpm else None
        self._tpm = Pacer(group.tpm / 60, group.tpm / 60) if group.tpm else None

    def pace_delay(self, tokens: int) -> tuple[float, str]:
        """The longer of the rpm and tpm waits a request of ``tokens`` faces now."""
        rpm = self._rpm.delay(1) if self._rpm is not None else 0.0
        tpm = self._tpm.delay(tokens) if self._tpm is not None else 0.0
        return (rpm, "rpm") if rpm >= tpm else (tpm, "tpm")

    def pace_free(self, tokens: int) -> bool:
        """Whether :meth:`pace` would pass ``tokens`` now without waiting."""
        return all(
            pacer is None or (not pacer.busy and pacer.delay(amount) <= 0)
            for pacer, amount in ((self._rpm, 1), (self._tpm, tokens))
        )

    async def pace(self, tokens: int) -> None:
        """Wait until the group's rpm and tpm allow one more request of ``tokens``."""
        if self._rpm is not None:
            await self._rpm.take(1)
        if self._tpm is not None:
            await self._tpm.take(tokens)


def _describe(group: Group) -> str:
    if len(group.models) == 1:
        return group.models[0]
    return f"{group.name} ({', '.join(group.models)})"


def _model_of(group: Group, response: Any) -> str:
    """The model that answered, when the Router did not say which deployment."""
    return group.models[0] if len(group.models) == 1 else str(response.model)


def _price_of(litellm: Any, model: str) -> tuple[float, float] | None:
    if model.startswith("local/"):
        return (0.0, 0.0)
    try:
        info = litellm.get_model_info(model)
    except Exception:  # litellm raises a bare Exception for unmapped models
        return None
    price_in, price_out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    # A Router registers each unknown deployment as an empty price-map entry,
    # which get_model_info then reports as free (K17); that is no price.
    entry = litellm.model_cost.get(info.get("key") or model)
    if price_in is None or (entry is not None and "input_cost_per_token" not in entry):
        return None
    return float(price_in), float(price_out if price_out is not None else price_in)


def _cost_of(group: Group, prompt_tokens: int, completion_tokens: int) -> float | None:
    if group.price_in is None or group.price_out is None:
        return None
    return prompt_tokens * group.price_in + completion_tokens * group.price_out


def _secrets_of(config: RunConfig, *model_lists: list[dict[str, Any]]) -> list[str]:
    """Every key value the client could meet in an error text, longest first."""
    found = set()
    if config.api_key is not None:
        found.add(config.api_key.get_secret_value())
    for model_list in model_lists:
        for deployment in model_list:
            params = deployment.get("litellm_params") or {}
            key = params.get("api_key")
            if isinstance(key, str) and not key.startswith("os.environ/"):
                found.add(key)
    # Shorter values are no real key, and masking them would garble every message.
    return sorted((key for key in found if len(key) >= MIN_MASKED_KEY_CHARS), key=len, reverse=True)


def _check_model_name(litellm: Any, model: str) -> None:
    if model.startswith("local/"):
        from rlm_graph.local import register_local_provider, resolve_gguf

        register_local_provider()
        resolve_gguf(model.removeprefix("local/"))
        return
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
    try:
        litellm.get_llm_provider(model)
    except Exception as exc:
        msg = (
            f"Unknown model '{model}': LiteLLM cannot tell its provider. Use a "
            "provider-prefixed name such as 'openai/NAME' (with --api-base for an "
            "OpenAI-compatible server), 'ollama/NAME', 'hosted_vllm/NAME', or "
            "'local/smollm2-135m' for the embedded model."
        )
        raise ConfigError(msg) from exc


def _is_unreachable(exc: BaseException) -> bool:
    import litellm

    if isinstance(exc, litellm.APIConnectionError | litellm.Timeout | asyncio.TimeoutError):
        return True
    # litellm reports a refused connection as an InternalServerError.
    text = str(exc).lower()
    return "connection error" in text or "connection refused" in text


def _timed_out(exc: BaseException) -> bool:
    """Whether an attempt was sent and got no answer in time (ours or LiteLLM's)."""
    import litellm

    if isinstance(exc, BudgetExceeded):
        # The run's --max-time cut the attempt in flight.
        return isinstance(exc.__cause__, TimeoutError)
    return isinstance(exc, litellm.Timeout | asyncio.TimeoutError)


def _is_auth_error(exc: BaseException) -> bool:
    """Whether a server rejected the key (401 or 403): never transient."""
    import litellm

    return isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError)


def _spare(concurrency: int) -> int:
    """Calls allowed past admission beyond ``concurrency``, preparing the next
    request while ``concurrency`` are at the server (see _wire)."""
    return max(2, concurrency // 2)


_ROUTER_CAPS = ("max_parallel_requests", "rpm", "tpm")


def _may_wait_at_wire(
    name: str, model_list: list[dict[str, Any]], router_settings: Mapping[str, Any]
) -> bool:
    """Whether the calls of group ``name`` may wait for their slots at the wire.

    LiteLLM's Router caps the calls in progress at each deployment from the
    moment it is called: at ``max_parallel_requests``, else at its ``rpm``,
    else at 6 per 1,000 ``tpm``, else at ``default_max_parallel_requests``.
    Calls waiting at the wire would fill that cap and the Router would refuse
    the rest; a group with any of these on any deployment takes its slots
    before each call.
    """
    if router_settings.get("default_max_parallel_requests"):
        return False
    return not any(
        entry.get("litellm_params", {}).get(cap)
        for entry in model_list
        if entry.get("model_name") == name
        for cap in _ROUTER_CAPS
    )


def _never_left(exc: BaseException) -> bool:
    """Whether a call that ended with ``exc`` unseen at the wire surely sent nothing."""
    return _refused_locally(exc) or isinstance(
        exc, (asyncio.CancelledError, TimeoutError, BudgetExceeded)
    )


def _refused_locally(exc: BaseException) -> bool:
    """Whether the Router refused an attempt without sending it."""
    import litellm

    if isinstance(exc, litellm.RouterRateLimitError):
        return True
    text = str(exc)
    # The second: the Router's own cap on a deployment's calls in progress
    # (max_parallel_requests, or derived from its rpm/tpm), not a 429 of the server.
    return "No deployments available" in text or "max_parallel_requests slots in use" in text


def _is_transient(exc: BaseException) -> bool:
    import litellm

    if isinstance(exc, litellm.ContextWindowExceededError) or _mentions_context(exc):
        return False
    return isinstance(
        exc,
        litellm.RateLimitError
        | litellm.InternalServerError
        | litellm.ServiceUnavailableError
        | litellm.APIConnectionError
        | litellm.Timeout
        | litellm.RouterRateLimitError
        | asyncio.TimeoutError,
    )


def _mentions_context(exc: BaseException) -> bool:
    import litellm

    # Ollama says it with a 500 (InternalServerError), others with a 400.
    if not isinstance(
        exc, litellm.BadRequestError | litellm.APIError | litellm.InternalServerError | ModelCallError
    ):
        return False
    return bool(_CONTEXT_PATTERNS.search(str(exc)))


def _raise_if_error_body(response: Any) -> None:
    """Turn a 200 response that carries an error object into an exception."""
    error = getattr(response, "error", None)
    if error:
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        if _CONTEXT_PATTERNS.search(message):
            raise ContextWindowError(message)
        raise ModelCallError(message)


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Read a server's requested wait from ``Retry-After`` or ``retry-after-ms``.

    Accepts seconds (integer or decimal) and HTTP dates; a date counts from the
    response's own ``Date`` header when it has one (so clocks that disagree do
    not matter), else from ``now``. Negative, empty or unparsable values count
    as absent. The result is capped at :data:`MAX_RETRY_WAIT_S`.
    """
    requested = requested_retry_after(headers, now)
    return None if requested is None else min(requested, MAX_RETRY_WAIT_S)


def requested_retry_after(
    headers: Mapping[str, str] | None, now: float | None = None
) -> float | None:
    """The wait a server asked for, in seconds, before any cap; None if none."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = -1
        if value >= 0:
            return value
    raw = (lowered.get("retry-after") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        parsed = _http_date(raw)
        if parsed is None:
            return None
        served = _http_date(lowered.get("date") or "")
        if served is None:
            served = now if now is not None else time.time()
        value = max(parsed - served, 0.0)
    if value < 0 or value != value:  # negative or NaN: invalid
        return None
    return value


def _http_date(text: str) -> float | None:
    """Seconds since the epoch of an HTTP date; None when it is not one."""
    try:
        parsed = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _capped_note(headers: Mapping[str, str] | None) -> str:
    """' (Retry-After asked N s; capped at 120 s)' when the cap applied, else ''."""
    requested = requested_retry_after(headers)
    if requested is None or requested <= MAX_RETRY_WAIT_S:
        return ""
    return f" (Retry-After asked {requested:.0f} s; capped at {MAX_RETRY_WAIT_S:.0f} s)"


_backoff = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)


def _wait_retry_after(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if exc is not None and hasattr(exc, _QUOTA_PAUSED):
        # The quota's pause holds the next attempt back, and only as long as
        # no deployment of the group is free (a twin on another quota is).
        return 0.0
    headers = _headers_of(exc)
    requested = retry_after_seconds(headers)
    if requested is None and exc is not None:
        # Every deployment of a group cooling down: LiteLLM's Router says how long.
        found = _TRY_AGAIN.search(str(exc))
        requested = min(float(found.group(1)), MAX_RETRY_WAIT_S) if found else None
    if requested is not None:
        return requested
    return float(_backoff(state))


def _usable(completion: Completion, params: Mapping[str, Any]) -> bool:
    """Whether a reply is worth replaying from the call log."""
    if completion.refusal or not completion.text.strip():
        return False
    if "response_format" in params:
        try:
            json.loads(completion.text)
        except ValueError:
            return False
    return True


_TRY_AGAIN = re.compile(r"[Tt]ry again in (\d+(?:\.\d+)?) seconds")


def _headers_of(exc: BaseException | None) -> Mapping[str, str] | None:
    if exc is None:
        return None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers:
        return dict(headers)
    return getattr(exc, "litellm_response_headers", None)


def _log_retry(
    role: str,
    group: str,
    mask: Callable[[str], str],
    quota_pause: Callable[[], float],
    tally: _Tally,
    state: RetryCallState,
) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    told = retry_after_seconds(_headers_of(exc)) is not None
    if hasattr(exc, _QUOTA_PAUSED):
        # The quota pause is the wait: none if another quota's deployment is free.
        wait = quota_pause()
    if exc is not None and _refused_locally(exc):
        # The Router refusing while the group's deployments cool down or are
        # paused: nothing was sent, and the pause itself was logged already.
        if tally.refused == 1:
            logger.debug(
                "%s call to %s: the Router holds it back (%s); waiting %.1f s",
                role, group, mask(_short(exc)), wait,
            )
        return
    logger.info(
        "%s call to %s: attempt %d failed (%s); retrying in %.1f s%s",
        role, group, state.attempt_number, mask(_short(exc)), wait,
        (" as Retry-After asked" + _capped_note(_headers_of(exc))) if told else "",
    )


def _short(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else "unknown error"
    text = re.sub(r"(?i)(bearer\s+|api[_-]?key[=: ]+)[^\s,'\"]+", r"\1***", text)
    name = type(exc).__name__ if exc is not None else "Error"
    return f"{name}: {text[:300]}"


def _replace(completion: Completion, **changes: Any) -> Completion:
    values = asdict(completion)
    values.update(changes)
    return Completion(**values)
