"""Mixtral: Mistral's attention with a mixture of experts in every layer (`block_sparse_moe`: a
router `gate` over `num_local_experts` experts of `intermediate_size`, w1 = gate, w3 = up,
w2 = down), its top-k weights always renormalised."""
from __future__ import annotations

import torch

from quantserve.models.families import Family, llama, qwen3_moe
from quantserve.models.layers import ModelArgs

PARTS = {"w1": ("gate_up", 0), "w3": ("gate_up", 1), "w2": ("down", 0)}


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args(cfg)
    args.num_experts, args.experts_per_token = cfg.get("num_local_experts", 8), cfg.get("num_experts_per_tok", 2)
    args.expert_intermediate_size, args.norm_topk_prob = args.intermediate_size, True
    args.moe_layers = tuple(range(args.num_layers))
    return args


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return qwen3_moe.convert_weights(weights, args, PARTS, llama.convert_weights)


def gguf_names(tensors: dict) -> dict:
    """llama.cpp writes Mixtral as its `llama` architecture with experts: those tensors under HF
    Mixtral's own names."""
    parts = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    renamed = {}
    for name, t in tensors.items():
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if ".mlp.experts." in name:
            base, part, suffix = name.replace(".mlp.", ".block_sparse_moe.").rsplit(".", 2)
            name = f"{base}.{parts.get(part, part)}.{suffix}"
        renamed[name] = t
    return renamed


FAMILY = Family(("mixtral",), model_args, convert_weights, qwen3_moe.recipe("block_sparse_moe", "w1", "w3", "w2"),
                gguf_rename=gguf_names)
