"""The shape of the per-architecture facts the quantizers need, as data: which linears are
quantized (HF names), and which norm or linear feeds which linears (where AWQ folds its input
scales). Each family's recipe lives in its own file (models/families/).

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


def arch_for(model_type: str) -> Arch:
    """The recipe of the family that runs model_type (models/families/)."""
    from quantserve.models.families import registry

    families = registry()
    if model_type not in families:
        raise ValueError(f"no quantization recipe for {model_type!r}; supported: {', '.join(sorted(families))}")
    return families[model_type].quant


def layer_names(template: str, layer: int) -> str:
    return template.format(i=layer)


def quantized_linears(arch: Arch, num_layers: int) -> list[str]:
    return [layer_names(t, i) for i in range(num_layers) for t in arch.linears]


def is_quantized_tensor(name: str) -> bool:
    return bool(re.search(r"\.(qweight|qzeros|scales|g_idx)$", name))
