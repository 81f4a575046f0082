"""A request's state inside the engine: token ids, counters, blocks.

Invariant the scheduler works on: `num_computed_tokens` (tokens whose K/V are in the cache)
catches up with `num_tokens` (prompt + generated). A request is sampled in a step only when
that step makes the two equal.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from quantserve.config import SamplingParams

_counter = itertools.count()


class Guide(Protocol):
    """Constrained decoding for one request: which tokens may come next."""

    def allowed(self, vocab_size: int) -> torch.Tensor: ...      # [V] bool
    def accept(self, token_id: int) -> None: ...
    def is_finished(self) -> bool: ...


@dataclass
class TokenLogprobs:
    logprob: float                              # of the sampled token, under the model's distribution
    top: list[tuple[int, float]]                # the k most likely (token id, logprob), best first


@dataclass(frozen=True)
class Pooling:
    """A request that is only read, never continued: its prompt's final hidden states pooled
    into one vector (an embedding), or its last token's yes/no logits turned into a score."""

    kind: str                                   # last | mean | cls | score
    normalize: bool = True                      # L2-normalize the embedding
    score_tokens: tuple[int, int] = (0, 0)      # kind "score": (yes, no) token ids

    KINDS = ("last", "mean", "cls", "score")

    @property
    def reads_every_token(self) -> bool:
        """Mean and first-token pooling need every prompt token's hidden state: no cached prefix."""
        return self.kind in ("mean", "cls")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_new_tokens or the session length
    ABORT = "abort"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int                      # session length: prompt + output never exceed it
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)    # prefix-cache keys of its full blocks
    num_cached_tokens: int = 0                               # prompt tokens served from the prefix cache
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_counter))
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)   # when params.logprobs is set
    guide: Guide | None = None                                            # constrained decoding state
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    pooling: Pooling | None = None                       # set for embedding / score requests
    pooled: torch.Tensor | None = None                   # [H] float32: the running sum (mean) or the vector
    embedding: list[float] | None = None                 # the result, once finished
    pin_owner: str | None = None                         # a session that keeps its full blocks when it ends
    num_drafter_tokens: int = 0                          # tokens a draft model's cache holds (speculative.py)
    lora_id: int = 0                                     # its LoRA adapter (models/lora.py's id); 0: none

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.guide is not None:
            self.guide = self.params.guide.start()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.guide is not None:
            self.guide.accept(token_id)
        self.finish_reason = self._finish_reason(token_id)
        if self.finish_reason is not None:
            self.status = Status.FINISHED

    def _finish_reason(self, token_id: int) -> FinishReason | None:
        p = self.params
        n_out = len(self.output_token_ids)
        if n_out >= p.min_new_tokens and (token_id in p.eos_token_ids or token_id in p.stop_token_ids):
            return FinishReason.STOP
        if self.guide is not None and self.guide.is_finished():
            return FinishReason.STOP
        if n_out >= p.max_new_tokens or self.num_tokens >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None
