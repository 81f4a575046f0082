"""Qwen3 (dense): the Llama layout with an RMSNorm over each q and k head (`q_norm`, `k_norm`,
[head_dim]) before RoPE, no q/k/v bias by default, and a head_dim of its own (128 where
hidden / heads is not)."""
from __future__ import annotations

import torch

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.layers import ModelArgs

RENAMES = [*llama.RENAMES,
           (r"^model\.layers\.(\d+)\.self_attn\.q_norm\.", r"layers.\1.attn.q_norm."),
           (r"^model\.layers\.(\d+)\.self_attn\.k_norm\.", r"layers.\1.attn.k_norm.")]


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args(cfg)
    args.qk_norm = True
    return args


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return llama.convert_weights(weights, args, RENAMES)


FAMILY = Family(("qwen3",), model_args, convert_weights, llama.RECIPE,
                GgufArch("qwen3", "qwen3", "Qwen3ForCausalLM", permuted_qk=False))
