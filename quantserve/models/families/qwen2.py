"""Qwen2 / Qwen2.5: the Llama layout with a bias on q/k/v."""
from __future__ import annotations

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.layers import ModelArgs

convert_weights = llama.convert_weights


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args(cfg)
    args.qkv_bias = True
    args.o_bias = False
    return args


FAMILY = Family(("qwen2",), model_args, convert_weights, llama.RECIPE,
                GgufArch("qwen2", "qwen2", "Qwen2ForCausalLM", permuted_qk=False))
