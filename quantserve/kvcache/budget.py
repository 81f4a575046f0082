"""How many KV blocks to allocate.

As in LMDeploy, `cache_max_entry_count` is the fraction of the memory that is free once the
weights are loaded (CPU: available RAM; CUDA: free device memory). Unlike LMDeploy, the cache
never takes more than the running sequences can use (max_batch_size x session_len tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    bytes_per_token: int
    free_bytes: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token


def free_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def plan_cache(free_bytes: int, fraction: float, bytes_per_token: int, block_size: int,
               max_batch_size: int, session_len: int, max_tokens: int | None = None) -> CachePlan:
    """max_tokens, when given, is an absolute size that replaces the fraction."""
    if max_tokens is not None:
        return CachePlan(-(-max_tokens // block_size), block_size, bytes_per_token, free_bytes)
    by_memory = int(free_bytes * fraction) // (bytes_per_token * block_size)
    blocks_per_seq = -(-session_len // block_size)
    by_use = max_batch_size * blocks_per_seq
    return CachePlan(min(by_memory, by_use), block_size, bytes_per_token, free_bytes)
