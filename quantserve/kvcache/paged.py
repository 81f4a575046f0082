"""Paged KV cache storage and the attention that reads it.

Data flow per layer: the model projects K/V for the new tokens of every scheduled request →
the model's ops `kv_write` them into their slots (slot = block_id * block_size + offset) →
`paged_attention` has the ops read each request's whole context back through its block table.

Decode tokens (one new token per request) are attended in one batched call; prefill chunks one
request at a time. The plain-PyTorch references of the write and of both attentions live here
(the torch ops run them; the native kernels are tested against them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantserve.kvcache.quant import bytes_per_head_token, dequantize_kv, groups_for, quantize_kv, quantize_kv_static


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
    """K and V for every layer in fixed-size blocks: [L, num_blocks, block_size, Hkv, D].

    kv_bits 0 stores `dtype`; 8 / 4 store codes (uint8, two int4 per byte) plus a float16 scale
    and a uint8 zero per token, head (and group: int4 keys have two) beside them (kvcache/quant.py). Reads always return
    float32 (or `dtype`) values, so the model never knows which.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu", kv_bits: int = 0):
        self.block_size, self.num_blocks, self.kv_bits, self.dtype = block_size, num_blocks, kv_bits, dtype
        self.head_dim = head_dim
        self.static: dict[str, torch.Tensor] | None = None     # set_static(): lite kv_qparams' parameters
        rows = (num_layers, num_blocks, block_size, num_kv_heads)
        width = head_dim * kv_bits // 8 if kv_bits else head_dim
        store = torch.uint8 if kv_bits else dtype
        self.k = committed_zeros((*rows, width), store, device)
        self.v = committed_zeros((*rows, width), store, device)
        for which in ("k", "v") if kv_bits else ():
            groups = groups_for(which, kv_bits)
            params = rows if groups == 1 else (*rows, groups)
            setattr(self, f"{which}_scale", committed_zeros(params, torch.float16, device))
            setattr(self, f"{which}_zero", committed_zeros(params, torch.uint8, device))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_bits: int = 0) -> int:
        return num_layers * num_kv_heads * bytes_per_head_token(head_dim, kv_bits, dtype)

    @property
    def nbytes(self) -> int:
        extra = self.k_scale.nbytes + self.k_zero.nbytes + self.v_scale.nbytes + self.v_zero.nbytes if self.kv_bits else 0
        return self.k.nbytes + self.v.nbytes + extra

    def parts(self, which: str, layer: int) -> tuple[torch.Tensor, ...]:
        """(codes or values, scale, zero) of one layer's K or V."""
        if not self.kv_bits:
            return (getattr(self, which)[layer],)
        return tuple(getattr(self, f"{which}{suffix}")[layer] for suffix in ("", "_scale", "_zero"))

    def set_static(self, params: dict[str, torch.Tensor]) -> None:
        """Static KV quantization (lite kv_qparams): k_scale, k_zero, v_scale, v_zero, each
        [L, Hkv, groups], replace the per-token parameters computed online; the cache's layout
        and readers are unchanged (every token of a head gets the same scale and zero)."""
        self.static = {name: t.contiguous() for name, t in params.items()}

    def static_params(self, which: str, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale [Hkv, G], zero [Hkv, G]) of one layer's K or V when static; (None, None) online."""
        if self.static is None:
            return None, None
        return self.static[f"{which}_scale"][layer], self.static[f"{which}_zero"][layer]

    def static_pointers(self) -> dict:
        """The static parameters for the fused decode step (no entries: online)."""
        if self.static is None:
            return {}
        return {f"{which}_fixed_{part}": self.static[f"{which}_{part}"].data_ptr()
                for which in ("k", "v") for part in ("scale", "zero")}

    def write_reference(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] for the new tokens (rows may be strided) into their slots; the
        plain-PyTorch write that the native kv_write is tested against."""
        for which, x in (("k", k), ("v", v)):
            values = self._quantized(which, layer, x) if self.kv_bits else (x,)
            for dst, src in zip(self.parts(which, layer), values):
                flat = dst.view(-1, *dst.shape[2:])                      # [slots, Hkv(, width)]
                flat.index_copy_(0, slots, src.to(dst.dtype))

    def _quantized(self, which: str, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale, zero = self.static_params(which, layer)
        if scale is None:
            return quantize_kv(x.float(), self.kv_bits, groups_for(which, self.kv_bits))
        return quantize_kv_static(x.float(), self.kv_bits, scale, zero)

    def read(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids: [..., n] -> k, v: [..., n * block_size, Hkv, D] (float32 when quantized)."""
        out = []
        for which in ("k", "v"):
            parts = [p[block_ids] for p in self.parts(which, layer)]
            x = dequantize_kv(*parts, self.kv_bits) if self.kv_bits else parts[0]
            out.append(x.reshape(*block_ids.shape[:-1], -1, *x.shape[-2:]))
        return out[0], out[1]


