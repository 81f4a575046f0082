"""The decoder every supported family maps onto.

Families (models/families/: llama, qwen2, qwen3, qwen3_moe, mixtral, gemma2, gemma3, smollm3,
phi3, internlm, internlm2) differ only in how their config and checkpoint names map onto
`ModelArgs` and these modules; the
forward pass is shared. Tokens are flat: the batch is [T] tokens from many requests, attention
finds each request's context through `AttentionMetadata`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantserve.kernels import QPANEL
from quantserve.kernels.fused import FusedDecoder
from quantserve.kvcache.paged import AttentionMetadata, PagedKVCache, paged_attention
from quantserve.models.rope import RotaryEmbedding
from quantserve.quant.linear import (RUNTIME_KINDS, IntPanelLinear, Linear, PanelLinear, QuantLinear, make_linear,
                                     runtime_linear, tied_head, unpack_nibbles)
from quantserve.quant.primitives import QuantSpec, affine_dequantize, quantize


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False                 # an RMSNorm over each q and k head before RoPE (Qwen3)
    nope_layers: tuple[int, ...] = ()     # layers whose q and k get no RoPE (SmolLM3)
    rotary_dim: int = 0                   # leading dims of each head RoPE rotates (0: all)
    sliding_window: int | None = None     # attention reaches this many tokens back (Mistral); None: all
    num_experts: int = 0                  # mixture of experts (Qwen3-MoE, Mixtral): experts per MoE layer
    experts_per_token: int = 0            # the router's top-k
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True           # the top-k routing weights renormalised to sum to 1
    moe_layers: tuple[int, ...] = ()      # layers whose MLP is the mixture (the others dense)
    embed_scale: float = 1.0              # input embeddings multiplied by this (Gemma: sqrt(hidden))
    hidden_act: str = "silu"              # the MLP's gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    sandwich_norms: bool = False          # Gemma: attention and MLP outputs normed too, before the residual
    attn_scale: float = 0.0               # query scale (Gemma: query_pre_attn_scalar ** -0.5); 0: head_dim ** -0.5
    layer_windows: tuple[int, ...] = ()   # per-layer sliding window (0: full attention); empty: sliding_window
    local_rope_theta: float = 0.0         # RoPE base of the sliding-window layers (Gemma 3); 0: the global one
    attn_softcap: float = 0.0             # attention scores c * tanh(s / c) (Gemma 2); 0: none
    final_softcap: float = 0.0            # and the output logits likewise
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rotary_dim = self.rotary_dim or self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        moe = len(self.moe_layers) * self.num_experts * (3 * h * self.expert_intermediate_size + h)
        per_layer = attn + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        dense = (l - len(self.moe_layers)) * 3 * h * i
        return self.vocab_size * h + l * per_layer + dense + moe + h + head


def eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H]. With a residual: residual += x (in place), then normalise the sum."""
        return self.ops.rmsnorm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, ops):
        super().__init__()
        self.args, self.ops = args, ops
        self.layer_idx = layer_idx
        self.scale = args.attn_scale or args.head_dim ** -0.5
        self.rotates = layer_idx not in args.nope_layers
        self.window = args.layer_windows[layer_idx] if args.layer_windows else args.sliding_window or 0
        self.softcap = args.attn_softcap
        h = args.hidden_size
        self.qkv = make_linear(h, args.q_size + 2 * args.kv_size, bias=args.qkv_bias)
        self.o = make_linear(args.q_size, h, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops)

    def norm_heads_(self, qkv: torch.Tensor) -> None:
        """qkv: [T, (Hq + 2 Hkv) * D]; every q head and k head RMS-normalised in place."""
        a, t = self.args, qkv.shape[0]
        for norm, lo, hi in ((self.q_norm, 0, a.q_size), (self.k_norm, a.q_size, a.q_size + a.kv_size)):
            qkv[:, lo:hi] = norm(qkv[:, lo:hi].reshape(-1, a.head_dim)).view(t, hi - lo)   # [T * heads, D]

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor,
                meta: AttentionMetadata, cache: PagedKVCache) -> torch.Tensor:
        a = self.args
        t = x.shape[0]
        qkv = self.qkv(x)                                       # [T, (Hq + 2 Hkv) * D]
        if a.qk_norm:
            self.norm_heads_(qkv)
        if self.rotates:
            self.ops.rope_(qkv, a.num_heads + a.num_kv_heads, a.head_dim, positions, rope.cos, rope.sin)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(t, a.num_heads, a.head_dim)                  # [T, Hq, D]
        k = k.view(t, a.num_kv_heads, a.head_dim)               # [T, Hkv, D]
        v = v.view(t, a.num_kv_heads, a.head_dim)
        self.ops.kv_write(cache, self.layer_idx, k, v, meta.slot_mapping)
        return self.o(paged_attention(self.ops, q, k, v, self.layer_idx, meta, cache, self.scale, self.window,
                                      self.softcap))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, ops, intermediate: int | None = None):
        super().__init__()
        self.ops, self.gelu = ops, args.hidden_act == "gelu_pytorch_tanh"
        intermediate = intermediate or args.intermediate_size
        self.gate_up = make_linear(args.hidden_size, 2 * intermediate, bias=False)
        self.down = make_linear(intermediate, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)                                 # [T, 2I] -> [T, I] -> [T, H]
        if self.gelu:                                             # GeGLU (Gemma)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down(torch.nn.functional.gelu(gate, approximate="tanh") * up)
        return self.down(self.ops.silu_mul(gate_up))


