"""Hands out KV cache blocks to requests, and shares full blocks between them (prefix caching).

A request holding `n` tokens of K/V owns ceil(n / block_size) blocks, listed in order in its
`block_ids` (its block table). With prefix caching, every full block is keyed by a SHA-256 of
its whole token prefix (the previous block's key + its tokens + the KV dtype; the chain starts from
the request's LoRA adapter, if any), so two requests
whose first k blocks of tokens agree share those k blocks: reference-counted, never copied,
never written again (a request only writes into its own last, partial block). A block whose
count drops to 0 goes back to the free pool but keeps its contents and key; it is reused as
a cache hit until allocation needs it, least recently freed first (LRU eviction). A block in
use (count > 0) is never evicted.

Pins: an owner (a WebSocket session) may keep one reference on the cached blocks of a prefix
(its conversation so far) after its request ends, so the next turn finds them however much other
traffic passes meanwhile. Pinned blocks are in use: not free, counted in the KV usage. Pins
together hold at most `max_pinned_blocks` (room for one whole session is always left to running
requests); a pin that would pass that limit first unpins the least recently pinned owners.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from quantserve.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 cache_tag: str = "", max_pinned_blocks: int = 0):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caching = enable_prefix_caching
        self.cache_tag = cache_tag.encode()
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.block_key: dict[int, bytes] = {}          # block -> key, for full cached blocks
        self.cached: dict[bytes, int] = {}             # key -> block
        self.max_pinned_blocks = max_pinned_blocks
        self.pins: OrderedDict[str, list[int]] = OrderedDict()     # owner -> its pinned blocks, oldest first
        self.num_pinned_blocks = 0          # a plain count: other threads read it while pins change
        self.queried_tokens = 0
        self.hit_tokens = 0

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
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            request.block_ids.append(block)

    def free(self, request: Request) -> None:
        self._unref(request.block_ids)
        request.block_ids = []
        request.block_keys = []

    def _unref(self, blocks: list[int]) -> None:
        for block in reversed(blocks):                   # the prefix's head is evicted last
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if block not in self.block_key:          # nothing cached in it: reuse it first
                    self.free_blocks.move_to_end(block, last=False)

    # ---- prefix caching ------------------------------------------------------------------

    def cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (a preempted request finds its
        generated tokens too); at least one token is left to compute, so it still gets logits."""
        if not self.caching or request.block_ids or (request.pooling and request.pooling.reads_every_token):
            return []
        tokens = request.all_token_ids
        blocks, key = [], self._root(request)
        for i in range((len(tokens) - 1) // self.block_size):
            key = self._key(key, tokens[i * self.block_size:(i + 1) * self.block_size])
            if key not in self.cached:
                break
            blocks.append(self.cached[key])
        return blocks

    def claim_prefix(self, request: Request, blocks: list[int]) -> None:
        """Give the request the cached blocks; its first len(blocks) blocks need no compute."""
        self.hit_tokens += len(blocks) * self.block_size
        for block in blocks:
            self.free_blocks.pop(block, None)
            self.ref_counts[block] += 1
        request.block_ids = list(blocks)
        request.block_keys = [self.block_key[b] for b in blocks]
        request.num_computed_tokens = len(blocks) * self.block_size
        request.num_cached_tokens = min(request.num_computed_tokens, len(request.prompt_token_ids))

    def free_after_claim(self, blocks: list[int]) -> int:
        return self.num_free_blocks - sum(1 for b in blocks if self.ref_counts[b] == 0)

    def register_full_blocks(self, request: Request) -> None:
        """Key the request's blocks that its computed tokens have filled."""
        if not self.caching:
            return
        full = request.num_computed_tokens // self.block_size
        tokens = request.all_token_ids
        while len(request.block_keys) < full:
            i = len(request.block_keys)
            prev = request.block_keys[-1] if request.block_keys else self._root(request)
            key = self._key(prev, tokens[i * self.block_size:(i + 1) * self.block_size])
            request.block_keys.append(key)
            block = request.block_ids[i]
            if key not in self.cached and block not in self.block_key:
                self.cached[key] = block
                self.block_key[block] = key

    # ---- pins ----------------------------------------------------------------------------

    def pin(self, owner: str, keys: Sequence[bytes]) -> None:
        """Pin the cached blocks of the prefix `keys` name (up to the first one not cached) for
        `owner`, in place of its earlier pin."""
        blocks = []
        for key in keys[:self.max_pinned_blocks]:
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:              # referenced before the old pin goes, so none is freed between
            self.free_blocks.pop(block, None)
            self.ref_counts[block] += 1
        self.unpin(owner)
        while self.pins and self.num_pinned_blocks + len(blocks) > self.max_pinned_blocks:
            self.unpin(next(iter(self.pins)))
        self.pins[owner] = blocks
        self.num_pinned_blocks += len(blocks)

    def unpin(self, owner: str) -> None:
        """The owner's blocks become ordinary cached blocks again (evictable once unused)."""
        blocks = self.pins.pop(owner, [])
        self.num_pinned_blocks -= len(blocks)
        self._unref(blocks)

    @staticmethod
    def _root(request: Request) -> bytes:
        """Where a request's key chain starts: a LoRA adapter's K/V differ from the base model's
        and from every other adapter's, so its blocks are keyed apart (ids are never reused)."""
        return f"lora:{request.lora_id}".encode() if request.lora_id else b""

    def _key(self, prev: bytes, tokens: list[int]) -> bytes:
        h = hashlib.sha256(prev + self.cache_tag)
        h.update(b",".join(str(t).encode() for t in tokens))
        return h.digest()

    def _forget(self, block: int) -> None:
        key = self.block_key.pop(block, None)
        if key is not None:
            del self.cached[key]
