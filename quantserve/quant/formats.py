"""Packed checkpoint layouts the ecosystem reads: AutoAWQ GEMM and AutoGPTQ / GPTQModel.

AWQ (GEMM, 4-bit): for a linear with codes q [N, K] (out, in) and G groups along K
    qweight int32 [K, N/8]   eight output columns per word, nibble i holds column AWQ_ORDER[i]
    qzeros  int32 [G, N/8]   the zero points, packed the same way
    scales  fp16  [G, N]
GPTQ (4 or 8 bits, v1 "zero minus one" convention):
    qweight int32 [K*bits/32, N]  32/bits consecutive input rows per word, low bits first
    qzeros  int32 [G, N*bits/32]  (zero - 1) of consecutive output columns, low bits first
    scales  fp16  [G, N]
    g_idx   int32 [K]             the group of each input channel
"""
from __future__ import annotations

import torch

from quantserve.quant.primitives import QuantError, QuantizedWeight, QuantSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """values [R, C] ints < 2^bits -> int32 [R, C*bits/32]: consecutive columns share a word."""
    per = 32 // bits
    r, c = values.shape
    v = values.to(torch.int64).reshape(r, c // per, per)
    if order is not None:
        v = v[:, :, list(order)]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    return _to_int32(words)


def _unpack_columns(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2 ** bits - 1)           # [R, W, per]
    if order is not None:
        v = v[:, :, torch.argsort(torch.tensor(order))]
    return v.reshape(words.shape[0], -1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_awq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    if w.spec.bits != 4:
        raise QuantError("AutoAWQ's GEMM format holds 4-bit weights; use --w-bits 4 (or lite auto_gptq for 8 bits)")
    q = w.q.t().contiguous()                                              # [K, N]
    return {"qweight": _pack_columns(q, 4, AWQ_ORDER),
            "qzeros": _pack_columns(w.zeros.t().contiguous(), 4, AWQ_ORDER),
            "scales": w.scales.t().contiguous().half()}


def unpack_awq(tensors: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    q = _unpack_columns(tensors["qweight"], 4, AWQ_ORDER).t()             # [N, K]
    zeros = _unpack_columns(tensors["qzeros"], 4, AWQ_ORDER).t()          # [N, G]
    return QuantizedWeight(q.to(torch.uint8).contiguous(), tensors["scales"].float().t().contiguous(),
                           zeros.to(torch.uint8).contiguous(), QuantSpec(4, group_size))


def pack_gptq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    bits = w.spec.bits
    if bits not in (4, 8):
        raise QuantError(f"{bits}-bit weights cannot be packed (4 or 8 bits); evaluate them with --fake-quant")
    if int(w.zeros.min()) < 1:
        raise QuantError("GPTQ's format stores zero - 1: zero points must be >= 1 (quantize with min_zero=1)")
    k, groups = w.q.shape[1], w.scales.shape[1]
    return {"qweight": _pack_rows(w.q, bits),
            "qzeros": _pack_columns(w.zeros.t().to(torch.int64) - 1, bits),
            "scales": w.scales.t().contiguous().half(),
            "g_idx": (torch.arange(k) // (k // groups)).to(torch.int32)}


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> int32 [K*bits/32, N]: consecutive input channels share a word."""
    return _pack_columns(q.contiguous(), bits).t().contiguous()


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> tuple[QuantizedWeight, torch.Tensor]:
    """-> codes in checkpoint order and g_idx (which may not be monotonic with act-order)."""
    q = _unpack_columns(tensors["qweight"].t().contiguous(), bits)          # [N, K]
    zeros = _unpack_columns(tensors["qzeros"], bits).t() + 1               # [N, G]
    g_idx = tensors.get("g_idx")
    k = q.shape[1]
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
    return (QuantizedWeight(q.to(torch.uint8).contiguous(), tensors["scales"].float().t().contiguous(),
                            zeros.to(torch.uint8).contiguous(), QuantSpec(bits, group_size)), g_idx.to(torch.int64))
