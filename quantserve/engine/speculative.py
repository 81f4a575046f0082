"""Speculative decoding with prompt-lookup (n-gram) drafts, lossless.

Drafting: for a decoding request, the last n tokens of its prompt + output (n from
prompt_lookup_max down to prompt_lookup_min) are looked up earlier in the same tokens; the up to
K tokens that followed their latest earlier occurrence are the draft. No match: a plain decode.

Verification: the scheduler gives the request a row of its last token + the draft (a short
prefill chunk at the end of its context, K + 1 tokens of the budget); the model's logits at every
position of that row go to `verify`, which accepts drafted tokens while they are what the sampler
would have produced there, then adds the first token of its own (a correction, or a bonus token
after a fully accepted draft). Greedy: accept while the draft equals the argmax. Sampled: the
draft d is a point mass, so accept it with probability p(d), else draw from p with d removed and
renormalised; each emitted token then has exactly the distribution p, as without drafts.

Only requests whose sampler is position-independent draft: no guide, no logprobs, no penalties,
and past min_new_tokens (their rows would need per-position state); they decode as before. The
K/V of rejected tokens is left in the cache past num_computed_tokens, overwritten later.
"""
from __future__ import annotations

import torch

from quantserve.engine import sampler
from quantserve.engine.request import Request


class NgramProposer:
    def __init__(self, num_tokens: int, n_max: int, n_min: int, max_decoding_rows: int):
        self.k, self.n_max, self.n_min = num_tokens, n_max, n_min
        self.max_decoding_rows = max_decoding_rows
        self.num_drafts = 0                # verify rows run
        self.num_draft_tokens = 0          # tokens they proposed
        self.num_accepted_tokens = 0       # of those, accepted

    @staticmethod
    def eligible(request: Request) -> bool:
        p = request.params
        return (request.pooling is None and request.guide is None and p.logprobs is None and not p.needs_penalties
                and len(request.output_token_ids) >= p.min_new_tokens)

    def propose(self, request: Request, budget: int) -> list[int]:
        """Up to min(K, budget) drafted tokens, never more than the request may still emit less one
        (the step's own token); [] when it cannot draft."""
        p = request.params
        room = min(p.max_new_tokens - len(request.output_token_ids),
                   request.max_total_tokens - request.num_tokens) - 1
        k = min(self.k, budget, room)
        if k <= 0 or not self.eligible(request):
            return []
        return lookup(request.all_token_ids, k, self.n_max, self.n_min)

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted


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
