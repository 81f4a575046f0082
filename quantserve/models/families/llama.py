"""Llama family: Llama 2/3, SmolLM/SmolLM2, Mistral (HF names q_proj/k_proj/v_proj, gate/up/down)."""
from __future__ import annotations

import re

import torch

from quantserve.models.families import Family, GgufArch
from quantserve.models.layers import ModelArgs, eos_ids
from quantserve.models.rope import rope_from_config, rotary_dim
from quantserve.quant.arch import Arch, ScaleGroup

QKV_BIAS = False


def model_args(cfg: dict) -> ModelArgs:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, scaling = rope_from_config(cfg)
    return ModelArgs(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim(cfg, head_dim),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=cfg.get("attention_bias", QKV_BIAS),
        o_bias=cfg.get("attention_bias", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
    )


RENAMES = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "lm_head."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attn.o."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.mlp.down."),
]
# parts that are concatenated (in this order) into one fused projection
FUSED = {
    "q_proj": ("attn.qkv", 0), "k_proj": ("attn.qkv", 1), "v_proj": ("attn.qkv", 2),
    "gate_proj": ("mlp.gate_up", 0), "up_proj": ("mlp.gate_up", 1),
}
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs,
                    renames: list[tuple[str, str]] = RENAMES) -> dict[str, torch.Tensor]:
    """HF checkpoint names -> internal names, fusing q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if "rotary_emb" in name:
            continue
        m = _FUSED_RE.match(name)
        if m and m.group(2) in FUSED:
            target, index = FUSED[m.group(2)]
            parts.setdefault(f"layers.{m.group(1)}.{target}.{m.group(3)}", {})[index] = tensor
            continue
        out[rename(name, renames)] = tensor
    out.update(fuse(parts))
    return out


def rename(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"unexpected tensor {name!r} in checkpoint")


def fuse(parts: dict[str, dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[i] for i in sorted(p)], dim=0) for name, p in parts.items()}


# AWQ / GPTQ: the quantized linears and where AWQ folds its input scales (HF names)
RECIPE = Arch(
    linears=("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
             "model.layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.o_proj",
             "model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"),
    scale_groups=(
        ScaleGroup("model.layers.{i}.input_layernorm", ("model.layers.{i}.self_attn.q_proj",
                   "model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj")),
        ScaleGroup("model.layers.{i}.self_attn.v_proj", ("model.layers.{i}.self_attn.o_proj",), True),
        ScaleGroup("model.layers.{i}.post_attention_layernorm", ("model.layers.{i}.mlp.gate_proj",
                   "model.layers.{i}.mlp.up_proj"), mlp_down="model.layers.{i}.mlp.down_proj"),
        ScaleGroup("model.layers.{i}.mlp.up_proj", ("model.layers.{i}.mlp.down_proj",)),
    ),
    inputs={"self_attn.q_proj": "attn.qkv", "self_attn.k_proj": "attn.qkv", "self_attn.v_proj": "attn.qkv",
            "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate_up", "mlp.up_proj": "mlp.gate_up",
            "mlp.down_proj": "mlp.down"})

def gguf_config(meta, reader, config: dict) -> dict:
    """llama.cpp writes Mixtral as a llama with experts."""
    if not config.get("num_experts"):
        return {}
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": config["num_experts"]}


FAMILY = Family(("llama", "mistral"), model_args, convert_weights, RECIPE,
                GgufArch("llama", "llama", "LlamaForCausalLM", permuted_qk=True, config=gguf_config))
