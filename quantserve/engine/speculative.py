"""Speculative decoding, lossless: drafts from the request's own tokens (n-gram prompt lookup) or
from a small draft model of the same vocabulary.

Drafting: the scheduler gives each eligible decoding request room for up to K drafted tokens
(budget, blocks, and what it may still emit), then asks the proposer for all of them at once.
- n-gram: the last n tokens of its prompt + output (n from prompt_lookup_max down to
  prompt_lookup_min) are looked up earlier in the same tokens; the tokens that followed their
  latest earlier occurrence are the draft. No match: a plain decode.
- draft model: its own paged KV cache, addressed by the request's block table (the same block
  ids, in a second cache), holds K/V for the request's first `num_drafter_tokens` tokens. One
  batched forward catches every request up to its last token and gives the first drafted token;
  each further drafted token is one batched single-token step. A request stops drafting at its
  room, or when the draft model's confidence in its next token falls below draft_p_min.

Verification: the scheduler gives the request a row of its last token + the draft (a short
prefill chunk at the end of its context, K + 1 tokens of the budget); the model's logits at every
position of that row go to `verify`, which accepts drafted tokens while they are what the sampler
would have produced there, then adds the first token of its own (a correction, or a bonus token
after a fully accepted draft). Greedy: accept while the draft equals the argmax. Sampled: the
draft d is a point mass (both proposers draft deterministically), so accept it with probability
p(d), else draw from p with d removed and renormalised; each emitted token then has exactly the
distribution p, as without drafts.

Only requests whose sampler is position-independent draft: no guide, no logprobs, no penalties,
and past min_new_tokens (their rows would need per-position state); they decode as before. The
K/V of rejected tokens is left in the cache past num_computed_tokens, overwritten later; the draft
model's K/V counts only up to num_computed_tokens for the same reason.
"""
from __future__ import annotations

import torch

from quantserve.engine import sampler
from quantserve.engine.batch import Row, flat_batch
from quantserve.engine.request import Request
from quantserve.kvcache.paged import PagedKVCache
from quantserve.models.layers import CausalLM


class Proposer:
    """What every proposer shares: K, when drafting pays, which requests may draft, the counters."""

    def __init__(self, num_tokens: int, max_decoding_rows: int):
        self.k, self.max_decoding_rows = num_tokens, max_decoding_rows
        self.num_drafts = 0                # verify rows run
        self.num_draft_tokens = 0          # tokens they proposed
        self.num_accepted_tokens = 0       # of those, accepted

    @staticmethod
    def eligible(request: Request) -> bool:
        p = request.params
        return (request.pooling is None and request.guide is None and p.logprobs is None and not p.needs_penalties
                and len(request.output_token_ids) >= p.min_new_tokens)

    def room(self, request: Request, budget: int) -> int:
        """Tokens the request may draft this step: at most K and the budget, never more than it may
        still emit less one (the step's own token); 0 when it cannot draft."""
        p = request.params
        left = min(p.max_new_tokens - len(request.output_token_ids),
                   request.max_total_tokens - request.num_tokens) - 1
        return max(0, min(self.k, budget, left)) if self.eligible(request) else 0

    def propose(self, batch: list[tuple[Request, int]]) -> list[list[int]]:
        """(request, room) pairs -> each request's draft, at most room tokens long."""
        raise NotImplementedError

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted


class NgramProposer(Proposer):
    def __init__(self, num_tokens: int, n_max: int, n_min: int, max_decoding_rows: int):
        super().__init__(num_tokens, max_decoding_rows)
        self.n_max, self.n_min = n_max, n_min

    def propose(self, batch: list[tuple[Request, int]]) -> list[list[int]]:
        return [lookup(r.all_token_ids, k, self.n_max, self.n_min) for r, k in batch]


