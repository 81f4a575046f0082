"""Linears: one class per runtime kind, chosen once by a convert-for-runtime step after loading.

Loading fills the two holders, `Linear` (a float weight [N, K]) and `QuantLinear` (integer
codes + scales + mins, W = code * scale + min); both also run as the plain-PyTorch reference. `runtime_linear` then
swaps each for what the model's ops run: `PanelLinear` (float weights repacked into the native
kernels' panels) or `IntPanelLinear` (integer codes in the VNNI panel layout). Model files ask
`make_linear` for every projection and never branch on quantization or device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantserve.quant.primitives import QuantizedWeight, QuantSpec, affine_dequantize


class Linear(nn.Module):
    """A float weight; the reference runtime: torch's F.linear in the weight's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))   # [N, K]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def load_weight(self, w: torch.Tensor) -> None:
        self.weight.data.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> [T, N] in x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


class QuantLinear(nn.Module):
    """Integer codes (4-bit two to a byte), W = codes * scales + mins; the reference runtime
    dequantizes one layer per call."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qw.q.shape
        self.spec: QuantSpec = qw.spec
        self.register_buffer("codes", pack_nibbles(qw.q) if qw.spec.bits == 4 else qw.q.contiguous())  # [N, K/2]
        self.register_buffer("scales", qw.scales.float().contiguous())                            # [N, G]
        self.register_buffer("mins", qw.offsets().contiguous())                                   # [N, G]
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_nibbles(self.codes) if self.spec.bits == 4 else self.codes       # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = affine_dequantize(self.unpacked_codes(), self.scales, self.mins, self.spec)
        return F.linear(x.float(), w, self.bias).to(x.dtype)


class PanelLinear(nn.Module):
    """Float weights in the native kernels' panels, multiplied with float32 activations."""

    def __init__(self, ops, linear: Linear):
        super().__init__()
        self.ops = ops
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, self.wtype = ops.pack_float(linear.weight.data)
        self.register_buffer("packed", packed)          # [N/16, K, 16], or bf16 pairs [N/16, K/2, 16, 2]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.float(), requires_grad=False)

    @classmethod
    def prepacked(cls, ops, packed: torch.Tensor, wtype: int, in_features: int, out_features: int,
                  bias: torch.Tensor | None) -> PanelLinear:
        """Panels `quantserve convert` saved, taken as they are (memory-mapped, never copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.ops, self.in_features, self.out_features, self.wtype = ops, in_features, out_features, wtype
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return self

    def load_weight(self, w: torch.Tensor) -> None:
        self.packed, self.wtype = self.ops.pack_float(w.to(self.packed.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x.float().contiguous(), self.packed, self.wtype, self.out_features, self.bias)


class IntPanelLinear(nn.Module):
    """Integer codes in the VNNI panel layout (kernels.pack_quantized), activations quantized to
    int8 inside the kernel."""

    def __init__(self, ops, linear: QuantLinear):
        super().__init__()
        self.ops = ops
        self.in_features, self.out_features, self.spec = linear.in_features, linear.out_features, linear.spec
        codes, scales, mins = ops.pack_int(linear.unpacked_codes(), linear.scales, linear.mins, linear.spec.bits)
        self.register_buffer("qcodes", codes)           # 8-bit [P, K/4, 8, 4] | 4-bit [P, K/8, 8, 4]
        self.register_buffer("qscales", scales)         # [P, G, 8] float16
        self.register_buffer("qmins", mins)             # [P, G, 8] float16
        self.bias = linear.bias

    @classmethod
    def prepacked(cls, ops, panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor], spec: QuantSpec,
                  in_features: int, out_features: int, bias: torch.Tensor | None) -> IntPanelLinear:
        """VNNI panels `quantserve convert` saved, taken as they are (memory-mapped, never copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.ops, self.in_features, self.out_features, self.spec = ops, in_features, out_features, spec
        for name, t in zip(("qcodes", "qscales", "qmins"), panels):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return self

    @property
    def group(self) -> int:
        return self.in_features if self.spec.group_size == -1 else self.spec.group_size

    def panels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qcodes, self.qscales, self.qmins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.linear_int(x.float().contiguous(), self.panels(), self.out_features, self.spec.bits,
                                self.group, self.bias)
        return y.to(x.dtype)


def runtime_linear(ops, linear: nn.Module) -> nn.Module:
    """The runtime kind for a loaded holder: native panels where the ops take the layer."""
    if isinstance(linear, QuantLinear):
        group = linear.in_features if linear.spec.group_size == -1 else linear.spec.group_size
        takes = ops.takes_int(linear.in_features, group, linear.spec.bits)
        return IntPanelLinear(ops, linear) if takes else linear
    if isinstance(linear, Linear) and ops.takes_float(linear.weight):
        return PanelLinear(ops, linear)
    return linear


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


RUNTIME_KINDS = (Linear, QuantLinear, PanelLinear, IntPanelLinear)
