"""InternLM2 / InternLM2.5: fused `wqkv` interleaved per KV group, w1/w3/w2 feed-forward.

wqkv rows, per KV head j: [Q_(j,0) .. Q_(j,G-1), K_j, V_j], each head_dim rows (G = Hq / Hkv).
"""
from __future__ import annotations

import re

import torch

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.families.llama import fuse, rename
from quantserve.models.layers import ModelArgs
from quantserve.quant.arch import Arch, ScaleGroup


def model_args(cfg: dict) -> ModelArgs:
    """The config uses Llama's key names; `bias` covers both wqkv and wo."""
    args = llama.model_args({"max_position_embeddings": 32768, **cfg})
    args.model_type = "internlm2"
    args.qkv_bias = args.o_bias = cfg.get("bias", False)
    return args


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


# AWQ / GPTQ: the quantized linears and where AWQ folds its input scales (HF names)
RECIPE = Arch(
    linears=("model.layers.{i}.attention.wqkv", "model.layers.{i}.attention.wo",
             "model.layers.{i}.feed_forward.w1", "model.layers.{i}.feed_forward.w3",
             "model.layers.{i}.feed_forward.w2"),
    scale_groups=(
        ScaleGroup("model.layers.{i}.attention_norm", ("model.layers.{i}.attention.wqkv",)),
        ScaleGroup("model.layers.{i}.ffn_norm", ("model.layers.{i}.feed_forward.w1",
                                                 "model.layers.{i}.feed_forward.w3"),
                   mlp_down="model.layers.{i}.feed_forward.w2"),
        ScaleGroup("model.layers.{i}.feed_forward.w3", ("model.layers.{i}.feed_forward.w2",)),
    ),
    inputs={"attention.wqkv": "attn.qkv", "attention.wo": "attn.o", "feed_forward.w1": "mlp.gate_up",
            "feed_forward.w3": "mlp.gate_up", "feed_forward.w2": "mlp.down"})

# llama.cpp splits wqkv into q, k and v (permuted, as for Llama) and names the rest as Llama's:
# its internlm2 files are read as the Llama checkpoint they compute
FAMILY = Family(("internlm2",), model_args, convert_weights, RECIPE,
                GgufArch("internlm2", "llama", "LlamaForCausalLM", permuted_qk=True))
