"""The ops object a model calls for everything device-specific, chosen once at load.

`TorchOps` is the plain-PyTorch reference: any dtype, any device (the torch backend, CUDA, and
the numbers every native kernel is tested against). `kernels.native.NativeOps` has the same
methods on one build of the C kernels. `ops_for` picks: the process's kernel backend on CPU
when the model's shapes suit it, else TorchOps; nothing asks again per call.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from quantserve import kernels
from quantserve.kernels.native import NativeOps
from quantserve.kvcache.paged import decode_attention_reference, prefill_attention_reference
from quantserve.models.rope import apply_rope

logger = logging.getLogger("quantserve")


class TorchOps:
    name = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def describe(self) -> str:
        return "torch (plain PyTorch ops)" if self.device == "cpu" else f"torch ({self.device})"

    def takes_float(self, weight: torch.Tensor) -> bool:
        return False          # Linear runs F.linear itself

    def takes_int(self, in_features: int, group: int, bits: int) -> bool:
        return False          # QuantLinear dequantizes itself

    def rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        if residual is not None:
            x = residual.add_(x)
        return F.rms_norm(x, weight.shape, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
        apply_rope(x, heads, head_dim, positions, cos, sin)

    def kv_write(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        cache.write_reference(layer, k, v, slots)

    decode_attention = staticmethod(decode_attention_reference)
    prefill_attention = staticmethod(prefill_attention_reference)

    def fused_decoder(self, model) -> None:
        return None


def ops_for(device: str, hidden: int, intermediate: int, head_dim: int, heads: int, kv_heads: int,
            rotary_dim: int, softcap: float = 0.0) -> TorchOps | NativeOps:
    """The model's ops: native kernels on CPU where the backend has them and the shapes suit (and
    attention scores are not soft-capped, which only the PyTorch ops do)."""
    lib = kernels.cpu() if torch.device(device).type == "cpu" else None
    if lib is None:
        return TorchOps(device)
    misfit = NativeOps.misfit(hidden, intermediate, head_dim, heads, kv_heads, rotary_dim)
    misfit = misfit or ("attention logits are soft-capped" if softcap else None)
    if misfit:
        logger.info("native kernels do not take this model (%s): plain PyTorch ops", misfit)
        return TorchOps(device)
    return NativeOps(lib, kernels.backend())
