"""Hands out KV cache blocks to requests.

A request holding `n` tokens of K/V owns ceil(n / block_size) blocks, listed in order in its
`block_ids` (its block table). Freed blocks go back to the pool at once.
"""
from __future__ import annotations

from collections import deque

from quantserve.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks for the request to hold `num_tokens` tokens in total."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(request.block_ids))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_tokens: int) -> None:
        needed = self.blocks_needed(request, num_tokens)
        if needed > self.num_free_blocks:
            raise MemoryError(f"need {needed} KV blocks, {self.num_free_blocks} free")
        request.block_ids.extend(self.free_blocks.popleft() for _ in range(needed))

    def free(self, request: Request) -> None:
        self.free_blocks.extend(request.block_ids)
        request.block_ids = []
