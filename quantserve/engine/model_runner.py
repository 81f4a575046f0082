"""SchedulerOutput -> one forward pass -> sampled token ids.

Builds the flat batch (input ids, positions, cache slots) and the AttentionMetadata from each
scheduled request's counters and block table, runs the model, takes the logits of the last
token of every request that completes this step, and samples. A request with a speculative
draft is a row of its last token + the draft (run as decodes, batch.py), verified from the logits
at all of them.
With LoRA adapters, the model also gets every token's adapter slot (lora_slots).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantserve.engine import sampler, speculative
from quantserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from quantserve.engine.batch import Row, flat_batch
from quantserve.kvcache.paged import AttentionMetadata, PagedKVCache
from quantserve.models.layers import CausalLM


@dataclass
class BatchInputs:
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    meta: AttentionMetadata
    sample_rows: list[int]        # indices into T of the tokens whose logits are sampled
    sample_from: list[ScheduledRequest]
    pooled: list[tuple[ScheduledRequest, int]]   # embedding / score requests and their first row in T
    verify: list[tuple[ScheduledRequest, int]]   # requests with a draft and their first row in T
    starts: list[int]             # where each scheduled request's tokens start in T


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: str):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int | list[int]]:
        """Each sampling request's next token; a verify row's accepted drafted tokens + one."""
        logits, batch = self._logits(out)
        requests = [s.request for s in batch.sample_from]
        result: dict[str, int | list[int]] = {}
        if requests:
            tokens = sampler.sample(logits[:len(requests)], requests)
            sampler.record_logprobs(logits[:len(requests)], tokens, requests)
            result = {r.request_id: t for r, t in zip(requests, tokens)}
        row = len(requests)
        for s, _ in batch.verify:
            result[s.request.request_id] = speculative.verify(logits[row:row + s.row_len], s.request, s.draft)
            row += s.row_len
        return result

    @torch.inference_mode()
    def hidden_states(self, out: SchedulerOutput) -> tuple[torch.Tensor, BatchInputs]:
        """Run the batch; final hidden states [T, H] of every scheduled token."""
        batch = self.prepare(out.scheduled)
        lora_slots = self.lora_slots(out.scheduled, batch)
        return self.model(batch.input_ids, batch.positions, batch.meta, self.cache, lora_slots), batch

    def lora_slots(self, scheduled: list[ScheduledRequest], batch: BatchInputs) -> torch.Tensor | None:
        """[T] the LoRA adapter slot of every token of the flat batch (-1: none); None when no row
        has an adapter, so the model keeps its fused decode step."""
        if not any(s.request.lora_id for s in scheduled):
            return None
        slots = torch.full((len(batch.input_ids),), -1, dtype=torch.long)
        for s, row0 in zip(scheduled, batch.starts):
            if s.request.lora_id:
                slots[row0:row0 + s.row_len] = self.model.loras.slot_of(s.request.lora_id)
        return slots.to(self.device)

    @torch.inference_mode()
    def compute_logits(self, out: SchedulerOutput) -> tuple[torch.Tensor, list]:
        """Run the batch; logits [N, V] (float32, on CPU) of the N requests that sample."""
        logits, batch = self._logits(out)
        requests = [s.request for s in batch.sample_from]
        return logits[:len(requests)], requests

    def _logits(self, out: SchedulerOutput) -> tuple[torch.Tensor, BatchInputs]:
        """Run the batch, pool the pooling requests; logits of the sampling rows, then of every
        row of each verify row, in batch order."""
        hidden, batch = self.hidden_states(out)
        for s, row0 in batch.pooled:
            self.pool(s, hidden[row0:row0 + s.num_new_tokens])
        rows = batch.sample_rows + [i for s, row0 in batch.verify for i in range(row0, row0 + s.row_len)]
        if not rows:
            return hidden.new_empty(0), batch
        return self.model.compute_logits(hidden[rows]).cpu(), batch

    def prepare(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        rows = []
        for s in scheduled:
            r, start = s.request, s.request.num_computed_tokens
            rows.append(Row(r.all_token_ids[start:start + s.num_new_tokens] + s.draft, start, r.block_ids,
                            decodes=bool(s.draft)))
        ids, positions, meta, starts = flat_batch(rows, self.block_size, self.device)
        sample_rows: list[int] = []
        sample_from: list[ScheduledRequest] = []
        pooled: list[tuple[ScheduledRequest, int]] = []
        verify: list[tuple[ScheduledRequest, int]] = []
        for s, row0 in zip(scheduled, starts):
            if s.request.pooling is not None:
                pooled.append((s, row0))
            elif s.draft:
                verify.append((s, row0))
            elif s.samples:
                sample_rows.append(row0 + s.row_len - 1)
                sample_from.append(s)
        return BatchInputs(ids, positions, meta, sample_rows, sample_from, pooled, verify, starts)

    def pool(self, s: ScheduledRequest, hidden: torch.Tensor) -> None:
        """Fold this step's rows of a pooling request ([n, H], positions num_computed_tokens
        onwards) into its vector; on its last chunk, the finished embedding or score."""
        r, h = s.request, hidden.float()
        kind = r.pooling.kind
        if r.num_computed_tokens == 0:            # first chunk, or recomputed after a preemption
            r.pooled = None
        if kind == "mean":
            r.pooled = h.sum(0) if r.pooled is None else r.pooled + h.sum(0)
        elif kind == "cls" and r.num_computed_tokens == 0:
            r.pooled = h[0]
        if not s.samples:
            return
        if kind == "score":
            r.embedding = [score_yes(self.model.compute_logits(h[-1:])[0], r.pooling.score_tokens)]
            return
        vec = h[-1] if kind == "last" else r.pooled / len(r.prompt_token_ids) if kind == "mean" else r.pooled
        if r.pooling.normalize:
            vec = torch.nn.functional.normalize(vec, dim=0)
        r.embedding = vec.cpu().tolist()


def score_yes(logits: torch.Tensor, tokens: tuple[int, int]) -> float:
    """P(yes) between the two answers a reranker was asked to choose from: softmax over
    [logit(yes), logit(no)] (Qwen3-Reranker's recipe)."""
    pair = torch.stack([logits[tokens[0]], logits[tokens[1]]])
    return float(torch.softmax(pair, dim=0)[0])