def committed_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros written at allocation, so every page is resident from the start: the cache's memory
    is the start-up table's figure at once, not after traffic has walked every block (prefix
    caching hands out untouched blocks before it evicts cached ones). Masked-out slots must hold
    finite values, hence zeros, not empty."""
    return torch.zeros(shape, dtype=dtype, device=device)


def paged_attention(ops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                    meta: AttentionMetadata, cache: PagedKVCache, scale: float, window: int = 0,
                    softcap: float = 0.0) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to the cache) -> [T, Hq * D]: the
    decodes in one call, each prefill chunk in its own, on the model's ops. window > 0: each
    token sees only the last `window` positions (itself included); softcap > 0 (the PyTorch ops
    only, chosen at load): scores become softcap * tanh(score / softcap)."""
    capped = {"softcap": softcap} if softcap else {}
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = ops.decode_attention(q[:nd], layer, meta, cache, scale, window, **capped)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_new)
        out[rows] = ops.prefill_attention(q[rows], k[rows], v[rows], layer, chunk, cache, scale, window, **capped)
    return out.flatten(1)


def decode_attention_reference(q: torch.Tensor, layer: int, meta: AttentionMetadata,
                               cache: PagedKVCache, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]; the query heads of one KV group act as query rows."""
    b, hq, d = q.shape
    k, v = cache.read(layer, meta.decode_block_tables)        # [B, S, Hkv, D]
    k, v = k.to(q.dtype), v.to(q.dtype)
    hkv = k.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d)                       # [B, Hkv, G, D]
    mask = meta.decode_mask
    if window:                                                 # positions before the last `window` left out
        first = (meta.decode_context_lens - window).view(b, 1, 1, 1).to(q.device)
        mask = mask & (torch.arange(mask.shape[-1], device=q.device) >= first)
    if softcap:                                                # scores capped before the mask: by hand
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale                 # [B, Hkv, G, S]
        scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), v.transpose(1, 2)).reshape(b, hq, d)
    o = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.reshape(b, hq, d)


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                                chunk: PrefillChunk, cache: PagedKVCache, scale: float, window: int = 0,
                                softcap: float = 0.0) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D] -> [N, Hq, D], causal over the whole context."""
    n = chunk.num_new
    if chunk.context_len > n or cache.kv_bits:
        k, v = cache.read(layer, chunk.block_ids)               # [S_pad, Hkv, D]
        k, v = k[:chunk.context_len].to(q.dtype), v[:chunk.context_len].to(q.dtype)
    else:    # attend to the values as stored, as every later read will
        k, v = k.to(cache.dtype).to(q.dtype), v.to(cache.dtype).to(q.dtype)
    return causal_attention(q, k, v, scale, window, softcap)


SCORE_BYTES = 64 << 20      # bound on one block of attention scores


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """q: [N, Hq, D], the last N of the S positions of k, v: [S, Hkv, D] -> [N, Hq, D].

    Blocks of queries against only the keys they can see (half the work of a full square),
    the G query heads of a KV head batched against it (no repeated K/V). window > 0: a row sees
    only the last `window` keys up to its own position."""
    n, hq, d = q.shape
    s, hkv, _ = k.shape
    if s == n and not window and not softcap:          # no past: torch's fused causal kernel (flash attention on CPU), ~1.9x faster at 2048
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                           v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                                           enable_gqa=True)           # [1, Hq, N, D]
        return o[0].transpose(0, 1)
    g = hq // hkv
    qg = q.view(n, hkv, g, d).permute(1, 2, 0, 3)              # [Hkv, G, N, D]
    kt = k.permute(1, 2, 0).unsqueeze(1)                       # [Hkv, 1, D, S]
    vv = v.transpose(0, 1).unsqueeze(1)                        # [Hkv, 1, S, D]
    out = torch.empty(hkv, g, n, d, dtype=q.dtype, device=q.device)
    block = max(16, min(256, SCORE_BYTES // (4 * hq * s)))
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        end = s - n + i1                                       # keys the block's last query sees
        scores = torch.matmul(qg[:, :, i0:i1], kt[..., :end]) * scale      # [Hkv, G, b, end]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        # row r sits at position s - n + i0 + r and sees keys 0..s - n + i0 + r
        visible = torch.ones(i1 - i0, end, dtype=torch.bool, device=q.device).tril_(s - n + i0)
        if window:                                             # and keys after position - window only
            visible.triu_(s - n + i0 - window + 1)
        scores.masked_fill_(~visible, float("-inf"))
        out[:, :, i0:i1] = torch.matmul(scores.softmax(dim=-1), vv[:, :, :end])
    return out.permute(2, 0, 1, 3).reshape(n, hq, d)
