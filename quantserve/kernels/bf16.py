"""wtype 3, "bf16 pairs": bfloat16 weights x bfloat16-rounded activations, fp32 accumulation.

The weight is repacked at load into panels of 16 output rows holding two consecutive k of a row
per 32-bit lane, so one 512-bit load feeds AVX512-BF16's vdpbf16ps (16 outputs x 2 k); each
row of x is rounded to bf16 (nearest even) once per call. Against wtype 1 (bf16 weights, fp32
activations) the activations lose their low 16 bits (relative error <= 2^-8 each) and the
multiplies run at twice the fp32 FMA rate. Only the avx512 build has these kernels, and only a
CPU with avx512_bf16 runs them: check `available(lib)` first.
"""
from __future__ import annotations

import ctypes

import torch

from quantserve.kernels import PANEL, cpu_flags

W_PAIRS = 3         # the wtype of qs_linear / qs_decode_layers
PAIR = 2            # consecutive k per 32-bit lane


def available(lib: ctypes.CDLL | None) -> bool:
    """Whether this kernel library has the bf16-pair kernels and this CPU can run them."""
    return lib is not None and lib.qs_has_bf16_dot() == 1 and "avx512_bf16" in cpu_flags()


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (K even) -> [ceil(N / 16), K / 2, 16, 2] bfloat16:
    packed[p, kk, j, c] = weight[16 p + j, 2 kk + c], rows past N zero."""
    n, k = weight.shape
    if k % PAIR:
        raise ValueError(f"bf16 pairs need an even number of input features, got {k}")
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=torch.bfloat16)
    padded[:n] = weight
    return padded.view(-1, PANEL, k // PAIR, PAIR).transpose(1, 2).contiguous()


def embedding_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the weight held in `packed` (a tied embedding read from the head's panels):
    ids [T] -> [T, K] bfloat16."""
    return packed[ids // PANEL, :, ids % PANEL, :].flatten(-2)          # [T, K/2, 2] -> [T, K]


def linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, n: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x: [M, K] float32 contiguous; packed: pack_pairs() of an [n, K] weight -> [M, n] float32."""
    m, k = x.shape
    if packed.dtype != torch.bfloat16 or packed.shape[1:] != (k // PAIR, PANEL, PAIR):
        raise ValueError(f"packed {tuple(packed.shape)} {packed.dtype} is not pack_pairs() of a [*, {k}] weight")
    y = torch.empty(m, n, dtype=torch.float32)
    lib.qs_linear(x.data_ptr(), m, k, packed.data_ptr(), W_PAIRS, None if bias is None else bias.data_ptr(),
                  y.data_ptr(), n, torch.get_num_threads())
    return y