class MoE(nn.Module):
    """Mixture of experts: a float router picks each token's top-k experts; every expert (an MLP,
    float or integer like any linear) runs once on the rows that picked it, so a decode batch whose
    rows pick different experts and a prefill both run grouped by expert."""

    def __init__(self, args: ModelArgs, ops):
        super().__init__()
        self.k, self.renormalise = args.experts_per_token, args.norm_topk_prob
        self.router = make_linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args, ops, args.expert_intermediate_size) for _ in range(args.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]: sum over each token's experts of weight * expert(x)."""
        probs = self.router(x).float().softmax(dim=-1)                      # [T, E]
        weights, chosen = probs.topk(self.k, dim=-1)                        # [T, k]
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if x.shape[0] == 1:                                                 # one token: no grouping to do
            w = weights[0].to(x.dtype).tolist()
            return sum(w[j] * self.experts[e](x) for j, e in enumerate(chosen[0].tolist()))
        picks = chosen.flatten()                                             # [T * k]
        order = picks.argsort(stable=True)                                   # the picks grouped by expert
        rows, scale = order // self.k, weights.flatten()[order, None].to(x.dtype)
        out, start = torch.zeros_like(x), 0
        for expert, count in enumerate(torch.bincount(picks, minlength=len(self.experts)).tolist()):
            if count:
                group = slice(start, start + count)                          # the tokens that picked it
                out.index_add_(0, rows[group], self.experts[expert](x[rows[group]]) * scale[group])
                start += count
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, ops):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.attn = Attention(args, layer_idx, ops)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.mlp = MoE(args, ops) if layer_idx in args.moe_layers else MLP(args, ops)
        if args.sandwich_norms:
            self.post_attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
            self.post_mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)

    def forward(self, x, residual, rope, positions, meta, cache):
        """Pre-norm block with the residual stream carried separately: returns (x, residual)."""
        if residual is None:
            residual = x
            h = self.attn_norm(x)
        else:
            h = self.attn_norm(x, residual)
        h = self.attn(h, rope, positions, meta, cache)
        if hasattr(self, "post_attn_norm"):           # Gemma: each block's output normed before the residual
            h = self.post_attn_norm(h)
        h = self.mlp(self.mlp_norm(h, residual))
        if hasattr(self, "post_mlp_norm"):
            h = self.post_mlp_norm(h)
        return h, residual


class PanelEmbedding(nn.Module):
    """Input embedding read from a tied head's float panels: one copy of the matrix, not two."""

    def __init__(self, head: PanelLinear):
        super().__init__()
        self.head = [head]          # a plain list: the head is registered once, on the model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.ops.panel_rows(head.packed, head.wtype, ids)          # [T, H]


class QuantizedEmbedding(nn.Module):
    """Input embedding read row by row from integer codes: a tied head's, or a GGUF token_embd's own
    (8 or 4 bits, W = code * scale + min), in the VNNI panels (kernels.pack_quantized) or as the
    reference QuantLinear's rows."""

    def __init__(self, table: IntPanelLinear | QuantLinear):
        super().__init__()
        self.table = table          # also the output head when tied (one module, registered twice)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.table, QuantLinear):
            t = self.table
            rows = unpack_nibbles(t.codes[ids]) if t.spec.bits == 4 else t.codes[ids]             # [T, H]
            return affine_dequantize(rows, t.scales[ids], t.mins[ids], t.spec)
        codes, scales, mins = self.table.panels()         # 8-bit [P, H/4, 8, 4] int8 | 4-bit [P, H/8, 8, 4]; [P, G, 8]
        panel, lane = ids // QPANEL, ids % QPANEL
        picked = codes[panel, :, lane, :]                                                 # [T, H/4 | H/8, 4]
        if self.table.spec.bits == 4:                     # byte b of a lane: code k + b low, k + 4 + b high
            picked = torch.stack([picked & 0x0F, picked >> 4], dim=-2)                    # [T, H/8, 2, 4]
        rows = picked.reshape(len(ids), scales.shape[1], -1).float()                      # [T, G, g]
        weight = rows * scales[panel, :, lane].float()[..., None] + mins[panel, :, lane].float()[..., None]
        return weight.reshape(len(ids), -1)                                              # [T, H]


