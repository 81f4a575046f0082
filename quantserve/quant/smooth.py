"""SmoothQuant (Xiao et al., 2023), LMDeploy's `lite smooth_quant`: W8A8.

Activations carry a few outlier channels that make them hard to quantize; weights do not. For
each scale group (AWQ's groups: a norm and the linears reading its output, or a linear and the
one reading it when the shapes line up), per input channel j,

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)          (alpha = 0.5 by default)

moves that difficulty into the weights: the producer's output is divided by s and the consumers'
columns multiplied by it (awq.fold), so the float model is unchanged. Then every linear is
rounded to int8 per output channel, symmetric. At run time the integer kernels quantize the
activations to int8 dynamically, per row in blocks of 32 (finer than SmoothQuant's per token).

Saved as LMDeploy's QLinear state: `{linear}.weight` int8 [out, in] (code - 128), `{linear}.scale`
[out, 1] float16, biases as they are, the smoothed norms as float, and
quantization_config = {"quant_method": "smooth_quant", "quant_dtype": "int8"}.
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from quantserve.quant.arch import Arch, ScaleGroup
from quantserve.quant.awq import fold
from quantserve.quant.calib import InputStats, too_few_rows
from quantserve.quant.primitives import QuantizedWeight, QuantSpec, quantize

SPEC = QuantSpec(8, -1, symmetric=True)     # per output channel, zero point 128
QUANTIZATION_CONFIG = {"quant_method": "smooth_quant", "quant_dtype": "int8", "bits": 8, "group_size": -1}


def smooth_quant(weights: dict[str, torch.Tensor], arch: Arch, num_layers: int, stats: dict[str, InputStats],
                 alpha: float, progress: bool = True, experts: int = 0) -> dict[str, QuantizedWeight]:
    """Smooths `weights` (HF names) in place; returns every linear rounded to int8 per channel."""
    quantized: dict[str, QuantizedWeight] = {}
    for layer in tqdm(range(num_layers), desc="SmoothQuant", unit="layer", disable=not progress, file=sys.stderr):
        for group in arch.layer_groups(layer, experts):
            if all(f"{c}.weight" in weights for c in (group.producer, *group.consumers)):
                smooth_group(weights, arch, layer, group, stats, alpha)
        for name in arch.layer_linears(layer, experts):
            if f"{name}.weight" in weights:
                quantized[name] = quantize(weights[f"{name}.weight"].float(), SPEC)
    return quantized


def smooth_group(weights: dict, arch: Arch, layer: int, group: ScaleGroup, stats: dict, alpha: float) -> None:
    """Migrate one group's activation outliers into its consumers' columns."""
    w = torch.cat([weights[f"{c}.weight"].float() for c in group.consumers])          # [sum N, K]
    if group.needs_same_width and weights[f"{group.producer}.weight"].shape[0] != w.shape[1]:
        return                                          # GQA: the rows do not line up with the inputs
    x = stats[arch.input_site(group.consumers[0], layer)]
    if too_few_rows(group.consumers[0], x.rows):
        return
    s = x.abs_max.clamp(min=1e-5).pow(alpha) / w.abs().amax(0).clamp(min=1e-5).pow(1 - alpha)   # [K]
    fold(weights, arch, group, s.clamp(min=1e-5))


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """LMDeploy's QLinear tensors for one linear."""
    return {"weight": (qw.q.short() - 128).to(torch.int8), "scale": qw.scales.half().reshape(-1, 1)}


def unpack(weight: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    codes = (weight.short() + 128).to(torch.uint8)                                           # [N, K]
    scales = scale.float().reshape(-1, 1)
    return QuantizedWeight(codes, scales, torch.full_like(scales, 128, dtype=torch.uint8), SPEC)
