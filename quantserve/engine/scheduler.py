"""Decides, each step, how many tokens of which requests to compute.

Rule: every request carries `num_computed_tokens` and `num_tokens`; each step hands out a
token budget (max_prefill_token_num) so that the first catches up with the second. Running
requests are served first (decodes cost 1 token), then waiting ones join; both in order of
(priority, arrival): lower priority values first, as vLLM, then first come. Prefill, chunked
prefill and decode are all partial budgets of this one rule. When blocks run out, the running
request last in that order (the lowest priority, latest arrived) is preempted: its blocks are
freed and it waits to be recomputed from scratch; a request never loses its blocks to one of
lower priority. A request with a `pin_owner` leaves its full blocks pinned
for that owner when it finishes (block_manager.py), before its own references go.

Data flow: schedule() -> SchedulerOutput -> ModelRunner -> sampled token ids -> update().
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from quantserve.engine.block_manager import BlockManager
from quantserve.engine.request import FinishReason, Request, Status


def order(request: Request) -> tuple[int, int]:
    """Who goes first: the lower priority value, then the earlier arrival."""
    return request.params.priority, request.arrival


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int          # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """The step completes the request's tokens, so it gets a next token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]   # single-token rows first, then longer prefill chunks
    preempted: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, token_budget: int):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.waiting: list[Request] = []            # kept in order(): the next to admit first
        self.running: list[Request] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=order)

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        for request in sorted(self.running, key=order):
            if request not in self.running:       # preempted while making room
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0 or not self._make_room(request, n, preempted):
                continue
            scheduled.append(ScheduledRequest(request, n))
            budget -= n
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        scheduled.sort(key=lambda s: s.num_new_tokens > 1)  # stable: decodes first
        return SchedulerOutput(scheduled, preempted)

    def _make_room(self, request: Request, n: int, preempted: list[Request]) -> bool:
        """Allocate blocks for n more tokens, preempting the last in order() if needed (the
        request itself when every other running one comes before it)."""
        target = request.num_computed_tokens + n
        while not self.blocks.can_allocate(request, target):
            victim = max(self.running, key=order)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        self.blocks.allocate(request, target)
        return True

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if not self._admit(request, budget):
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            self.waiting.pop(0)
            request.status = Status.RUNNING
            self.running.append(request)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            scheduled.append(ScheduledRequest(request, n))
            budget -= n
        return budget

    def _admit(self, request: Request, budget: int) -> bool:
        """Blocks for the request's next chunk, starting from its cached prefix; False if full."""
        cached = self.blocks.cached_prefix(request)
        if self.blocks.caching and not request.block_ids:
            self.blocks.queried_tokens += len(request.prompt_token_ids)
        computed = max(request.num_computed_tokens, len(cached) * self.blocks.block_size)
        n = min(request.num_tokens - computed, budget)
        needed = -(-(computed + n) // self.blocks.block_size) - max(len(cached), len(request.block_ids))
        if needed > self.blocks.free_after_claim(cached):
            return False
        if cached:
            self.blocks.claim_prefix(request, cached)
        self.blocks.allocate(request, computed + n)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.add(request)          # its early arrival puts it ahead of later ones of its priority

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters, append sampled tokens; return the requests that changed."""
        changed = []
        for s in out.scheduled:
            r = s.request
            if r.status is not Status.RUNNING:   # aborted during the step
                continue
            read_to_end = s.samples
            r.num_computed_tokens += s.num_new_tokens
            self.blocks.register_full_blocks(r)
            if r.pooling is not None and read_to_end:    # its vector is ready
                changed.append(r)
                self.finish(r, FinishReason.STOP)
            elif r.request_id in sampled:
                r.append_token(sampled[r.request_id])
                changed.append(r)
                if r.is_finished:
                    self.finish(r, r.finish_reason)
        return changed

    def finish(self, request: Request, reason: FinishReason) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.pin_owner and request.block_keys:     # a session keeps its conversation's blocks
            self.blocks.pin(request.pin_owner, request.block_keys)
        self.blocks.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
