"""A whole decode step (every layer) in one native call, for batches of single-token decodes.

The per-layer weights are described once, at load time, as C structs pointing at the packed
tensors; each step fills one DecodeBatch struct. The numbers equal the module-by-module path
(same kernels, same order); this only removes the Python between them.
"""
from __future__ import annotations

import ctypes

import torch

from quantserve import kernels

_p, _i, _f, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long


class LinearWeights(ctypes.Structure):
    _fields_ = [("w", _p), ("scales", _p), ("mins", _p), ("bits", _i), ("group_size", _i)]

    @classmethod
    def of(cls, linear) -> LinearWeights:
        """A runtime linear with integer panels (`panels()`) or float panels (`packed`)."""
        if hasattr(linear, "panels"):
            codes, scales, mins = linear.panels()
            return cls(codes.data_ptr(), scales.data_ptr(), mins.data_ptr(), linear.spec.bits, linear.group)
        return cls(linear.packed.data_ptr(), None, None, 0, 0)


class LayerWeights(ctypes.Structure):
    _fields_ = [("qkv", LinearWeights), ("o", LinearWeights), ("gate_up", LinearWeights), ("down", LinearWeights),
                ("qkv_bias", _p), ("o_bias", _p), ("attn_norm", _p), ("mlp_norm", _p), ("q_norm", _p),
                ("k_norm", _p), ("rope", _i)]


class DecodeBatch(ctypes.Structure):
    _fields_ = [(n, _i) for n in ("T", "H", "Hq", "Hkv", "D", "R", "I", "wtype", "ctype", "block_size",
                                   "max_blocks", "nthreads")] + [
        ("eps", _f), ("scale", _f), ("positions", _p), ("slots", _p), ("block_tables", _p),
        ("context_lens", _p), ("cos", _p), ("sin", _p), ("k_cache", _p), ("v_cache", _p),
        ("layer_stride", _l), ("kv_bits", _i), ("k_scale", _p), ("v_scale", _p), ("k_zero", _p), ("v_zero", _p),
        ("k_param_stride", _l), ("v_param_stride", _l), ("k_groups", _i), ("v_groups", _i), ("window", _i),
        ("k_fixed_scale", _p), ("v_fixed_scale", _p), ("k_fixed_zero", _p), ("v_fixed_zero", _p)]


def _linears(model) -> list:
    return [m for l in model.layers for m in (l.attn.qkv, l.attn.o, l.mlp.gate_up, l.mlp.down)]


def _qk_norms(attn) -> tuple[int | None, int | None]:
    """The per-head q and k norm weights of a layer that has them (Qwen3), else NULLs."""
    return (_ptr(attn.q_norm.weight), _ptr(attn.k_norm.weight)) if hasattr(attn, "q_norm") else (None, None)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedDecoder:
    """Built from a finalized CausalLM when every piece can run natively, else `build` gives None."""

    def __init__(self, model):
        self.model, self.lib = model, model.ops.lib
        a = model.args
        layers = model.layers
        floats = [m.wtype for m in _linears(model) if hasattr(m, "wtype")]
        self.wtype = floats[0] if floats else 0
        self.structs = (LayerWeights * len(layers))(*[
            LayerWeights(LinearWeights.of(l.attn.qkv), LinearWeights.of(l.attn.o), LinearWeights.of(l.mlp.gate_up),
                         LinearWeights.of(l.mlp.down), _ptr(l.attn.qkv.bias), _ptr(l.attn.o.bias),
                         _ptr(l.attn_norm.weight), _ptr(l.mlp_norm.weight), *_qk_norms(l.attn), l.attn.rotates)
            for l in layers])
        self.dims = dict(H=a.hidden_size, Hq=a.num_heads, Hkv=a.num_kv_heads, D=a.head_dim, R=a.rotary_dim,
                         I=a.intermediate_size)
        self.eps, self.scale = a.rms_norm_eps, a.head_dim ** -0.5

    @classmethod
    def build(cls, model) -> FusedDecoder | None:
        """For a dense model on native ops (its shapes checked at load against its config) whose
        linears all hold panels, float ones of one type."""
        a = model.args
        if a.moe_layers or a.sandwich_norms or a.hidden_act != "silu" or a.layer_windows or a.attn_scale \
                or a.final_softcap:
            return None                     # the C step runs Llama-style dense layers only
        linears = _linears(model)
        if not all(hasattr(m, "panels") or hasattr(m, "packed") for m in linears):
            return None
        if len({m.wtype for m in linears if hasattr(m, "wtype")}) > 1:
            return None
        return cls(model)

    @staticmethod
    def _quant_fields(cache) -> dict:
        if not cache.kv_bits:
            return {}
        return dict(kv_bits=cache.kv_bits, k_scale=cache.k_scale.data_ptr(), v_scale=cache.v_scale.data_ptr(),
                    k_zero=cache.k_zero.data_ptr(), v_zero=cache.v_zero.data_ptr(),
                    k_param_stride=cache.k_scale[0].numel(), v_param_stride=cache.v_scale[0].numel(),
                    k_groups=kernels.param_groups(cache.k, cache.k_scale),
                    v_groups=kernels.param_groups(cache.v, cache.v_scale), **cache.static_pointers())

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] embeddings of T decode tokens -> (last layer output, residual stream)."""
        x = x.contiguous()
        residual = torch.empty_like(x)
        rope = self.model.rope
        batch = DecodeBatch(
            T=x.shape[0], wtype=self.wtype, ctype=kernels.CACHE_TYPES[cache.k.dtype], block_size=cache.block_size,
            max_blocks=meta.decode_block_tables.shape[1], nthreads=torch.get_num_threads(),
            eps=self.eps, scale=self.scale, positions=positions.data_ptr(), slots=meta.slot_mapping.data_ptr(),
            block_tables=meta.decode_block_tables.data_ptr(), context_lens=meta.decode_context_lens.data_ptr(),
            cos=rope.cos.data_ptr(), sin=rope.sin.data_ptr(), k_cache=cache.k.data_ptr(),
            v_cache=cache.v.data_ptr(), layer_stride=cache.k[0].numel() // cache.k.shape[-1] * cache.head_dim,
            window=self.model.args.sliding_window or 0, **self.dims, **self._quant_fields(cache))
        self.lib.qs_decode_layers(self.structs, len(self.structs), ctypes.byref(batch),
                                       x.data_ptr(), residual.data_ptr())
        return x, residual