class CausalLM(nn.Module):
    """Internal parameter names: embed, layers.{i}.{attn_norm,attn.qkv,attn.o,mlp_norm,
    mlp.gate_up,mlp.down} (a mixture: mlp.router, mlp.experts.{e}.{gate_up,down}), norm, lm_head
    (absent when tied). `ops` (models/ops.py) runs
    everything device-specific; it is chosen at load, before the model is built."""

    def __init__(self, args: ModelArgs, rope: RotaryEmbedding, ops, rope_local: RotaryEmbedding | None = None):
        super().__init__()
        self.args, self.ops = args, ops
        # given its (uninitialised) weight: a random init on the meta device costs a second of torch imports
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size,
                                  _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i, ops) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.lm_head = None if args.tie_word_embeddings else make_linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope, self.rope_local = rope, rope_local      # rope_local: the sliding layers' own (Gemma 3)
        self.compute_dtype = torch.float32
        self.fused: FusedDecoder | None = None
        self.loras = None               # models/lora.py's LoRASet, once an adapter has been loaded

    def finalize(self, compute_dtype: torch.dtype, head_bits: int = 8) -> None:
        """After loading, convert for runtime: tie the head, swap every loaded linear for the kind
        the ops run (native panels or the torch reference), read a tied embedding from the head."""
        self.compute_dtype = compute_dtype
        if self.lm_head is None:
            quantized_table = isinstance(self.embed, QuantizedEmbedding)
            self.lm_head = self.embed.table if quantized_table else tied_head(self.embed.weight)
        if self.weight_quantized():
            self.lm_head = quantize_head(self.ops, self.lm_head, head_bits)
        swapped: dict[int, nn.Module] = {}       # a tied table is one module under two names
        for name, module in list(self.named_modules(remove_duplicate=False)):
            if isinstance(module, (Linear, QuantLinear)):
                parent, _, child = name.rpartition(".")
                if id(module) not in swapped:
                    swapped[id(module)] = runtime_linear(self.ops, module)
                setattr(self.get_submodule(parent), child, swapped[id(module)])
        if self.args.tie_word_embeddings and isinstance(self.lm_head, PanelLinear):
            self.embed = PanelEmbedding(self.lm_head)
        elif self.args.tie_word_embeddings and isinstance(self.lm_head, IntPanelLinear):
            self.embed = QuantizedEmbedding(self.lm_head)
        self.fused = self.ops.fused_decoder(self)

    def weight_quantized(self) -> bool:
        return any(isinstance(m, (QuantLinear, IntPanelLinear)) for m in self.layers.modules())

    def weight_bytes(self) -> int:
        """Bytes of weights held (parameters plus the linears' codes and packed panels)."""
        linears = [m for m in self.modules() if isinstance(m, RUNTIME_KINDS)]
        held = sum(b.nbytes for m in linears for b in m.buffers(recurse=False))
        return held + sum(p.nbytes for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache: PagedKVCache, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, H] after the final norm. lora_slots: [T]
        each token's adapter slot (-1: none), None when no row has one."""
        x = self.embed_tokens(input_ids)
        if self.loras is not None:
            self.loras.select(lora_slots)
        if self.fused is not None and not meta.prefills and lora_slots is None:    # the C step adds no deltas
            x, residual = self.fused.forward(x, positions, meta, cache)
            return self.norm(x, residual)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, self.layer_rope(i), positions, meta, cache)
        return self.norm(x, residual)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, H] in the compute dtype (scaled, for Gemma)."""
        x = self.embed(ids).to(self.compute_dtype)
        return x * self.args.embed_scale if self.args.embed_scale != 1.0 else x

    def layer_rope(self, i: int) -> RotaryEmbedding:
        """Layer i's rotary table: a sliding layer's own where the family has one."""
        local = self.rope_local is not None and self.args.layer_windows and self.args.layer_windows[i]
        return self.rope_local if local else self.rope

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] in float32 (soft-capped where the family says)."""
        logits = self.lm_head(hidden).float()
        cap = self.args.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits


def quantize_head(ops, head: Linear, bits: int = 8) -> nn.Module:
    """Integer output head for weight-quantized models, when the ops run integer linears: 8-bit by
    default (as llama.cpp keeps an 8-bit output tensor), a fifth of the bf16 bytes read every
    step; --head-bits 4 halves that again. Group 64 (32 when the hidden size needs it), asymmetric."""
    hidden = head.in_features
    group = 64 if hidden % 64 == 0 else 32
    if not isinstance(head, Linear) or not ops.takes_int(hidden, group, bits):
        return head
    return QuantLinear(quantize(head.weight.data, QuantSpec(bits, group)), None)
