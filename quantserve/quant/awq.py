"""AWQ (Lin et al., 2023): activation-aware scaling, then a clipping search, then group quantization.

For each scale group (a norm or linear, and the linears reading its output) with input x:
  1. s = mean|x|^alpha per input channel (normalised), alpha from a 20-point grid in [0, 1)
     minimising the output error over sampled calibration rows: of the whole MLP
     (down(silu(gate x) * up x), gate and up quantized) for the group feeding gate/up, as the
     paper's code scores that block; of the group's own linears, || Q(W diag(s)) diag(s)^-1 X - W X ||,
     elsewhere (--search-scale; without it alpha = 0.5, as LMDeploy);
  2. s is folded in: the producer's output is divided by s (a norm's weight, or a linear's
     rows), the consumers' input columns are multiplied by s, so the float model is unchanged;
  3. clipping: per (output row, group), the range is shrunk by the ratio in [0.5, 1] that
     minimises the group's output error on sampled rows (q/k are left unclipped, as in the
     paper's code: attention scores are sensitive to their extremes).
Attention's groups are scored on their linears' outputs, not the attention block's output
(that needs whole sequences; the statistics keep sampled rows).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quantserve.quant.arch import Arch, ScaleGroup
from quantserve.quant.calib import InputStats, too_few_rows
from quantserve.quant.primitives import QuantizedWeight, QuantSpec, fake_quantize, quantize

ALPHA_GRID = [i / 20 for i in range(20)]
CLIP_GRID = [1 - 0.5 * i / 20 for i in range(20)]          # 1.0 down to 0.525
NO_CLIP = ("q_proj", "k_proj", "wqkv")


def awq(weights: dict[str, torch.Tensor], arch: Arch, num_layers: int, stats: dict[str, InputStats],
        spec: QuantSpec, search_scale: bool, clip: bool, progress: bool = True, experts: int = 0,
        data_free: list[str] | None = None) -> dict[str, QuantizedWeight]:
    """Rescales `weights` (HF names) in place; returns the quantized linears. An expert that fewer
    than MIN_EXPERT_ROWS calibration tokens reach is rounded to nearest, named in `data_free`."""
    quantized: dict[str, QuantizedWeight] = {}
    data_free = [] if data_free is None else data_free
    for layer in tqdm(range(num_layers), desc="AWQ", unit="layer", disable=not progress, file=sys.stderr):
        input_scales: dict[str, torch.Tensor] = {}       # linear -> s its input columns were multiplied by
        for group in arch.layer_groups(layer, experts):
            if all(f"{c}.weight" in weights for c in (group.producer, *group.consumers)):
                s = apply_scale_group(weights, arch, layer, group, stats, spec, search_scale)
                input_scales.update({c: s for c in group.consumers} if s is not None else {})
        for name in arch.layer_linears(layer, experts):
            if f"{name}.weight" not in weights:           # the MLP this layer does not have (dense / MoE)
                continue
            w, seen = weights[f"{name}.weight"].float(), stats[arch.input_site(name, layer)]
            ratios = 1.0
            if too_few_rows(name, seen.rows):
                data_free.append(name)
            elif clip and not name.endswith(NO_CLIP):     # the model now feeds this linear x / s
                ratios = clip_ratios(w, seen.rows_sample() / input_scales.get(name, 1.0), spec)
            quantized[name] = quantize(w, spec, ratios)
    return quantized


def apply_scale_group(weights: dict, arch: Arch, layer: int, group: ScaleGroup, stats: dict, spec: QuantSpec,
                      search: bool) -> torch.Tensor | None:
    """Search and fold the group's input scales; returns s (None when the group does not apply)."""
    producer, consumers = group.producer, list(group.consumers)          # concrete names (Arch.layer_groups)
    w = torch.cat([weights[f"{c}.weight"].float() for c in consumers])           # [sum N, K]
    prod_w = weights[f"{producer}.weight"]
    if group.needs_same_width and prod_w.shape[0] != w.shape[1]:
        return None                                     # GQA: v_proj's rows do not line up with o_proj's inputs
    x = stats[arch.input_site(consumers[0], layer)]
    if too_few_rows(consumers[0], x.rows):              # an expert (almost) no calibration token reached
        return None
    mean_abs = x.mean_abs
    output = linear_output
    if group.mlp_down:
        output = mlp_output(weights[f"{group.mlp_down}.weight"].float())
    alpha = best_alpha(w, mean_abs, x.rows_sample(), spec, output) if search else 0.5
    s = scales_for(mean_abs, alpha)
    fold(weights, arch, group, s)
    return s


