"""Causal prefill attention straight from the paged KV cache (qs_prefill_attention in cpu_kernels.c).

Flash-attention style: tiles of query rows (with the query heads that share a KV head) against
tiles of keys, online softmax, float32 accumulation; K/V are converted (or dequantized) one tile
at a time as they are read, never gathered into a copy of the context, and tiles past the
diagonal are skipped.
"""
from __future__ import annotations

import ctypes

import torch

from quantserve.kernels import MAX_HEAD_DIM, W_TYPES, quant_cache


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, k_parts: tuple[torch.Tensor, ...],
                      v_parts: tuple[torch.Tensor, ...], block_ids: torch.Tensor, context_len: int,
                      scale: float, window: int = 0) -> torch.Tensor:
    """q: [N, Hq, D] float32, the last N positions of a context of `context_len` tokens (rows may
    be strided, heads contiguous); k_parts / v_parts: PagedKVCache.parts() of one layer, the
    context (these N tokens included) already written; block_ids: the context's blocks in order.
    -> [N, Hq, D] float32, causal: row i sees keys 0 .. context_len - N + i (the last `window` of
    them, when a sliding window is given)."""
    n, hq, d = q.shape
    _, block_size, hkv, _ = k_parts[0].shape
    if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != d:
        raise ValueError("q must be float32 with contiguous heads")
    if d % 16 or d > MAX_HEAD_DIM or hq % hkv or not 0 < n <= context_len:
        raise ValueError(f"unsupported shape: N={n} context_len={context_len} Hq={hq} Hkv={hkv} D={d}")
    block_ids = block_ids.to(torch.int64).contiguous()
    if block_ids.numel() * block_size < context_len:
        raise ValueError(f"{block_ids.numel()} blocks of {block_size} cannot hold {context_len} tokens")
    out = torch.empty(n, hq, d, dtype=torch.float32)
    args = (block_ids.data_ptr(), context_len, n, hq, hkv, d, block_size, scale, out.data_ptr(),
            torch.get_num_threads(), window)
    if len(k_parts) == 3:
        kc, vc = quant_cache(k_parts, d), quant_cache(v_parts, d)
        lib.qs_prefill_attention_quant(q.data_ptr(), q.stride(0), ctypes.byref(kc), ctypes.byref(vc), *args)
    else:
        lib.qs_prefill_attention(q.data_ptr(), q.stride(0), k_parts[0].data_ptr(), v_parts[0].data_ptr(),
                                 W_TYPES[k_parts[0].dtype], *args)
    return out
