"""Who runs when: generation slots handed out by priority, request deadlines, and overflow to a
sibling model when the named one's queue is full.

Slots: a freed slot goes straight to the waiter of lowest (priority, arrival), vLLM's order
(lower priority values first). Deadline: one request's end, on the event loop's clock; `until`
cuts a stream of deltas at it with a 408 (closing the stream aborts its engine requests, so their
KV blocks are freed). admit: the named model's Service and ticket, or with --overflow-model the
sibling's when the named one is full; the sibling plans and answers, under its own name.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from quantserve.serve.errors import APIError

if TYPE_CHECKING:
    from quantserve.serve.metrics import Metrics
    from quantserve.serve.openai_app import ServerState
    from quantserve.serve.service import Service, Ticket

OVERFLOW_HEADER = "x-quantserve-overflow"      # names the --overflow-model that answered


class Slots:
    """Generation slots; a freed slot goes to the waiter of lowest (priority, arrival)."""

    def __init__(self, n: int):
        self.free = n
        self.waiters: list[tuple[int, int, asyncio.Future]] = []     # a heap
        self.arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        while self.waiters and self.waiters[0][2].done():          # gave up waiting
            heapq.heappop(self.waiters)
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiters, (priority, next(self.arrivals), future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():          # handed a slot as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self.waiters:
            _, _, future = heapq.heappop(self.waiters)
            if not future.done():
                future.set_result(None)                            # the slot passes straight to it
                return
        self.free += 1


class Deadline:
    """When a request must have finished, on the event loop's clock."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.at = asyncio.get_running_loop().time() + timeout

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()

    def expired(self, metrics: Metrics, where: str) -> APIError:
        metrics.timed_out.inc()
        return APIError(408, f"the request did not finish within its timeout of {self.timeout:g} s "
                             f"({where}); it was cancelled", "timeout", "timeout")


async def until(deadline: Deadline | None, items: AsyncIterator, metrics: Metrics) -> AsyncIterator:
    """The items, or a 408 once the deadline passes: the pending read is cancelled, which
    closes the streams and aborts their engine requests."""
    if deadline is None:
        async for item in items:
            yield item
        return
    async with aclosing(items):
        while True:
            try:
                item = await asyncio.wait_for(anext(items), deadline.left())
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise deadline.expired(metrics, "generating") from None
            yield item


async def admit(state: ServerState, model: str | None, client: str,
                keep_alive: float | None = None) -> tuple[Service, Ticket]:
    """The named model's Service (loaded again first if idle-unloaded; `keep_alive`: the request's)
    and an admission ticket (after the client's rate limit there); when its queue is full, the
    --overflow-model's (the ticket names it), 429 only when that one is full too. A LoRA adapter's
    name gives its base model's Service and a ticket naming the adapter (never an overflow: the
    sibling has not the adapter)."""
    service, lora = await state.ready_with_adapter(model, keep_alive)
    service.check_rate(client)
    sibling = overflow_for(state, model) if lora is None else None
    if service.full and sibling is not None and not sibling.full:
        service.metrics.overflowed(state.config.overflow_model)
        ticket = sibling.reserve()
        ticket.overflow = state.config.overflow_model
        return sibling, ticket
    ticket = service.reserve()
    ticket.lora = lora
    return service, ticket


def overflow_for(state: ServerState, model: str | None) -> Service | None:
    """The overflow model's Service, unless it is the named one or is not serving now."""
    sibling = state.config.overflow_model
    if sibling is None or sibling == (model or state.models.default) or sibling not in state.models.slots:
        return None
    try:
        return state.models.get(sibling)
    except APIError:            # loading, unloaded for idleness or its engine stopped: no overflow, the 429 stands
        return None
