"""Concurrency slots held while a request is at the model server, not longer.

LiteLLM spends several milliseconds of this process's CPU on every call: about
two thirds before the request leaves (routing, building the request) and one
third after the reply is back (parsing, pricing). A slot held around the whole
call leaves the server with fewer than ``concurrency`` requests whenever calls
are in those stretches, and at 8 calls in flight that was 10-12 % of the
throughput (docs/design.md, "Throughput").

So a call that goes out over HTTP takes its slots (the group's parallel limit,
its quota and pace, the global limit and the budget) only when its request is
about to leave: LiteLLM is handed an aiohttp session (``shared_session``)
whose middleware takes them. The call's preparation runs before, outside the
slots. The slots are given back once the reply is recorded in the call log, so
at most ``concurrency`` calls are ever paid for and not yet recorded.

Whether a group's calls pass through the session is learnt, not assumed: a
group starts taking its slots before the call, as any call did before, and
moves to taking them at the wire once one of its requests was seen there.
Calls that LiteLLM sends another way (the in-process test double, the
embedded model, a transport other than aiohttp) are never seen, so they keep
the slots for the whole call. A group whose call went out unseen while it was
counting on the wire goes back for good.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rlm_graph.errors import BudgetExceeded

__all__ = ["WireTicket", "current_ticket", "session_for_this_loop"]


class WireTicket:
    """One call's claim on its slots, taken once, given back once.

    Args:
        take: waits for the slots and the budget; returns the budget's
            reservation and what frees the slots. May raise
            :class:`BudgetExceeded`.
    """

    def __init__(
        self, take: Callable[[], Awaitable[tuple[Any, Callable[[], None]]]]
    ) -> None:
        self._take = take
        self._give_back: Callable[[], None] | None = None
        self.on_taken: Callable[[], None] | None = None
        """Called right after the slots are taken (the call's own timeout
        starts again from there: waiting for a slot is not the server being slow)."""
        self.held = False
        self.seen = False
        """A request of this call went through the session's middleware."""
        self.reservation: Any = None
        self.stopped: BudgetExceeded | None = None
        """The budget stop met while waiting for a slot at the wire, if any."""

    async def take(self) -> None:
        """Wait for the slots unless they are held already."""
        if self.held:
            return
        try:
            self.reservation, self._give_back = await self._take()
        except BudgetExceeded as exc:
            # LiteLLM would wrap it as a connection error; the client re-raises it.
            self.stopped = exc
            raise
        self.held = True
        if self.on_taken is not None:
            self.on_taken()

    def release(self) -> None:
        """Give the slots back (again is a no-op)."""
        if self.held and self._give_back is not None:
            self.held = False
            self._give_back()


_TICKET: contextvars.ContextVar[WireTicket | None] = contextvars.ContextVar(
    "rlm_graph_wire_ticket", default=None
)


def current_ticket() -> contextvars.ContextVar[WireTicket | None]:
    """The context variable a call sets to its ticket around its LiteLLM call."""
    return _TICKET


async def _take_at_wire(request: Any, handler: Any) -> Any:
    """aiohttp client middleware: the request waits for its call's slots."""
    ticket = _TICKET.get()
    if ticket is not None:
        ticket.seen = True
        await ticket.take()
    return await handler(request)


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


async def session_for_this_loop() -> Any:
    """The aiohttp session for LiteLLM's requests, one per event loop.

    One per loop, shared by every client in it: LiteLLM caches its HTTP
    clients by endpoint and key, not by session, so a second client in the
    same loop is served through the first one's session. The session is closed
    when the loop shuts down its async generators (``asyncio.run`` does).
    """
    loop = asyncio.get_running_loop()
    entry = _SESSIONS.get(loop)
    if entry is not None and not entry[0].closed:
        return entry[0]
    # The entry holds its loop alive (its session refers to it): drop those of
    # loops closed without shutting down their async generators.
    for closed in [other for other in _SESSIONS if other.is_closed()]:
        del _SESSIONS[closed]
    import aiohttp

    session = aiohttp.ClientSession(
        # The slots limit the requests; aiohttp's default of 100 connections
        # would cap a larger --concurrency.
        connector=aiohttp.TCPConnector(limit=0),
        # As LiteLLM's own sessions: no cookies carried from one call to the next.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=_trust_env(),
        middlewares=(_take_at_wire,),
    )
    keeper = _close_at_loop_end(loop, session)
    await keeper.__anext__()
    _SESSIONS[loop] = (session, keeper)
    return session


async def _close_at_loop_end(
    loop: asyncio.AbstractEventLoop, session: Any
) -> AsyncIterator[None]:
    """Suspended for the loop's life; its shutdown of async generators closes it."""
    try:
        yield
    finally:
        _SESSIONS.pop(loop, None)
        await session.close()


def _trust_env() -> bool:
    """Proxy settings from the environment, as LiteLLM's own sessions read them."""
    import litellm

    flag = os.environ.get("AIOHTTP_TRUST_ENV", "").strip().lower()
    return bool(getattr(litellm, "aiohttp_trust_env", False)) or flag in {"1", "true", "yes"}