def fold(weights: dict, arch: Arch, group: ScaleGroup, s: torch.Tensor) -> None:
    """The consumers' input columns times s, the producer's output divided by s: the float model
    computes the same function (AWQ's and SmoothQuant's migration)."""
    for c in group.consumers:
        weights[f"{c}.weight"] = (weights[f"{c}.weight"].float() * s).to(weights[f"{c}.weight"].dtype)
    prod_w = weights[f"{group.producer}.weight"]
    if prod_w.dim() == 1:                               # a norm: its output is divided by s
        off = arch.norm_offset                          # Gemma's (1 + w): (1 + w') = (1 + w) / s
        weights[f"{group.producer}.weight"] = ((prod_w.float() + off) / s - off).to(prod_w.dtype)
    else:                                               # a linear: its output rows
        weights[f"{group.producer}.weight"] = (prod_w.float() / s.unsqueeze(1)).to(prod_w.dtype)
        bias = weights.get(f"{group.producer}.bias")
        if bias is not None:
            weights[f"{group.producer}.bias"] = (bias.float() / s).to(bias.dtype)


def scales_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


Output = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # (rows [S, K], weight [N, K]) -> [S, *]


def linear_output(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rows @ w.t()


def mlp_output(down: torch.Tensor) -> Output:
    """The MLP's output when w stacks (gate; up); down: [H, I] stays float."""
    def output(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ w.t()).chunk(2, dim=-1)                                # [S, I] each
        return (F.silu(gate) * up) @ down.t()                                     # [S, H]
    return output


def best_alpha(w: torch.Tensor, mean_abs: torch.Tensor, rows: torch.Tensor, spec: QuantSpec,
               output: Output = linear_output) -> float:
    """The grid alpha whose scaled quantization best reproduces the output on the sampled rows."""
    reference = output(rows, w)
    errors = []
    for alpha in ALPHA_GRID:
        s = scales_for(mean_abs, alpha)
        wq = fake_quantize(w * s, spec) / s
        errors.append(float((output(rows, wq) - reference).pow(2).mean()))
    return ALPHA_GRID[min(range(len(errors)), key=errors.__getitem__)]


def clip_ratios(w: torch.Tensor, rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w: [N, K], rows: [S, K] -> per (row, group) ratio [N, G] minimising the group's output error.

    The error of a group's weight change d over the rows is mean_s (x_s . d)^2 = d^T C d with
    C = X^T X / S per group, so the rows enter once, through C, not once per ratio."""
    n, k = w.shape
    g, width = spec.groups(k), spec.width(k)
    xg = rows.reshape(rows.shape[0], g, width).transpose(0, 1)                    # [G, S, w]
    gram = xg.transpose(1, 2) @ xg / rows.shape[0]                                 # [G, w, w]
    wg = w.reshape(n, g, width).transpose(0, 1)                                    # [G, N, w]
    best_err = torch.full((n, g), float("inf"))
    best = torch.ones(n, g)
    for ratio in CLIP_GRID:
        dq = fake_quantize(w, spec, ratio).reshape(n, g, width).transpose(0, 1) - wg    # [G, N, w]
        err = ((dq @ gram) * dq).sum(-1).t()                                       # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
