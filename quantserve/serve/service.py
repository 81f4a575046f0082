"""Plans -> engine requests -> per-choice deltas (text, tokens, logprobs, tool calls).

One Plan has n choices. Choice 0 starts alone; the others start once it has its first token, so
its prompt blocks are in the prefix cache and the n choices share the prompt's KV. Each choice
has its own TextStream (detokenizing, stop strings) and, with tools, a ToolStream. A consumer
that stops iterating (a client that went away) cancels the choices, which aborts their engine
requests and frees their KV blocks.

Admission: at most `max_concurrent_requests` requests generate at once, `max_queued_requests`
more wait for a slot (a freed slot goes to the waiter of lowest priority value, then the earliest),
and past that a request gets 429 at once; an optional per-key rate limit. A request past its
deadline, waiting or generating, ends with a 408 and its engine requests are aborted.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from quantserve.engine.async_engine import AsyncEngine, EngineFailed
from quantserve.engine.engine import RequestError, UnknownLoRA
from quantserve.engine.request import TokenLogprobs
from quantserve.serve.admission import OVERFLOW_HEADER, Deadline, Slots
from quantserve.serve.errors import APIError
from quantserve.serve.metrics import Metrics
from quantserve.config import Limits
from quantserve.serve.plan import ModelInfo, Plan
from quantserve.serve.reasoning import ReasoningStream
from quantserve.serve.tools import ParsedCall, ToolStream, parse_forced
from quantserve.text import TextStream


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ParsedCall] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning: str = ""                     # with --reasoning-parser: the <think> part of this delta
    stop_word: str | None = None        # the stop string that ended the choice, if one did


class Service:
    def __init__(self, engine: AsyncEngine, model: ModelInfo, limits: Limits, metrics: Metrics):
        self.engine, self.model, self.limits, self.metrics = engine, model, limits, metrics
        self.slots = Slots(limits.max_concurrent_requests)
        self.active = 0          # admitted requests: generating or queued for a slot
        self.recent: dict[str, deque] = defaultdict(deque)

    # ---- admission -----------------------------------------------------------------------------

    def check_rate(self, client: str) -> None:
        if not self.limits.rate_limit:
            return
        now = time.monotonic()
        if len(self.recent) > 4096:          # forget clients idle for a minute, so the table stays small
            for key in [k for k, w in self.recent.items() if not w or now - w[-1] > 60]:
                del self.recent[key]
        window = self.recent[client]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.limits.rate_limit:
            self.metrics.rejected("rate_limit")
            retry = max(1, int(61 - (now - window[0])))
            raise APIError(429, f"rate limit of {self.limits.rate_limit} requests per minute reached",
                           None, "rate_limit_exceeded", {"Retry-After": str(retry)})
        window.append(now)

    @property
    def full(self) -> bool:
        """Every slot busy and the queue full: reserve() would refuse."""
        return self.active >= self.limits.max_concurrent_requests + self.limits.max_queued_requests

    def reserve(self) -> Ticket:
        """Count the request in at once (no await between check and count); 429 with Retry-After
        when every slot is busy and the queue is full. The caller releases the ticket."""
        if self.full:
            self.metrics.rejected("overloaded")
            raise APIError(429, "the server is overloaded; retry shortly", None, "overloaded", {"Retry-After": "1"})
        self.active += 1
        return Ticket(self)

    @asynccontextmanager
    async def admitted(self, priority: int = 0, deadline: Deadline | None = None):
        """Hold a generation slot while generating, waiting in the queue for one by priority;
        408 if the deadline passes first."""
        start = time.monotonic()
        try:
            await asyncio.wait_for(self.slots.acquire(priority), deadline and deadline.left())
        except TimeoutError:
            raise deadline.expired(self.metrics, "queued") from None
        self.metrics.admission_wait(priority, time.monotonic() - start)
        try:
            yield
        finally:
            self.slots.release()

    def deadline(self, timeout: float | None) -> Deadline | None:
        """The request's own timeout, else the server's --request-timeout, from now."""
        timeout = timeout or self.limits.request_timeout
        return Deadline(timeout) if timeout else None

    # ---- generation ----------------------------------------------------------------------------

    async def stream(self, plan: Plan, request_id: str) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice of the plan, as they come; raises APIError on failure."""
        queue: asyncio.Queue = asyncio.Queue()
        n = len(plan.params)
        tasks = [asyncio.create_task(self._choice(plan, 0, request_id, queue))]
        finished, failed = 0, False
        try:
            while finished < n:
                item = await queue.get()
                if isinstance(item, BaseException):
                    failed = True
                    raise as_api_error(item)
                if len(tasks) < n and (item.token_ids or item.finish_reason):
                    tasks += [asyncio.create_task(self._choice(plan, j, request_id, queue)) for j in range(1, n)]
                finished += item.finish_reason is not None
                yield item
        finally:
            for t in tasks:
                t.cancel()
            if finished < n and not failed:
                self.metrics.aborted.inc()
            await asyncio.gather(*tasks, return_exceptions=True)    # may be cut short if we are cancelled

    async def _choice(self, plan: Plan, j: int, request_id: str, queue: asyncio.Queue) -> None:
        params = plan.params[j]
        text = TextStream(self.model.tokenizer, plan.prompt_ids, plan.stop_words, plan.skip_special_tokens,
                          params.eos_token_ids + params.stop_token_ids)
        tools = ToolStream(plan.tool_parser) if plan.tool_parser else None
        reasoner = ReasoningStream(plan.reasoning) if plan.reasoning is not None else None
        timer = _Timer(self.metrics, params.priority)
        generator = self.engine.generate(f"{request_id}-{j}", plan.prompt_ids, params, plan.pin_owner, plan.lora)
        try:
            async for ev in generator:
                timer.tick(ev.token_ids, ev.queue_time)
                delta = ChoiceDelta(plan.first_index + j, text.add(ev.token_ids, final=ev.finish_reason is not None),
                                    ev.token_ids, ev.logprobs or [], ev.finish_reason,
                                    completion_tokens=ev.num_output_tokens, cached_tokens=ev.num_cached_tokens)
                if text.stopped:
                    delta.finish_reason, delta.stop_word = "stop", text.stop_word
                if reasoner is not None:        # before the tool parser: calls are in the answer
                    split_reasoning(delta, reasoner)
                if tools is not None:
                    finish_tools(delta, tools)
                elif plan.forced_tools:
                    finish_forced_tools(delta, text.text)
                await queue.put(delta)
                if delta.finish_reason:
                    timer.done(delta.finish_reason)
                    return
        except Exception as e:
            await queue.put(e)
        finally:
            await generator.aclose()


