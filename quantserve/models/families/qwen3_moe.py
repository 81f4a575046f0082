"""Qwen3-MoE (Qwen3-30B-A3B style): Qwen3's attention (per-head q/k RMSNorm) with a mixture of
experts in place of the MLP: a router (`mlp.gate`, [E, H]) picks `num_experts_per_tok` of
`num_experts` experts, each a SwiGLU MLP of `moe_intermediate_size`; the top-k weights are
renormalised when `norm_topk_prob`. Layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step` beat, keep a dense MLP."""
from __future__ import annotations

import re

import torch

from quantserve.models.families import Family, GgufArch, llama, qwen3
from quantserve.models.layers import ModelArgs
from quantserve.quant.arch import Arch, ScaleGroup, num_experts

# per-expert tensors as the hub stores them, and the fused stacks transformers 5 holds in memory
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER_RE = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")


def model_args(cfg: dict) -> ModelArgs:
    args = qwen3.model_args(cfg)
    experts, step = num_experts(cfg), cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or ())
    args.num_experts, args.experts_per_token = experts, cfg.get("num_experts_per_tok", 1)
    args.expert_intermediate_size = cfg.get("moe_intermediate_size") or args.intermediate_size
    args.norm_topk_prob = cfg.get("norm_topk_prob", False)
    args.moe_layers = tuple(i for i in range(args.num_layers) if experts and i not in dense and (i + 1) % step == 0)
    return args


def convert_weights(weights: dict[str, torch.Tensor], args: ModelArgs,
                    parts: dict[str, tuple[str, int]] | None = None, dense=qwen3.convert_weights) -> dict[str, torch.Tensor]:
    """Experts and routers to layers.{i}.mlp.experts.{e}.{gate_up,down} and layers.{i}.mlp.router;
    everything else as the dense family converts it. parts: expert linear -> (engine linear, index
    in the fused gate_up), e.g. gate_proj -> (gate_up, 0)."""
    parts = parts or EXPERT_PARTS
    out, fused, rest = {}, {}, {}
    for name, tensor in weights.items():
        if m := _EXPERT_RE.match(name):
            target, index = parts[m.group(3)]
            key = f"layers.{m.group(1)}.mlp.experts.{m.group(2)}.{target}.weight"
            fused.setdefault(key, {})[index] = tensor
        elif m := _STACKED_RE.match(name):
            target = "gate_up" if m.group(2) == "gate_up_proj" else "down"
            out.update({f"layers.{m.group(1)}.mlp.experts.{e}.{target}.weight": t for e, t in enumerate(tensor)})
        elif m := _ROUTER_RE.match(name):
            out[f"layers.{m.group(1)}.mlp.router.weight"] = tensor
        else:
            rest[name] = tensor
    out.update(llama.fuse(fused))
    return {**dense(rest, args), **out}


EXPERT_PARTS = {"gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}


def recipe(moe: str, gate: str, up: str, down: str) -> Arch:
    """AWQ / GPTQ: attention and dense MLP layers as Llama (a MoE layer has no dense MLP: those names
    are absent from its checkpoint, so skipped); every expert's linears quantized ({e}: the expert),
    each expert's up scaling its down. The post-attention norm of a MoE layer is not folded: it
    also feeds the router, which stays float. `moe` is the block's HF name (mlp, block_sparse_moe)."""
    base = llama.RECIPE
    expert = f"model.layers.{{i}}.{moe}.experts.{{e}}."
    return Arch(linears=base.linears,
                scale_groups=base.scale_groups,
                inputs={**base.inputs, f"experts.{gate}": "gate_up", f"experts.{up}": "gate_up",
                        f"experts.{down}": "down"},
                expert_linears=(expert + gate, expert + up, expert + down),
                expert_groups=(ScaleGroup(expert + up, (expert + down,)),))


FAMILY = Family(("qwen3_moe",), model_args, convert_weights, recipe("mlp", "gate_proj", "up_proj", "down_proj"),
                GgufArch("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM", permuted_qk=False))
