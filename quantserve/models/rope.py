"""Rotary position embedding (HF `rotate_half` convention) with a precomputed cos/sin table."""
from __future__ import annotations

import torch
from torch import nn

from quantserve import kernels
from quantserve.config import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


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


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, computed exactly as transformers does."""
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope scaling {kind!r} is not supported yet; supported: {SUPPORTED_ROPE_TYPES}")
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    # dynamic NTK only changes frequencies past max_position_embeddings
    return inv


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None,
                 max_position_embeddings: int, max_positions: int):
        super().__init__()
        inv = inv_frequencies(head_dim, theta, scaling)
        pos = torch.arange(max(max_positions, 1), dtype=torch.float32)
        freqs = torch.outer(pos, inv)                               # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                     # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, heads: int, positions: torch.Tensor) -> None:
        """Rotate, in place, the first `heads` heads of every row of x: [T, >= heads * D]."""
        d = self.cos.shape[1]
        if kernels.native(x, d):
            kernels.rope_(x, heads, d, positions, self.cos, self.sin)
            return
        v = x[:, :heads * d].view(x.shape[0], heads, d)                # [T, heads, D]
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)            # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        v.copy_(v * cos + _rotate_half(v) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