class DraftModelProposer(Proposer):
    """Drafts from a small model's greedy continuation, run on its own KV cache (see the top)."""

    SHORT_CATCH_UP = 16          # catch-up rows up to this long run as decodes (batch.py)

    def __init__(self, model: CausalLM, cache: PagedKVCache, num_tokens: int, max_decoding_rows: int,
                 p_min: float, vocab_size: int, draft_vocab_size: int, max_catch_up: int, device: str):
        super().__init__(num_tokens, max_decoding_rows)
        self.model, self.cache, self.device = model, cache, device
        self.p_min, self.vocab_size, self.draft_vocab_size = p_min, vocab_size, draft_vocab_size
        self.max_catch_up = max_catch_up      # draft tokens read per step, all requests together

    @torch.inference_mode()
    def propose(self, batch: list[tuple[Request, int]]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in batch]
        live = self._catch_up(batch, drafts)
        while live:
            rows = [Row([drafts[i][-1]], batch[i][0].num_drafter_tokens, batch[i][0].block_ids) for i in live]
            going = self._extend(live, self._forward(rows), batch, drafts)
            for i in live:                     # their drafted token's K/V is in the draft cache now
                batch[i][0].num_drafter_tokens += 1
            live = going
        return drafts

    def _catch_up(self, batch: list[tuple[Request, int]], drafts: list[list[int]]) -> list[int]:
        """One forward over the requests' tokens the draft model has not seen (up to their last,
        within the step's catch-up budget); the first drafted token of each that caught up.
        Returns the indices still drafting."""
        rows, fed, live, budget = [], [], [], self.max_catch_up
        for i, (r, _) in enumerate(batch):
            start = min(r.num_drafter_tokens, r.num_computed_tokens)
            tokens = r.all_token_ids[start:start + budget]         # a long prompt catches up over steps
            if not tokens or max(tokens) >= self.draft_vocab_size:    # an id the draft model has no row for
                continue
            budget -= len(tokens)
            rows.append(Row(tokens, start, r.block_ids, decodes=len(tokens) <= self.SHORT_CATCH_UP))
            fed.append(i)
        if not rows:
            return []
        last = self._forward(rows)                                 # [len(rows), V]
        caught_up = []
        for n, (i, row) in enumerate(zip(fed, rows)):
            r = batch[i][0]
            r.num_drafter_tokens = row.start + len(row.tokens)
            if r.num_drafter_tokens == r.num_tokens:
                caught_up.append(n)
                live.append(i)
        return self._extend(live, last[caught_up] if live else None, batch, drafts)

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        """Rows -> logits [len(rows), V] at each row's last token."""
        ids, positions, meta, starts = flat_batch(rows, self.cache.block_size, self.device)
        hidden = self.model(ids, positions, meta, self.cache)                # [T, H]
        ends = [start + len(r.tokens) - 1 for r, start in zip(rows, starts)]
        logits = self.model.compute_logits(hidden[ends]).cpu()[:, :self.vocab_size]
        short = self.vocab_size - logits.shape[1]           # a draft vocabulary padded less than the model's
        return torch.nn.functional.pad(logits, (0, short), value=float("-inf")) if short else logits

    def _extend(self, live: list[int], logits: torch.Tensor | None, batch, drafts) -> list[int]:
        """Append each live request's next greedy token if confident enough; the ones to go on."""
        if logits is None:
            return []
        logits = sampler.apply_bias_and_guides(logits, [batch[i][0] for i in live])   # the request's logit_bias
        probs = torch.softmax(logits, dim=-1)
        best, token = probs.max(dim=-1)
        going = []
        for n, i in enumerate(live):
            if float(best[n]) < self.p_min:
                continue
            drafts[i].append(int(token[n]))
            if len(drafts[i]) < batch[i][1]:
                going.append(i)
        return going


def lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """The up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` (n_max down to n_min tokens long)."""
    t = torch.tensor(tokens)
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        windows = t[:size - 1].unfold(0, n, 1)              # starts 0 .. size-1-n: a token follows each
        hits = (windows == t[size - n:]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []


def verify(logits: torch.Tensor, request: Request, draft: list[int]) -> list[int]:
    """logits: [len(draft) + 1, V] at the row's positions -> the tokens to append: the accepted
    drafted ones, then one of the model's own."""
    rows = [request] * logits.shape[0]
    logits = sampler.apply_bias_and_guides(logits, rows)
    if request.params.greedy:
        target = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == target[n]:
            n += 1
        return draft[:n] + [target[n]]
    probs = sampler.filtered_probs(logits, rows)
    for n, d in enumerate(draft):
        if float(torch.rand(1, generator=request.generator)) < float(probs[n, d]):
            continue
        residual = probs[n].clone()
        residual[d] = 0.0                                     # p with d removed; the draw renormalises
        return draft[:n] + [int(sampler.draw(residual[None], [request])[0])]
    return draft + [int(sampler.draw(probs[-1:], [request])[0])]