class Ticket:
    """One admitted request's place in the count; release() is idempotent. `overflow`: the name
    of the model that took the request because the one it named was full; `lora`: the LoRA
    adapter the request named, which its model runs it with."""

    def __init__(self, service: Service):
        self.service = service
        self.held = True
        self.overflow: str | None = None
        self.lora: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The answer's extra headers: an overflow names the model that took it."""
        return {OVERFLOW_HEADER: self.overflow} if self.overflow else {}

    def release(self) -> None:
        if self.held:
            self.held = False
            self.service.active -= 1


def split_reasoning(delta: ChoiceDelta, reasoner: ReasoningStream) -> None:
    part = reasoner.add(delta.text)
    if delta.finish_reason:
        rest = reasoner.finish()
        part.reasoning, part.content = part.reasoning + rest.reasoning, part.content + rest.content
    delta.reasoning, delta.text = part.reasoning, part.content


def finish_tools(delta: ChoiceDelta, tools: ToolStream) -> None:
    """Route the choice's text through the tool parser: content now, calls at the end."""
    delta.text = tools.add(delta.text)
    if delta.finish_reason:
        rest, calls = tools.finish()
        delta.text += rest
        if calls:
            delta.tool_calls, delta.finish_reason = calls, "tool_calls"


def finish_forced_tools(delta: ChoiceDelta, full_text: str) -> None:
    """Forced calls are JSON, not content: nothing streams as text; at the end the calls, or the
    raw text as content if it did not complete (a length cut-off)."""
    delta.text = ""
    if delta.finish_reason:
        delta.tool_calls = parse_forced(full_text)
        if delta.tool_calls:
            delta.finish_reason = "tool_calls"
        else:
            delta.text = full_text


class _Timer:
    """Latency metrics of one choice."""

    def __init__(self, metrics: Metrics, priority: int):
        self.metrics, self.priority = metrics, priority
        self.start = self.last = time.monotonic()
        self.tokens = 0

    def tick(self, token_ids: list[int], queue_time: float | None) -> None:
        now = time.monotonic()
        if queue_time is not None:
            self.metrics.queued(self.priority, queue_time)
        if token_ids and self.tokens == 0:
            self.metrics.ttft.observe(now - self.start)
        elif token_ids:
            per_token = (now - self.last) / len(token_ids)
            self.metrics.itl.observe(per_token)
            self.metrics.tpot.observe(per_token)
        self.tokens += len(token_ids)
        self.last = now

    def done(self, reason: str) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.start)
        self.metrics.generation_tokens.inc(self.tokens)
        self.metrics.success(reason)


def as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, UnknownLoRA):          # unloaded between admission and the engine
        return APIError(404, str(error), "model", "model_not_found")
    if isinstance(error, RequestError):
        return APIError(400, str(error), None, "invalid_value")
    if isinstance(error, EngineFailed):
        return APIError(503, f"{error}; the engine is being restarted: retry the request", None, "engine_restarted")
    return APIError(500, f"generation failed: {error}", None, "engine_error")
