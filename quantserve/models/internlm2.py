"""InternLM2 / InternLM2.5: fused `wqkv` interleaved per KV group, w1/w3/w2 feed-forward.

wqkv rows, per KV head j: [Q_(j,0) .. Q_(j,G-1), K_j, V_j], each head_dim rows (G = Hq / Hkv).
"""
from __future__ import annotations

import re

import torch

from quantserve.models.layers import ModelArgs, eos_ids
from quantserve.models.rope import rope_from_config
from quantserve.models.llama import fuse, rename


def model_args(cfg: dict) -> ModelArgs:
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_from_config(cfg)
    bias = cfg.get("bias", False)
    return ModelArgs(
        model_type="internlm2",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=bias,
        o_bias=bias,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
    )


RENAMES = [
    (r"^model\.tok_embeddings\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"^model\.layers\.(\d+)\.attention_norm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.ffn_norm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.attention\.wo\.", r"layers.\1.attn.o."),
    (r"^model\.layers\.(\d+)\.feed_forward\.w2\.", r"layers.\1.mlp.down."),
]
_WQKV_RE = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")
_FFN_RE = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.(w1|w3)\.(weight|bias)$")


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if m := _WQKV_RE.match(name):
            out[f"layers.{m.group(1)}.attn.qkv.{m.group(2)}"] = deinterleave_wqkv(tensor, args)
        elif m := _FFN_RE.match(name):
            index = 0 if m.group(2) == "w1" else 1
            parts.setdefault(f"layers.{m.group(1)}.mlp.gate_up.{m.group(3)}", {})[index] = tensor
        elif "rotary_emb" not in name:
            out[rename(name, RENAMES)] = tensor
    out.update(fuse(parts))
    return out


def deinterleave_wqkv(w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """[Hkv * (G + 2) * D, ...] grouped rows -> [Q; K; V] rows in HF head order."""
    g = args.num_heads // args.num_kv_heads
    d = args.head_dim
    grouped = w.reshape(args.num_kv_heads, g + 2, d, *w.shape[1:])   # [Hkv, G+2, D, ...]
    q = grouped[:, :g].reshape(-1, *w.shape[1:])                     # [Hq * D, ...]
    k = grouped[:, g].reshape(-1, *w.shape[1:])                      # [Hkv * D, ...]
    v = grouped[:, g + 1].reshape(-1, *w.shape[1:])
    return torch.cat([q, k, v], dim=0)
