"""Per-architecture facts the quantizers need, as data: which linears are quantized (HF names),
and which norm or linear feeds which linears (where AWQ folds its input scales).

`{i}` is the layer index. A scale group: (the producer whose output is scaled down, the
consumers whose input columns are scaled up, the module whose inputs give the statistics).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    producer: str                 # a norm (scales its weight) or a linear (scales its output rows)
    consumers: tuple[str, ...]    # linears reading the producer's output
    needs_same_width: bool = False    # linear -> linear: only when the shapes line up (no GQA)
    mlp_down: str | None = None       # consumers are (gate, up): the scale search scores the MLP's output


@dataclass(frozen=True)
class Arch:
    linears: tuple[str, ...]
    scale_groups: tuple[ScaleGroup, ...]
    inputs: dict[str, str]        # HF projection (last two name parts) -> the engine module reading that input

    def input_site(self, linear: str, layer: int) -> str:
        """The engine projection whose input this HF linear reads (its statistics)."""
        return f"layers.{layer}.{self.inputs['.'.join(linear.split('.')[-2:])]}"


LLAMA = Arch(
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

INTERNLM2 = Arch(
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

ARCHS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "internlm": LLAMA, "internlm2": INTERNLM2}


def arch_for(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise ValueError(f"no quantization recipe for {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def layer_names(template: str, layer: int) -> str:
    return template.format(i=layer)


def quantized_linears(arch: Arch, num_layers: int) -> list[str]:
    return [layer_names(t, i) for i in range(num_layers) for t in arch.linears]


def is_quantized_tensor(name: str) -> bool:
    return bool(re.search(r"\.(qweight|qzeros|scales|g_idx)$", name))
