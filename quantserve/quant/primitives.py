"""Group-wise integer quantization of a weight matrix, the arithmetic every method shares.

A weight W [N, K] (out, in) is cut along K into groups of `group_size` input channels; each
(row, group) gets a scale s and an integer zero point z, and stores codes q in [0, 2^bits - 1]:

    W ≈ (q - z) * s

Asymmetric: the group's [min, max] (with 0 inside) maps onto the code range. Symmetric (GPTQ's
sym=True): z sits in the middle of the range and s covers max |W|. A clip ratio < 1 shrinks the
range before rounding (AWQ's clipping search picks it per group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)


class QuantError(ValueError):
    """Invalid quantization settings for this model; the message says what would work."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128           # -1: one group per row (per-channel)
    symmetric: bool = False

    @property
    def max_code(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    """Integer codes and per-(row, group) parameters of one linear weight: W = (q - zeros) * scales
    with integer zero points (AWQ, GPTQ, RTN), or W = q * scales + mins with float offsets (GGUF's
    Q4_1 / Q4_K blocks carry a float min, which no integer zero point reproduces)."""
    q: torch.Tensor                      # [N, K] uint8 codes
    scales: torch.Tensor                 # [N, G] float32
    zeros: torch.Tensor | None           # [N, G] uint8 integer zero points, or None with mins
    spec: QuantSpec
    mins: torch.Tensor | None = None     # [N, G] float32 offsets, when there are no integer zeros

    def offsets(self) -> torch.Tensor:
        """[N, G] float32 m with W = q * scales + m."""
        return self.mins.float() if self.mins is not None else -self.zeros.float() * self.scales.float()

    def dequantize(self) -> torch.Tensor:
        if self.mins is None:
            return dequantize(self.q, self.scales, self.zeros, self.spec)
        return affine_dequantize(self.q, self.scales, self.mins, self.spec)


def check_spec(spec: QuantSpec, in_features: int, name: str = "a layer") -> None:
    if spec.bits not in SUPPORTED_BITS:
        raise QuantError(f"--w-bits {spec.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if spec.group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantError(f"--w-group-size {spec.group_size} is not supported; use 32, 64, 128 or -1 (per channel)")
    if spec.group_size != -1 and in_features % spec.group_size:
        valid = [g for g in (32, 64, 128) if in_features % g == 0] + [-1]
        raise QuantError(f"--w-group-size {spec.group_size} does not divide {name}'s {in_features} input features; "
                         f"valid group sizes for this model: {', '.join(map(str, valid))}")


def group_params(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0, min_zero: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, G, g] -> scales [N, G], zeros [N, G] (float, integral values). min_zero=1 (GPTQ's
    format stores zero - 1): a group whose zero would be 0 (no negative weights) spreads its
    range over codes 1..max instead."""
    clip = torch.as_tensor(clip, dtype=w.dtype)
    if spec.symmetric:
        absmax = w.abs().amax(-1) * clip
        scales = (2 * absmax / spec.max_code).clamp(min=1e-10)
        zeros = torch.full_like(scales, (spec.max_code + 1) // 2)
        return scales, zeros
    lo = (w.amin(-1) * clip).clamp(max=0)
    hi = (w.amax(-1) * clip).clamp(min=0)
    scales = ((hi - lo) / spec.max_code).clamp(min=1e-10)
    zeros = (-lo / scales).round().clamp(0, spec.max_code)
    if min_zero:
        shift = zeros < min_zero
        scales = torch.where(shift, (hi / (spec.max_code - min_zero)).clamp(min=1e-10), scales)
        zeros = zeros.clamp(min=min_zero)
    return scales, zeros


def quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0, min_zero: int = 0
             ) -> QuantizedWeight:
    """w: [N, K] float -> codes and parameters. clip: scalar or [N, G] ratios in (0, 1]."""
    n, k = w.shape
    grouped = w.float().reshape(n, spec.groups(k), spec.width(k))          # [N, G, g]
    scales, zeros = group_params(grouped, spec, clip, min_zero)
    q = (grouped / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).round().clamp(0, spec.max_code)
    return QuantizedWeight(q.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8), spec)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """codes [N, K], scales / zeros [N, G] -> W [N, K] float32."""
    n, k = q.shape
    grouped = q.float().reshape(n, spec.groups(k), spec.width(k))
    return ((grouped - zeros.float().unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, k)


def affine_dequantize(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """codes [N, K], scales / mins [N, G] -> W = q * scale + min [N, K] float32."""
    n, k = q.shape
    grouped = q.float().reshape(n, spec.groups(k), spec.width(k))
    return (grouped * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)).reshape(n, k)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize and dequantize at once (for searches and for pseudo-quantized evaluation)."""
    return quantize(w, spec, clip).dequantize().to(w.dtype)
