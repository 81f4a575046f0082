"""How many KV blocks to allocate.

As in LMDeploy, `cache_max_entry_count` is the fraction of the memory that is free once the
weights are loaded (CPU: available RAM; CUDA: free device memory). Unlike LMDeploy, the cache
never takes more than the running sequences can use (max_batch_size x session_len tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantserve.config import ConfigError


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


def budget_bytes(entry_count: float | str, free_bytes: int) -> int:
    """--cache-max-entry-count: a fraction of the free memory, or an absolute size ("2GiB")."""
    from quantserve.values import parse_size

    if isinstance(entry_count, str):
        try:
            entry_count = float(entry_count)
        except ValueError:
            return int(parse_size(entry_count))
    return int(free_bytes * entry_count)


def plan_cache(free_bytes: int, entry_count: float | str, bytes_per_token: int, block_size: int,
               max_batch_size: int, session_len: int, max_tokens: int | None = None) -> CachePlan:
    """Blocks for the budget; max_tokens (--cache-max-tokens) replaces it when given. Asking for
    more than the free memory is an error before anything is allocated."""
    wanted = max_tokens * bytes_per_token if max_tokens is not None else budget_bytes(entry_count, free_bytes)
    if wanted > free_bytes:
        raise ConfigError(f"the KV cache budget ({wanted / 1e9:.2f} GB) is more than the free memory "
                          f"({free_bytes / 1e9:.2f} GB)", field="cache_max_entry_count")
    if max_tokens is not None:
        return CachePlan(-(-max_tokens // block_size), block_size, bytes_per_token, free_bytes)
    by_memory = wanted // (bytes_per_token * block_size)
    blocks_per_seq = -(-session_len // block_size)
    by_use = max_batch_size * blocks_per_seq
    return CachePlan(min(by_memory, by_use), block_size, bytes_per_token, free_bytes)
