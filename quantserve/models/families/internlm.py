"""InternLM (v1, e.g. internlm-chat-7b): the Llama layout and names, with biases on q, k, v and o
(`bias`, true unless the config says otherwise). RoPE from `rotary` ({"base", "type"}) where the
config has it; its "dynamic" type only stretches the base past max_position_embeddings."""
from __future__ import annotations

from quantserve.models.families import Family, llama
from quantserve.models.layers import ModelArgs

convert_weights = llama.convert_weights


def model_args(cfg: dict) -> ModelArgs:
    rotary = cfg.get("rotary") or {}
    rope = {"rope_theta": rotary.get("base", 10000.0)}
    if rotary.get("type") == "dynamic":
        rope["rope_scaling"] = {"rope_type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
    args = llama.model_args({"max_position_embeddings": 2048, **rope, **cfg})
    args.qkv_bias = args.o_bias = cfg.get("bias", True)
    return args


FAMILY = Family(("internlm",), model_args, convert_weights, llama.RECIPE)
