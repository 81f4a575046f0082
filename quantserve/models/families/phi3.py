"""Phi-3 / Phi-3.5 / Phi-4-mini (`phi3`): the Llama decoder with q/k/v already fused
(`qkv_proj`, rows [q; k; v]) and gate/up fused (`gate_up_proj`, rows [gate; up]), as the engine
holds them; LongRoPE scaling and a partial rotary factor (Phi-4-mini rotates 3/4 of each head)."""
from __future__ import annotations

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.rope import rope_type
from quantserve.quant.arch import Arch, ScaleGroup

RENAMES = [*llama.RENAMES,
           (r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.", r"layers.\1.attn.qkv."),
           (r"^model\.layers\.(\d+)\.mlp\.gate_up_proj\.", r"layers.\1.mlp.gate_up.")]


def model_args(cfg: dict):
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if rope_type(rope) == "longrope":               # the pretraining length is a top-level key in Phi-3
        rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        cfg = {**cfg, "rope_scaling": rope}
    return llama.model_args(cfg)


def convert_weights(weights, args):
    return llama.convert_weights(weights, args, RENAMES)


# AWQ / GPTQ (HF names). The fused producers cannot take a scale for only part of their rows, so
# v -> o and up -> down are left out; the norms feed the fused projections whole.
RECIPE = Arch(
    linears=("model.layers.{i}.self_attn.qkv_proj", "model.layers.{i}.self_attn.o_proj",
             "model.layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.down_proj"),
    scale_groups=(
        ScaleGroup("model.layers.{i}.input_layernorm", ("model.layers.{i}.self_attn.qkv_proj",)),
        ScaleGroup("model.layers.{i}.post_attention_layernorm", ("model.layers.{i}.mlp.gate_up_proj",),
                   mlp_down="model.layers.{i}.mlp.down_proj"),
    ),
    inputs={"self_attn.qkv_proj": "attn.qkv", "self_attn.o_proj": "attn.o", "mlp.gate_up_proj": "mlp.gate_up",
            "mlp.down_proj": "mlp.down"})

def gguf_config(meta, reader, config: dict) -> dict:
    """llama.cpp's phi3 file: the partial rotary factor, sliding window and LongRoPE factors (tensors)."""
    import numpy as np

    from quantserve.models.gguf import ROPE_FACTORS

    rotary = int(meta("rope.dimension_count", config["head_dim"]))
    out = {"partial_rotary_factor": rotary / config["head_dim"], "sliding_window": meta("attention.sliding_window", None)}
    factors = {t.name: [float(x) for x in np.asarray(t.data, dtype=np.float32)] for t in reader.tensors
               if t.name in ROPE_FACTORS}
    if len(factors) == 2:
        original = int(meta("rope.scaling.original_context_length"))
        out["original_max_position_embeddings"] = original
        out["rope_parameters"] = {"rope_type": "longrope", "rope_theta": config["rope_theta"],
                                  "long_factor": factors[ROPE_FACTORS[0]], "short_factor": factors[ROPE_FACTORS[1]],
                                  "original_max_position_embeddings": original,
                                  "partial_rotary_factor": out["partial_rotary_factor"]}
    return out


# llama.cpp keeps the fused projections, as HF Phi3 does
GGUF = GgufArch("phi3", "phi3", "Phi3ForCausalLM", permuted_qk=False,
                layer_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                required=("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                          "mlp.gate_up_proj", "mlp.down_proj"),
                config=gguf_config)
FAMILY = Family(("phi3",), model_args, convert_weights, RECIPE, GGUF)
