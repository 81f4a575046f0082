"""Gemma 3 text models (`gemma3_text`, Gemma3ForCausalLM): embeddings scaled by sqrt(hidden),
RMSNorms that multiply by (1 + w) (folded into w at load), a GeGLU MLP (tanh GELU), every block's
output normed before the residual (post-attention and post-feedforward norms beside the usual
pre-norms), per-head q/k norms, queries scaled by query_pre_attn_scalar ** -0.5, and sliding-window
layers (five in six) with a RoPE base of their own next to full-attention layers."""
from __future__ import annotations

import torch

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.layers import ModelArgs
from quantserve.models.rope import rope_from_config
from quantserve.quant.arch import Arch, ScaleGroup

RENAMES = [
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.post_attn_norm."),
    (r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"layers.\1.post_mlp_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_norm\.", r"layers.\1.attn.q_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_norm\.", r"layers.\1.attn.k_norm."),
    *llama.RENAMES,
]


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args({**cfg, "sliding_window": None})
    (args.rope_theta, args.rope_scaling), args.local_rope_theta = global_and_local_rope(cfg)
    args.layer_windows = tuple(cfg["sliding_window"] if kind == "sliding_attention" else 0 for kind in layer_types(cfg))
    args.qk_norm, args.sandwich_norms = True, True
    args.embed_scale = cfg["hidden_size"] ** 0.5
    args.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    args.attn_scale = cfg.get("query_pre_attn_scalar", args.head_dim) ** -0.5
    args.tie_word_embeddings = cfg.get("tie_word_embeddings", True)
    return args


def layer_types(cfg: dict) -> list[str]:
    """transformers 5 lists them; hub configs give every `sliding_window_pattern`-th layer full attention."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = cfg.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])]


def global_and_local_rope(cfg: dict) -> tuple[tuple[float, dict | None], float]:
    """((theta, scaling) of the full-attention layers, theta of the sliding ones), from either
    transformers 5's per-layer-type rope_parameters or the hub's rope_theta / rope_local_base_freq."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention", params["full_attention"])
        return rope_from_config({"rope_parameters": params["full_attention"]}), float(local.get("rope_theta", 10000.0))
    return rope_from_config(cfg), float(cfg.get("rope_local_base_freq", 10000.0))


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Llama's names and fusion, the extra norms, and every norm's (1 + w) folded into its weight."""
    out = llama.convert_weights(weights, args, RENAMES)
    return {k: (v.float() + 1.0 if "norm" in k and v.dim() == 1 else v) for k, v in out.items()}


def _recipe() -> Arch:
    """AWQ / GPTQ as Llama, the MLP's inputs scaled through the pre-feedforward norm, (1 + w) kept."""
    base, layer = llama.RECIPE, "model.layers.{i}."
    groups = (base.scale_groups[0], base.scale_groups[1],
              ScaleGroup(layer + "pre_feedforward_layernorm", (layer + "mlp.gate_proj", layer + "mlp.up_proj"),
                         mlp_down=layer + "mlp.down_proj"),
              base.scale_groups[3])
    return Arch(linears=base.linears, scale_groups=groups, inputs=base.inputs, norm_offset=1.0)


def gguf_config(meta, reader, config: dict) -> dict:
    """What llama.cpp fixes for Gemma (2 and 3) rather than writes: queries scaled by head_dim (but
    for 27B), the tanh GELU; and for Gemma 3 one full layer in six, the sliding layers' RoPE base."""
    out = {"sliding_window": int(meta("attention.sliding_window")), "query_pre_attn_scalar": config["head_dim"],
           "hidden_activation": "gelu_pytorch_tanh"}
    if config["model_type"] == "gemma3_text":
        out.update(sliding_window_pattern=6, rope_local_base_freq=10000.0)
    return out


# llama.cpp names Gemma's extra norms, calls its pre-feedforward norm ffn_norm, and stores (1 + w)
GGUF_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm"}
FAMILY = Family(("gemma3_text",), model_args, convert_weights, _recipe(),
                GgufArch("gemma3", "gemma3_text", "Gemma3ForCausalLM", permuted_qk=False, layer_names=GGUF_NAMES,
                         norm_shift=1.0, config=gguf_config))
