"""GGUF tensor blocks -> the integer kernels' form: codes with a float16 scale and min per 32 weights.

W = code * scale + min, per (row, group of input channels). Q4_0, Q4_1 and Q8_0 blocks are that
form already (exact, groups of 32); Q4_K is too, per 32-weight sub-block, up to the float16
rounding of the products d * sc and dmin * m. Every other quantized type is dequantized by `gguf`
and requantized at load: to 8 bits in groups of 256 (or the largest of 128 / 64 / 32 dividing the
row) for the 5- and 6-bit types, to 4 bits in groups of 32 below that (Q2_K, Q3_K, IQ*), with the
error this adds measured per tensor. 4-bit codes always come in groups of 32 (split_gguf reads the
width from that). Float tensors (F32, F16, BF16) stay float.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
SAMPLE_ROWS = 256           # rows of a Q4_K tensor its rounding error is measured on
FLOAT_TYPES = ("F32", "F16", "BF16")
EXACT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}
WIDE_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")     # requantized to 8 bits; every other type to 4
WIDE_GROUPS = (256, 128, 64, 32)                   # of the 8-bit requantization: the first dividing K


@dataclass
class Codes:
    codes: np.ndarray       # [N, K] uint8, 0 .. 2^bits - 1
    scales: np.ndarray      # [N, K / group] float16
    mins: np.ndarray        # [N, K / group] float16
    bits: int
    source: str             # the GGML type it came from
    error: float            # rms(ours - gguf's dequantization) / rms(gguf's): 0 for Q4_0/Q4_1/Q8_0, Q4_K's on a sample

    def split(self, parts: int) -> list[Codes]:
        """Equal row ranges (a mixture's experts, stacked)."""
        return [Codes(c, s, m, self.bits, self.source, self.error) for c, s, m in
                zip(*(np.split(a, parts) for a in (self.codes, self.scales, self.mins)))]

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        grouped = self.codes.reshape(n, self.scales.shape[1], -1).astype(np.float32)
        return (grouped * self.scales[..., None].astype(np.float32) + self.mins[..., None].astype(np.float32)
                ).reshape(n, k)


def target_bits(type_name: str) -> int | None:
    """The width a GGML type runs at here; None: kept as a float tensor."""
    if type_name in FLOAT_TYPES:
        return None
    return EXACT_BITS.get(type_name, 8 if type_name in WIDE_TYPES else 4)


def to_codes(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Codes:
    """data: the tensor's raw bytes (any shape), shape: torch layout [N, K]."""
    n, k = shape
    if type_name in EXACT_BITS:
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, _BLOCK_BYTES[type_name])
        codes, scales, mins = _EXACT[type_name](blocks)                     # [groups, 32], [groups] x 2
        out = Codes(codes.reshape(n, k), scales.reshape(n, -1), mins.reshape(n, -1), EXACT_BITS[type_name],
                    type_name, 0.0)
        if type_name == "Q4_K":     # float16 rounding of the scales: measured on the first rows
            rows = min(n, SAMPLE_ROWS)
            sample = Codes(out.codes[:rows], out.scales[:rows], out.mins[:rows], 4, type_name, 0.0)
            out.error = relative_rms(sample.dequantize(), _dequantize(blocks[:rows * k // 256], type_name, (rows, k)))
        return out
    return requantize(_dequantize(data, type_name, shape), type_name)


def requantize(w: np.ndarray, type_name: str) -> Codes:
    """w: [N, K] float32 (gguf's dequantization) -> asymmetric codes at target_bits: 8 bits in the
    largest group dividing K (fewer bytes: 8.1 bits a weight instead of 9), 4 bits in groups of 32."""
    bits = target_bits(type_name)
    n, k = w.shape
    group = next(g for g in WIDE_GROUPS if k % g == 0) if bits == 8 else GROUP
    grouped = w.reshape(n, k // group, group)
    lo, hi = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)     # [N, G], 0 inside the range
    scales = ((hi - lo) / (2 ** bits - 1)).astype(np.float16)
    scales[scales == 0] = 1.0           # an all-zero group (or one below float16's range): codes of 0 exact
    step = scales.astype(np.float32)[..., None]
    zero = np.round(-lo[..., None] / step)
    codes = np.clip(np.round(grouped / step) + zero, 0, 2 ** bits - 1).astype(np.uint8).reshape(n, k)
    mins = (-zero[..., 0] * step[..., 0]).astype(np.float16)
    out = Codes(codes, scales, mins, bits, type_name, 0.0)
    out.error = relative_rms(out.dequantize(), w)
    return out


def relative_rms(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((ours - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-30))


def _dequantize(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(data, GGMLQuantizationType[type_name]), dtype=np.float32).reshape(shape)


def _halves(qs: np.ndarray) -> np.ndarray:
    """[B, 16] packed bytes -> [B, 32] codes: low nibbles are weights 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)[:, 0]


def _q4_0(blocks):
    d = _f16(blocks, 0)                                                   # W = d * (q - 8)
    return _halves(blocks[:, 2:18]), d, (d.astype(np.float32) * -8).astype(np.float16)


def _q4_1(blocks):
    return _halves(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)     # W = d * q + m


def _q8_0(blocks):
    d = _f16(blocks, 0)                                                   # W = d * q, q signed
    codes = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, (d.astype(np.float32) * -128).astype(np.float16)


def _q4_k(blocks):
    """256-weight super-blocks: W = d * sc[j] * q - dmin * m[j] in eight 32-weight sub-blocks j."""
    from gguf.quants import Q4_K

    d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))    # [B, 8] each, 6-bit
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1, 32)                                   # sub-block 2c low nibbles, 2c + 1 high
    scales = (d[:, None] * sc).astype(np.float16).reshape(-1)
    mins = (-dmin[:, None] * m).astype(np.float16).reshape(-1)
    return codes, scales, mins


_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}
_EXACT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k}
