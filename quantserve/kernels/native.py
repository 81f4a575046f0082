"""NativeOps: the model's operations on one build of cpu_kernels.c (avx512 or avx2).

An instance wraps one loaded library, so tests can hold every build the CPU runs side by side.
It has the same methods as the plain-PyTorch `TorchOps` (models/ops.py) and takes the same
arguments; whether a model's shapes suit it is decided once, at load (`misfit`), never per call.
Caches and models are used through their attributes only (`parts`, `kv_bits`, `head_dim`).
"""
from __future__ import annotations

import ctypes

import torch

from quantserve import envs
from quantserve.kernels import (CACHE_TYPES, ISAS, MAX_HEAD_DIM, PANEL, QBLOCK, W_TYPES, pack_quantized, pack_weight,
                                param_groups, quant_cache)
from quantserve.kernels import bf16, flash
from quantserve.kernels.fused import FusedDecoder

MAX_GROUP = 16          # query heads per KV head the decode-attention kernel keeps in registers


class NativeOps:
    def __init__(self, lib: ctypes.CDLL, isa: str, bf16_dot: bool | None = None):
        self.lib, self.name = lib, isa
        self.bf16_dot = bf16.available(lib) and envs.bf16_dot() if bf16_dot is None else bf16_dot

    def describe(self) -> str:
        extra = ", bf16 weights on vdpbf16ps" if self.bf16_dot else ""
        return f"{self.name} ({ISAS[self.name][2]}{extra})"

    @staticmethod
    def misfit(hidden: int, intermediate: int, head_dim: int, heads: int, kv_heads: int,
               rotary_dim: int) -> str | None:
        """Why these model shapes cannot run natively, or None."""
        if hidden % 16 or intermediate % 16 or head_dim % 16 or rotary_dim % 16:
            return "hidden, intermediate, head and rotary sizes must be multiples of 16"
        if head_dim > MAX_HEAD_DIM:
            return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
        if heads // kv_heads > MAX_GROUP:
            return f"more than {MAX_GROUP} query heads per KV head"
        return None

    # -- linears -----------------------------------------------------------------------------
    def takes_float(self, weight: torch.Tensor) -> bool:
        return weight.dtype in W_TYPES

    def takes_int(self, in_features: int, group: int, bits: int) -> bool:
        return bits in (4, 8) and in_features % QBLOCK == 0 and group % QBLOCK == 0

    def pack_float(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[N, K] -> (panels, wtype): bfloat16 weights as k-pairs for vdpbf16ps ([N/16, K/2, 16, 2])
        where the CPU has it, else [N/16, K, 16] in the weight's dtype."""
        if self.bf16_dot and weight.dtype == torch.bfloat16 and weight.shape[1] % bf16.PAIR == 0:
            return bf16.pack_pairs(weight), bf16.W_PAIRS
        return pack_weight(weight), W_TYPES[weight.dtype]

    def panel_rows(self, packed: torch.Tensor, wtype: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight held in `packed` (a tied embedding read from the head): [T, K]."""
        if wtype == bf16.W_PAIRS:
            return bf16.embedding_rows(packed, ids)
        return packed[ids // PANEL, :, ids % PANEL]

    pack_int = staticmethod(pack_quantized)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, wtype: int, n: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        """x: [M, K] float32 contiguous -> [M, n] float32."""
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        self.lib.qs_linear(x.data_ptr(), m, k, packed.data_ptr(), wtype, _ptr(bias), y.data_ptr(), n,
                           torch.get_num_threads())
        return y

    def linear_int(self, x: torch.Tensor, panels: tuple[torch.Tensor, ...], n: int, bits: int, group: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
        """x: [M, K] float32 contiguous; panels: pack_quantized() -> [M, n] float32."""
        m, k = x.shape
        codes, scales, mins = panels
        y = torch.empty(m, n, dtype=torch.float32)
        self.lib.qs_linear_q(x.data_ptr(), m, k, codes.data_ptr(), bits, scales.data_ptr(), mins.data_ptr(),
                             group, _ptr(bias), y.data_ptr(), n, torch.get_num_threads())
        return y

    # -- elementwise -------------------------------------------------------------------------
    def rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        """x: [T, H] float32; residual (updated in place) += x; returns rmsnorm(residual or x) * weight."""
        out = torch.empty_like(x)
        self.lib.qs_add_rmsnorm(x.data_ptr(), _ptr(residual), weight.data_ptr(), eps, out.data_ptr(),
                                x.shape[0], x.shape[1])
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [T, 2I] float32 contiguous -> silu(gate) * up: [T, I]."""
        t, two_i = gate_up.shape
        out = torch.empty(t, two_i // 2, dtype=torch.float32)
        self.lib.qs_silu_mul(gate_up.data_ptr(), out.data_ptr(), t, two_i // 2)
        return out

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
        """In place on the first `heads` heads of each row of x: [T, >= heads * D] float32; the
        first cos.shape[1] dims of each head rotate."""
        self.lib.qs_rope(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, cos.shape[1],
                         positions.data_ptr(), cos.data_ptr(), sin.data_ptr())

    # -- KV cache and attention --------------------------------------------------------------
    def kv_write(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] (rows may be strided) into their slots of one layer."""
        for which, x in (("k", k), ("v", v)):
            src, parts = x.flatten(1), cache.parts(which, layer)             # [T, Hkv * D]
            if cache.kv_bits:
                data, scale, zero = parts
                fixed = cache.static_params(which, layer)
                self.lib.qs_kv_write_quant(src.data_ptr(), src.stride(0), src.shape[0], x.shape[1], x.shape[2],
                                           slots.data_ptr(), data.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                           cache.kv_bits, param_groups(data, scale),
                                           *(t.data_ptr() if t is not None else None for t in fixed))
            else:
                self.lib.qs_kv_write(src.data_ptr(), src.stride(0), src.shape[0], src.shape[1], slots.data_ptr(),
                                     parts[0].data_ptr(), CACHE_TYPES[parts[0].dtype])

    def decode_attention(self, q: torch.Tensor, layer: int, meta, cache, scale: float, window: int = 0) -> torch.Tensor:
        """q: [B, Hq, D] float32 (rows may be strided) -> [B, Hq, D], each row over its whole context
        (its last `window` tokens with a sliding window)."""
        b, hq, d = q.shape
        k_parts, v_parts = cache.parts("k", layer), cache.parts("v", layer)
        _, block_size, hkv, _ = k_parts[0].shape
        tables = meta.decode_block_tables
        out = torch.empty(b, hq, d, dtype=torch.float32)
        args = (tables.data_ptr(), meta.decode_context_lens.data_ptr(), b, hq, hkv, d, block_size, tables.shape[1],
                scale, out.data_ptr(), torch.get_num_threads(), window)
        if cache.kv_bits:
            kc, vc = quant_cache(k_parts, d), quant_cache(v_parts, d)
            self.lib.qs_decode_attention_quant(q.data_ptr(), q.stride(0), ctypes.byref(kc), ctypes.byref(vc), *args)
        else:
            self.lib.qs_decode_attention(q.data_ptr(), q.stride(0), k_parts[0].data_ptr(), v_parts[0].data_ptr(),
                                         CACHE_TYPES[k_parts[0].dtype], *args)
        return out

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, chunk, cache,
                          scale: float, window: int = 0) -> torch.Tensor:
        """q: [N, Hq, D] -> [N, Hq, D], causal over the chunk's whole context (or a sliding window),
        read in place."""
        return flash.prefill_attention(self.lib, q, cache.parts("k", layer), cache.parts("v", layer),
                                       chunk.block_ids, chunk.context_len, scale, window)

    def fused_decoder(self, model) -> FusedDecoder | None:
        return FusedDecoder.build(model)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()

