"""Paged KV cache storage and the attention that reads it.

Data flow per layer: the model projects K/V for the new tokens of every scheduled request →
`PagedKVCache.write` puts them in their slots (slot = block_id * block_size + offset) →
`paged_attention` reads each request's whole context back through its block table.

Decode tokens (one new token per request) are attended in one batched call; prefill chunks one
request at a time (a chunk with no earlier context never touches the cache on the read side).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from quantserve import kernels


@dataclass
class PrefillChunk:
    """One request's run of new tokens in the flat batch."""

    start: int            # index of its first token in the flat batch
    num_new: int          # tokens in this chunk
    context_len: int      # tokens in the cache once this chunk is written (earlier + new)
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer.

    The flat batch holds `num_decode` single-token decodes first, then the prefill chunks.
    """

    slot_mapping: torch.Tensor          # [T] int64, cache slot of each new token
    num_decode: int
    decode_block_tables: torch.Tensor   # [B, max_blocks] int64 (padded with block 0)
    decode_context_lens: torch.Tensor   # [B] int64
    decode_mask: torch.Tensor           # [B, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk]


class PagedKVCache:
    """K and V for every layer in fixed-size blocks: [L, num_blocks, block_size, Hkv, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = lazy_zeros(shape, dtype, device)
        self.v = lazy_zeros(shape, dtype, device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] for the new tokens (rows may be strided); slots: [T]."""
        hkv, d = k.shape[1:]
        if kernels.native(k, d) and kernels.usable(self.k):
            kernels.kv_write(k.flatten(1), slots, self.k[layer])
            kernels.kv_write(v.flatten(1), slots, self.v[layer])
            return
        self.k[layer].view(-1, hkv, d).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, hkv, d).index_copy_(0, slots, v.to(self.v.dtype))

    def read(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids: [..., n] -> k, v: [..., n * block_size, Hkv, D] in the compute dtype."""
        k = self.k[layer][block_ids]
        v = self.v[layer][block_ids]
        shape = (*block_ids.shape[:-1], -1, *k.shape[-2:])
        return k.reshape(shape), v.reshape(shape)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros whose pages the OS maps on first touch (calloc), so a large cache costs memory
    only as it fills; masked-out slots must hold finite values, hence zeros, not empty."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    same_width = {2: np.int16, 4: np.float32, 1: np.uint8}[torch.empty(0, dtype=dtype).element_size()]
    return torch.from_numpy(np.zeros(shape, dtype=same_width)).view(dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                    meta: AttentionMetadata, cache: PagedKVCache, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to the cache) -> [T, Hq * D]."""
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = _decode_attention(q[:nd], layer, meta, cache, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_new)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], layer, chunk, cache, scale)
    return out.flatten(1)


def _decode_attention(q: torch.Tensor, layer: int, meta: AttentionMetadata,
                      cache: PagedKVCache, scale: float) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]; the query heads of one KV group act as query rows."""
    if kernels.native(q, q.shape[2]) and kernels.usable(cache.k) and q.shape[1] // cache.k.shape[3] <= 16:
        return kernels.decode_attention(q.contiguous(), cache.k[layer], cache.v[layer],
                                        meta.decode_block_tables, meta.decode_context_lens, scale)
    b, hq, d = q.shape
    k, v = cache.read(layer, meta.decode_block_tables)        # [B, S, Hkv, D]
    hkv = k.shape[2]
    qg = q.view(b, hkv, hq // hkv, d)                          # [B, Hkv, G, D]
    o = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(b, hq, d)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                       chunk: PrefillChunk, cache: PagedKVCache, scale: float) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D] -> [N, Hq, D], causal over the whole context."""
    n = chunk.num_new
    if chunk.context_len > n:
        k, v = cache.read(layer, chunk.block_ids)               # [S_pad, Hkv, D]
        k, v = k[:chunk.context_len], v[:chunk.context_len]
    s = k.shape[0]
    # query i sits at position s - n + i and sees keys 0..s - n + i
    mask = None
    if s > n:
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril_(s - n)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)
