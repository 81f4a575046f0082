"""Rotary position embedding (HF `rotate_half` convention) with a precomputed cos/sin table,
over the first `rotary_dim` dimensions of each head (all of them unless the config gives a
`partial_rotary_factor`), and the RoPE scaling variants of transformers (linear, dynamic NTK,
YaRN, Llama 3, LongRoPE)."""
from __future__ import annotations

import math

import torch
from torch import nn

from quantserve.config import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_from_config(cfg: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either HF convention: `rope_theta` + `rope_scaling` (transformers 4)
    or `rope_parameters` (transformers 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
    scaling = cfg.get("rope_scaling") or (params if rope_type(params) != "default" else None)
    return float(theta), scaling


def rotary_dim(cfg: dict, head_dim: int) -> int:
    """How many leading dimensions of each head RoPE rotates."""
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    return int(head_dim * factor)


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


def longrope(dim: int, theta: float, p: dict, max_position_embeddings: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    float, int]:
    """LongRoPE (Phi-3): (short inverse frequencies, long ones, cos/sin scale, the length where
    transformers switches from the short factors to the long)."""
    original = int(p["original_max_position_embeddings"])
    factor = p.get("factor") or max_position_embeddings / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    short, long = (1.0 / (torch.tensor(p[k], dtype=torch.float32) * base) for k in ("short_factor", "long_factor"))
    return short, long, float(attention), original


class RotaryEmbedding(nn.Module):
    """cos, sin: [P, rotary_dim] tables. LongRoPE rotates positions below the original context
    with its short factors and later ones with its long factors: what transformers' forward
    computes over its own cache, token by token (its generate() instead recomputes the whole
    cache with the long factors once the sequence crosses; keys in a paged cache stay as stored)."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None,
                 max_position_embeddings: int, max_positions: int):
        super().__init__()
        pos = torch.arange(max(max_positions, 1), dtype=torch.float32)
        if rope_type(scaling) == "longrope":
            short, long, attention, switch = longrope(rotary_dim, theta, scaling, max_position_embeddings)
            freqs = torch.where((pos < switch)[:, None], torch.outer(pos, short), torch.outer(pos, long))
        else:
            inv, attention = inv_frequencies(rotary_dim, theta, scaling, max_position_embeddings, max_positions)
            freqs = torch.outer(pos, inv)                           # [P, R/2]
        emb = torch.cat([freqs, freqs], dim=-1)                     # [P, R]
        self.register_buffer("cos", emb.cos() * attention, persistent=False)
        self.register_buffer("sin", emb.sin() * attention, persistent=False)


def apply_rope(x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> None:
    """Rotate, in place, the first cos.shape[1] dims of the first `heads` heads of every row of
    x: [T, >= heads * head_dim]."""
    r = cos.shape[1]
    v = x[:, :heads * head_dim].view(x.shape[0], heads, head_dim)[..., :r]   # [T, heads, R]
    c = cos[positions].unsqueeze(1).to(x.dtype)                   # [T, 1, R]
    s = sin[positions].unsqueeze(1).to(x.dtype)
    v.copy_(v * c + _rotate_half(v) * s)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
