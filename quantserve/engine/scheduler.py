"""Decides, each step, how many tokens of which requests to compute.

Rule: every request carries `num_computed_tokens` and `num_tokens`; each step hands out a
token budget (max_prefill_token_num) so that the first catches up with the second. Running
requests are served first (decodes cost 1 token), then waiting ones join; both in order of
(priority, arrival): lower priority values first, as vLLM, then first come. Prefill, chunked
prefill and decode are all partial budgets of this one rule. When blocks run out, the running
request last in that order (the lowest priority, latest arrived) is preempted: its blocks are
freed and it waits to be recomputed from scratch; a request never loses its blocks to one of
lower priority. A request with a `pin_owner` leaves its full blocks pinned
for that owner when it finishes (block_manager.py), before its own references go. With
speculative decoding, a decoding request may also get a draft (speculative.py): its row costs
1 + len(draft) tokens, and update() counts only the accepted ones as computed.

Data flow: schedule() -> SchedulerOutput -> ModelRunner -> sampled token ids -> update().
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from quantserve.engine.block_manager import BlockManager
from quantserve.engine.request import FinishReason, Request, Status
from quantserve.engine.speculative import Proposer


def order(request: Request) -> tuple[int, int]:
    """Who goes first: the lower priority value, then the earlier arrival."""
    return request.params.priority, request.arrival


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int          # tokens computed for it this step
    draft: list[int] = field(default_factory=list)   # speculative tokens verified after them

    @property
    def row_len(self) -> int:
        """Tokens of the flat batch this request takes: its new tokens and its draft."""
        return self.num_new_tokens + len(self.draft)

    @property
    def samples(self) -> bool:
        """The step completes the request's tokens, so it gets a next token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]   # in order(); the flat batch puts its decodes first (batch.py)
    preempted: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, token_budget: int,
                 proposer: Proposer | None = None):
        self.blocks = block_manager
        self.proposer = proposer
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
        drafting: list[tuple[ScheduledRequest, int]] = []
        speculate = self._speculating()
        for request in sorted(self.running, key=order):
            if request not in self.running:       # preempted while making room
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0 or not self._make_room(request, n, preempted):
                continue
            scheduled.append(ScheduledRequest(request, n))
            room = self._draft_room(request, budget - n) if speculate and n == 1 else 0
            if room:
                drafting.append((scheduled[-1], room))
            budget -= n + room
        if drafting:
            budget += self._draft(drafting)
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        return SchedulerOutput(scheduled, preempted)

    def _speculating(self) -> bool:
        """Drafts this step: on, and few enough decoding requests that a longer row still pays."""
        if self.proposer is None:
            return False
        decoding = sum(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        return decoding <= self.proposer.max_decoding_rows

    def _draft_room(self, request: Request, budget: int) -> int:
        """Tokens a decoding request may draft, with blocks for its row allocated; 0 when it may
        not or the blocks are short (a draft never preempts: one free block per running request stays)."""
        room = self.proposer.room(request, budget)
        target = request.num_tokens + room
        if not room or self.blocks.blocks_needed(request, target) + len(self.running) > self.blocks.num_free_blocks:
            return 0
        self.blocks.allocate(request, target)
        return room

    def _draft(self, drafting: list[tuple[ScheduledRequest, int]]) -> int:
        """Every drafting request's draft, proposed together; the budget their room did not use."""
        drafts = self.proposer.propose([(s.request, room) for s, room in drafting])
        for (s, _), draft in zip(drafting, drafts):
            s.draft = draft
        return sum(room - len(draft) for (_, room), draft in zip(drafting, drafts))

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
        request.num_computed_tokens = request.num_drafter_tokens = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.add(request)          # its early arrival puts it ahead of later ones of its priority

    def update(self, out: SchedulerOutput, sampled: dict[str, int | list[int]]) -> list[Request]:
        """Advance counters, append sampled tokens (a verify row's several, up to the first that
        stops it); return the requests that changed."""
        changed = []
        for s in out.scheduled:
            r = s.request
            if r.status is not Status.RUNNING:   # aborted during the step
                continue
            read_to_end = s.samples
            tokens = sampled.get(r.request_id, [])
            tokens = [tokens] if isinstance(tokens, int) else tokens
            appended = 0
            for token in tokens:
                r.append_token(token)
                appended += 1
                if r.is_finished:
                    break
            if s.draft and tokens:               # a verify row: the accepted drafted tokens, then one more
                self.proposer.record(len(s.draft), min(appended, len(tokens) - 1))   # those it kept
            # K/V stays for the new tokens and the drafted ones appended before the last
            r.num_computed_tokens += s.num_new_tokens + (max(0, appended - 1) if s.draft else 0)
            self.blocks.register_full_blocks(r)
            if r.pooling is not None and read_to_end:    # its vector is ready
                changed.append(r)
                self.finish(r, FinishReason.STOP)
            elif tokens:
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
