"""The linear factory: model files ask it for every projection and never branch on quantization.

On CPU with the native kernels, weights are repacked once after loading (`finalize`) into the
panel layout of quantserve.kernels and multiplied in float32 whatever their storage dtype
(float32 or bfloat16); elsewhere torch's F.linear runs in the weight dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantserve import kernels
from quantserve.quant.primitives import QuantizedWeight, QuantSpec, dequantize


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))   # [N, K]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None                              # [N/16, K, 16]
        self.spec: QuantSpec | None = None                                    # set for integer weights

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Hold integer codes instead of a float weight: 4-bit codes two to a byte."""
        self.weight = None
        self.spec = qw.spec
        self.register_buffer("codes", pack_nibbles(qw.q) if qw.spec.bits == 4 else qw.q.contiguous())  # [N, K/2]
        self.register_buffer("scales", qw.scales.float().contiguous())                            # [N, G]
        self.register_buffer("zeros", qw.zeros.contiguous())                                      # [N, G]

    def dequantized(self) -> torch.Tensor:
        codes = unpack_nibbles(self.codes) if self.spec.bits == 4 else self.codes
        return dequantize(codes, self.scales, self.zeros, self.spec)

    @property
    def qpacked(self) -> tuple[torch.Tensor, ...] | None:
        """The native kernel's (codes, scales, mins) panels, once finalized for it."""
        return (self.qcodes, self.qscales, self.qmins) if hasattr(self, "qcodes") else None

    def finalize(self) -> None:
        """Repack for the native kernel when it can run this layer; drops the [N, K] copy."""
        if self.spec is not None:
            self.bias = None if self.bias is None else nn.Parameter(self.bias.data.float())
            if kernels.usable(self.codes) and kernels.quantized_usable(self.in_features, self.spec.group_size,
                                                                        self.spec.bits):
                codes = unpack_nibbles(self.codes) if self.spec.bits == 4 else self.codes
                packed = kernels.pack_quantized(codes, self.scales, self.zeros, self.spec.bits)
                for name in ("codes", "scales", "zeros"):
                    delattr(self, name)
                for name, t in zip(("qcodes", "qscales", "qmins"), packed):
                    self.register_buffer(name, t)
            return
        if kernels.usable(self.weight):
            self.packed = kernels.pack_weight(self.weight.data)
            self.bias = None if self.bias is None else nn.Parameter(self.bias.data.float())
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> [T, N] in x's dtype."""
        if self.packed is not None:
            return kernels.linear(x.float().contiguous(), self.packed, self.out_features, self.bias)
        if self.qpacked is not None:
            return kernels.linear_quantized(x.float().contiguous(), self.qpacked, self.out_features, self.spec.bits,
                                            self.spec.group_size, self.bias).to(x.dtype)
        if self.spec is not None:          # reference path: one layer dequantized at a time
            return F.linear(x.float(), self.dequantized(), self.bias).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] -> [N, K/2] bytes, even k in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def make_linear(in_features: int, out_features: int, bias: bool) -> Linear:
    return Linear(in_features, out_features, bias=bias)


def tied_head(embedding: torch.Tensor) -> Linear:
    """An output projection sharing the input embedding's values ([V, H])."""
    head = Linear(embedding.shape[1], embedding.shape[0], bias=False)
    head.weight = nn.Parameter(embedding, requires_grad=False)
    return head
