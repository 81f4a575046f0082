"""Model families: each module of this package is one family and holds all of it.

A family module defines `FAMILY`: the Hugging Face `model_type`s it runs, how a config becomes
`ModelArgs`, how checkpoint names map onto the engine's modules, the quantizers' recipe (which
linears, which norm feeds which, `quant.arch.Arch`) and, where llama.cpp writes it, its GGUF
architecture. Adding a family is adding a module here; nothing else lists them.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class GgufArch:
    name: str                  # general.architecture in the GGUF file
    model_type: str            # the HF model_type its config.json gets
    hf_class: str              # and its `architectures` entry
    permuted_qk: bool          # llama.cpp permuted q/k rows for its RoPE layout (undone on read)
    layer_names: dict = field(default_factory=dict)   # llama.cpp layer tensor -> HF module, beyond Llama's
    required: tuple[str, ...] = ()     # the HF modules every layer's file must hold, where not Llama's
    norm_shift: float = 0.0            # llama.cpp stores each norm weight + this (Gemma's 1 + w)
    config: Callable | None = None     # (meta, reader, config) -> the config.json entries llama.cpp fixes


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    model_args: Callable       # config dict -> ModelArgs
    convert_weights: Callable  # (HF-named tensors, ModelArgs) -> engine-named tensors
    quant: object              # quant.arch.Arch: the AWQ / GPTQ recipe
    gguf: GgufArch | None = None
    gguf_rename: Callable | None = None   # tensors read under another GGUF architecture's names -> ours


@functools.cache
def registry() -> dict[str, Family]:
    """model_type -> Family, from every module of this package."""
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        for model_type in family.model_types if family else ():
            found[model_type] = family
    return found


def gguf_archs() -> dict[str, GgufArch]:
    """GGUF general.architecture -> how it maps onto a family."""
    return {f.gguf.name: f.gguf for f in registry().values() if f.gguf}
