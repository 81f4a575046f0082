"""SmolLM3: the Llama layout and names, with RoPE left out of some layers (`no_rope_layers`,
1 = rotate; by default every `no_rope_layer_interval`-th layer, 4, is left unrotated, as llama.cpp
fixes it for its `smollm3` GGUF files) and tied embeddings."""
from __future__ import annotations

from quantserve.models.families import Family, GgufArch, llama
from quantserve.models.layers import ModelArgs


def model_args(cfg: dict) -> ModelArgs:
    args = llama.model_args({"tie_word_embeddings": True, **cfg})
    layers, interval = cfg["num_hidden_layers"], cfg.get("no_rope_layer_interval", 4)
    rotates = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    args.nope_layers = tuple(i for i, r in enumerate(rotates) if not r)
    return args


FAMILY = Family(("smollm3",), model_args, llama.convert_weights, llama.RECIPE,
                GgufArch("smollm3", "smollm3", "SmolLM3ForCausalLM", permuted_qk=True))
