"""Gemma 2: Gemma 3's layer (scaled embeddings, (1 + w) norms, GeGLU, sandwich norms,
query_pre_attn_scalar) without q/k norms, sliding-window and full-attention layers alternating
under one RoPE base, and soft-capped scores: attention (c * tanh(s / c), c = 50) and final
logits (c = 30). Only the PyTorch ops cap attention scores, so Gemma 2 runs on them."""
from __future__ import annotations

from quantserve.models.families import Family, GgufArch, gemma3, llama
from quantserve.models.layers import ModelArgs


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args({**cfg, "sliding_window": None})
    kinds = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(cfg["num_hidden_layers"])]
    args.layer_windows = tuple(cfg["sliding_window"] if kind == "sliding_attention" else 0 for kind in kinds)
    args.sandwich_norms = True
    args.embed_scale = cfg["hidden_size"] ** 0.5
    args.hidden_act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    args.attn_scale = cfg.get("query_pre_attn_scalar", args.head_dim) ** -0.5
    args.attn_softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    args.final_softcap = float(cfg.get("final_logit_softcapping") or 0.0)
    args.tie_word_embeddings = cfg.get("tie_word_embeddings", True)
    return args


def gguf_config(meta, reader, config: dict) -> dict:
    """Gemma 3's fixed entries (gemma3.gguf_config) and Gemma 2's soft-caps from the metadata."""
    from quantserve.models.gguf import float32_value

    return {**gemma3.gguf_config(meta, reader, config),
            "attn_logit_softcapping": float32_value(meta("attn_logit_softcapping", 0.0)) or None,
            "final_logit_softcapping": float32_value(meta("final_logit_softcapping", 0.0)) or None}


FAMILY = Family(("gemma2",), model_args, gemma3.convert_weights, gemma3.FAMILY.quant,
                GgufArch("gemma2", "gemma2", "Gemma2ForCausalLM", permuted_qk=False, layer_names=gemma3.GGUF_NAMES,
                         norm_shift=1.0, config=gguf_config))
