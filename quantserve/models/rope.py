"""Rotary position embedding (HF `rotate_half` convention) with a precomputed cos/sin table,
and the RoPE scaling variants of transformers (linear, dynamic NTK, YaRN, Llama 3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from quantserve.config import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_from_config(cfg: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either HF convention: `rope_theta` + `rope_scaling` (transformers 4)
    or `rope_parameters` (transformers 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
    scaling = cfg.get("rope_scaling") or (params if rope_type(params) != "default" else None)
    return float(theta), scaling


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int,
                    session_len: int) -> tuple[torch.Tensor, float]:
    """([D/2] float32 inverse frequencies, cos/sin scale), computed as transformers does.

    dynamic NTK is applied once for the whole session: the base is stretched for session_len
    when it exceeds max_position_embeddings (transformers re-stretches it as a sequence grows,
    which would leave keys already in the cache rotated at other frequencies)."""
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = scaling or {}
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic":
        seq = max(session_len, max_position_embeddings)
        factor = float(scaling["factor"])
        theta = theta * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / theta ** exponents
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, scaling, max_position_embeddings)
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    return inv, 1.0


def _yarn(inv: torch.Tensor, dim: int, base: float, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, blend in between."""
    original = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attention)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: divide low frequencies by factor, keep high ones, smooth the band between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None,
                 max_position_embeddings: int, max_positions: int):
        super().__init__()
        inv, attention = inv_frequencies(head_dim, theta, scaling, max_position_embeddings, max_positions)
        pos = torch.arange(max(max_positions, 1), dtype=torch.float32)
        freqs = torch.outer(pos, inv)                               # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                     # [P, D]
        self.register_buffer("cos", emb.cos() * attention, persistent=False)
        self.register_buffer("sin", emb.sin() * attention, persistent=False)


def apply_rope(x: torch.Tensor, heads: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate, in place, the first `heads` heads of every row of x: [T, >= heads * D]."""
    d = cos.shape[1]
    v = x[:, :heads * d].view(x.shape[0], heads, d)                # [T, heads, D]
    c = cos[positions].unsqueeze(1).to(x.dtype)                   # [T, 1, D]
    s = sin[positions].unsqueeze(1).to(x.dtype)
    v.copy_(v * c + _rotate_half(v) * s)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
