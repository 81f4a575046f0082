"""GPTQ (Frantar et al., 2022): quantize a linear column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of its inputs.

H = 2 X^T X / n from the calibration inputs (accumulated by the calibration hooks), damped by
--damp-percent of its mean diagonal; the Cholesky factor of H^-1 drives the updates, applied
lazily in blocks of 128 columns. --desc-act (the default) quantizes columns by decreasing H
diagonal with "static groups": each group's scale and zero are fixed beforehand from the
original weights, so the groups stay contiguous in the checkpoint (g_idx is k // group size)
and any GPTQ loader reads it. Layers are quantized one after another, each from the inputs the
already quantized layers before it produce (quant/sequential.py).
"""
from __future__ import annotations

import torch

from quantserve.quant.arch import Arch
from quantserve.quant.calib import InputStats, too_few_rows
from quantserve.quant.primitives import QuantizedWeight, QuantSpec, group_params, quantize
from quantserve.quant.sequential import LayerwiseRunner

BLOCK = 128


def gptq(weights: dict[str, torch.Tensor], arch: Arch, runner: LayerwiseRunner, spec: QuantSpec,
         damp_percent: float, desc_act: bool, progress: bool = True, experts: int = 0,
         data_free: list[str] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every layer's linears in turn; the runner feeds each layer the quantized outputs of
    the last. An expert that fewer than MIN_EXPERT_ROWS calibration tokens reach is rounded to
    nearest instead, named in `data_free`."""
    quantized: dict[str, QuantizedWeight] = {}
    data_free = [] if data_free is None else data_free

    def quantize_layer(layer: int, stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
        names = [n for n in arch.layer_linears(layer, experts) if f"{n}.weight" in weights]
        for name in names:
            w, seen = weights[f"{name}.weight"].float(), stats[arch.input_site(name, layer)]
            if too_few_rows(name, seen.hessian_rows):
                data_free.append(name)
                quantized[name] = quantize(w, spec, min_zero=1)
            else:
                quantized[name] = gptq_linear(w, seen.hessian(), spec, damp_percent, desc_act)
        return {f"{name}.weight": quantized[name].dequantize() for name in names}

    runner.run(quantize_layer, progress)
    return quantized


def inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, in float64 for stability."""
    h = h.double().clone()
    h += damp_percent * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_linear(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp_percent: float,
                desc_act: bool) -> QuantizedWeight:
    """w: [N, K], h: [K, K] -> codes with GPTQ's error compensation."""
    n, k = w.shape
    width = spec.width(k)
    w = w.clone()
    dead = h.diagonal() == 0
    h = h.clone()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales, zeros = static_params(w, spec) if desc_act else (torch.empty(n, spec.groups(k)),
                                                              torch.empty(n, spec.groups(k)))
    perm = torch.argsort(h.diagonal(), descending=True) if desc_act else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, damp_percent).float()
    codes = torch.zeros(n, k)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = torch.zeros(n, end - start)
        for j in range(start, end):
            col = int(perm[j])
            g = col // width
            if not desc_act and col % width == 0:                 # a new group: its range from the updated weights
                s, z = group_params(w[:, j:j + width].unsqueeze(1), spec, min_zero=1)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = (w[:, j] / scales[:, g] + zeros[:, g]).round().clamp(0, spec.max_code)
            codes[:, col] = q
            err = (w[:, j] - (q - zeros[:, g]) * scales[:, g]) / hinv[j, j]
            w[:, j:end] -= err.unsqueeze(1) * hinv[j, j:end].unsqueeze(0)
            errors[:, j - start] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), spec)


def static_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    return group_params(w.reshape(n, spec.groups(k), spec.width(k)), spec, min_zero=1)
