"""Logits -> next token ids, one row per request that samples this step.

Order (as in transformers / vLLM): logit_bias and the constrained-decoding mask, penalties,
min_new_tokens masking, temperature, top-k, top-p, min-p, then a draw. Greedy rows take the argmax of the penalised
logits. A seeded row draws from its own torch.Generator, so its text does not depend on what
else is in the batch.
"""
from __future__ import annotations

import torch

from quantserve.engine.request import Request, TokenLogprobs


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits: [N, V] float32, row i belongs to requests[i] -> N token ids."""
    logits = apply_bias_and_guides(logits, requests)
    logits = apply_penalties(logits, requests)
    logits = mask_early_stop(logits, requests)
    greedy = torch.tensor([r.params.greedy for r in requests])
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten()
        probs = filtered_probs(logits[rows], [requests[i] for i in rows.tolist()])
        tokens[rows] = draw(probs, [requests[i] for i in rows.tolist()])
    return tokens.tolist()


def apply_bias_and_guides(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.params.logit_bias or r.guide is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        r = requests[i]
        if r.params.logit_bias:
            ids, bias = zip(*r.params.logit_bias)
            logits[i, list(ids)] += torch.tensor(bias)
        if r.guide is not None:
            logits[i].masked_fill_(~r.guide.allowed(logits.shape[1]), float("-inf"))
    return logits


def record_logprobs(logits: torch.Tensor, tokens: list[int], requests: list[Request]) -> None:
    """Append each asking request's TokenLogprobs (of the model's own distribution, before any
    bias, mask or temperature: OpenAI's and vLLM's convention)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return
    logp = logits[rows].log_softmax(dim=-1)
    k = max(requests[i].params.logprobs for i in rows)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    for j, i in enumerate(rows):
        r, n = requests[i], requests[i].params.logprobs
        top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
        r.output_logprobs.append(TokenLogprobs(float(logp[j, tokens[i]]), top))


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        logits[i] = penalise_row(logits[i], requests[i])
    return logits


def penalise_row(row: torch.Tensor, request: Request) -> torch.Tensor:
    """row: [V]. Repetition penalty over prompt + output (transformers' rule);
    presence / frequency over the output only (OpenAI's rule)."""
    p = request.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long)
        counts = torch.zeros_like(row).index_add_(0, out, torch.ones(len(out)))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return row


def mask_early_stop(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Forbid EOS / stop token ids until a request has min_new_tokens (on a copy: the caller's
    logits still feed the logprobs)."""
    rows = [(i, list(set(r.params.eos_token_ids) | set(r.params.stop_token_ids))) for i, r in enumerate(requests)
            if len(r.output_token_ids) < r.params.min_new_tokens]
    rows = [(i, banned) for i, banned in rows if banned]
    if not rows:
        return logits
    logits = logits.clone()
    for i, banned in rows:
        logits[i, banned] = float("-inf")
    return logits


def filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """logits: [N, V] -> probabilities after temperature, top-k, top-p and min-p."""
    temps = torch.tensor([r.params.temperature for r in requests]).unsqueeze(1)
    logits = logits / temps
    top_k = [r.params.top_k for r in requests]
    if any(k > 0 for k in top_k):
        logits = apply_top_k(logits, top_k)
    top_p = torch.tensor([r.params.top_p for r in requests])
    if bool((top_p < 1).any()):
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([r.params.min_p for r in requests])
    if bool((min_p > 0).any()):
        probs = apply_min_p(probs, min_p)
    return probs


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    v = logits.shape[-1]
    k = torch.tensor([min(k, v) if k > 0 else v for k in top_k])
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))           # [N, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p.unsqueeze(1)   # mass before this token
    drop &= (top_p < 1).unsqueeze(1)                 # rows without top-p keep every token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Rows with min_p > 0 drop tokens under min_p x their top probability (others untouched)."""
    rows = (min_p > 0).nonzero().flatten()
    sub = probs[rows]
    threshold = sub.max(dim=-1, keepdim=True).values * min_p[rows].unsqueeze(1)
    sub = sub.masked_fill(sub < threshold, 0.0)
    probs = probs.clone()
    probs[rows] = sub / sub.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Exponential race (argmax p / E, E ~ Exp(1)): one independent stream per seeded row."""
    noise = torch.empty_like(probs)
    for i, r in enumerate(requests):
        noise[i].exponential_(generator=r.generator)
    return (probs / noise).argmax(dim=-1)
