"""The shape of the per-architecture facts the quantizers need, as data: which linears are
quantized (HF names), and which norm or linear feeds which linears (where AWQ folds its input
scales). Each family's recipe lives in its own file (models/families/).

`{i}` is the layer index, `{e}` an expert's (mixtures of experts). A scale group: (the producer whose output is scaled down, the
consumers whose input columns are scaled up, the module whose inputs give the statistics).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from quantserve.quant.primitives import QuantError


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
    expert_linears: tuple[str, ...] = ()          # mixtures of experts: {i} the layer, {e} the expert
    expert_groups: tuple[ScaleGroup, ...] = ()
    norm_offset: float = 0.0      # a norm multiplies by (offset + weight): Gemma's 1 + w

    def input_site(self, linear: str, layer: int) -> str:
        """The engine projection whose input this HF linear reads (its statistics)."""
        if m := _EXPERT.search(linear):
            return f"layers.{layer}.mlp.experts.{m.group(1)}.{self.inputs['experts.' + m.group(2)]}"
        return f"layers.{layer}.{self.inputs['.'.join(linear.split('.')[-2:])]}"

    def layer_linears(self, layer: int, experts: int = 0) -> list[str]:
        """The HF names of layer's linears (a checkpoint holds those of its dense or its MoE MLP)."""
        return [t.format(i=layer) for t in self.linears] + [
            t.format(i=layer, e=e) for e in range(experts) for t in self.expert_linears]

    def layer_groups(self, layer: int, experts: int = 0) -> list[ScaleGroup]:
        def concrete(g: ScaleGroup, **expert) -> ScaleGroup:
            name = lambda t: t and t.format(i=layer, **expert)         # noqa: E731
            return ScaleGroup(name(g.producer), tuple(map(name, g.consumers)), g.needs_same_width, name(g.mlp_down))

        return [concrete(g) for g in self.scale_groups] + [
            concrete(g, e=e) for e in range(experts) for g in self.expert_groups]


_EXPERT = re.compile(r"experts\.(\d+)\.(\w+)$")


def arch_for(model_type: str) -> Arch:
    """The recipe of the family that runs model_type (models/families/)."""
    from quantserve.models.families import registry

    families = registry()
    if model_type not in families:
        raise ValueError(f"no quantization recipe for {model_type!r}; supported: {', '.join(sorted(families))}")
    return families[model_type].quant


def quantized_linears(arch: Arch, cfg: dict, weights: dict) -> list[str]:
    """Every linear of the checkpoint the recipe quantizes (HF names, in layer order); a layer
    matrix the recipe does not name (but a MoE router) is an error, never left float silently."""
    experts = num_experts(cfg)
    names = [name for i in range(cfg["num_hidden_layers"]) for name in arch.layer_linears(i, experts)
             if f"{name}.weight" in weights]
    covered = {f"{n}.weight" for n in names}
    missed = [n for n, t in weights.items() if t.dim() == 2 and ".layers." in n and not n.endswith(".gate.weight")
              and n not in covered]
    if missed:
        raise QuantError(f"the {cfg.get('model_type')} recipe does not name {len(missed)} linears, e.g. {missed[:2]}")
    return names


def num_experts(cfg: dict) -> int:
    return cfg.get("num_experts") or cfg.get("num_local_experts") or 0


def is_quantized_tensor(name: str) -> bool:
    return bool(re.search(r"\.(qweight|qzeros|scales|g_idx)$", name))
