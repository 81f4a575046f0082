"""Native CPU kernels, built from cpu_kernels.c once per instruction set and cached by source hash.

Everything device-specific lives here. The kernel backend is decided once, at first use:
`avx512` (F/BW/VL + VNNI) where the CPU has it, else `avx2` (AVX2/FMA/F16C), else `torch`
(plain PyTorch ops: no AVX2, no C compiler, or CUDA). QUANTSERVE_ISA=avx512|avx2|torch forces
one (QUANTSERVE_DISABLE_KERNELS=1 means torch). `cpu()` is that backend's library, or None.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from quantserve import envs

logger = logging.getLogger("quantserve")
SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# backend: (compiler flags, /proc/cpuinfo flags the CPU must have, what it uses), widest first
ISAS = {
    "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                "-mprefer-vector-width=256"],
               ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
               "AVX-512 F/BW/VL + VNNI"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c"), "AVX2 + FMA + F16C"),
}
BACKENDS = (*ISAS, "torch")

W_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CACHE_TYPES = {**W_TYPES, torch.uint8: 3}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def runs_here(backend: str) -> bool:
    """Whether this CPU has every instruction set the backend's build uses."""
    return backend == "torch" or set(ISAS[backend][1]) <= cpu_flags()


@functools.cache
def backend() -> str:
    """The kernel backend of this process, decided once."""
    forced = "torch" if envs.kernels_disabled() else envs.isa()
    if forced is not None:
        if forced not in BACKENDS:
            raise RuntimeError(f"QUANTSERVE_ISA={forced}: expected one of {', '.join(BACKENDS)}")
        if not runs_here(forced):
            missing = sorted(set(ISAS[forced][1]) - cpu_flags())
            raise RuntimeError(f"QUANTSERVE_ISA={forced}: this CPU lacks {', '.join(missing)}")
        return forced if forced == "torch" or load(forced) is not None else "torch"
    return next((b for b in ISAS if runs_here(b) and load(b) is not None), "torch")


def describe() -> str:
    """The backend in words, for the memory table, /info and the benchmarks."""
    name = backend()
    return f"{name} ({ISAS[name][2]})" if name in ISAS else "torch (plain PyTorch ops)"


def _build(target: Path, flags: list[str]) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *flags, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True, text=True)
        out.replace(target)


@functools.cache
def load(isa: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernel library built for `isa` (built on first use), or None if it cannot be built or
    loaded; `defines` (e.g. "-DQS_PROFILE") make a variant of it, cached apart. Callers check
    runs_here(isa) first: calling into a build the CPU lacks is SIGILL."""
    flags = [*COMMON_FLAGS, *ISAS[isa][0], *defines]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = envs.quantserve_home() / "kernels" / f"libqs-{isa}-{digest}.so"
    try:
        if not target.exists():
            logger.info("building %s CPU kernels (once) -> %s", isa, target)
            _build(target, flags)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("%s CPU kernels unavailable: %s", isa, detail)
        return None
    _declare(lib)
    return lib


def cpu() -> ctypes.CDLL | None:
    """The backend's kernel library, or None when the backend is torch."""
    name = backend()
    return load(name) if name in ISAS else None


def _declare(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.qs_linear.argtypes = [p, i, i, p, i, p, p, i, i]
    lib.qs_decode_attention.argtypes = [p, ctypes.c_long, p, p, i, p, p, i, i, i, i, i, i, f, p, i]
    lib.qs_add_rmsnorm.argtypes = [p, p, p, f, p, i, i]
    lib.qs_rope.argtypes = [p, i, ctypes.c_long, i, i, i, p, p, p]
    lib.qs_kv_write.argtypes = [p, ctypes.c_long, i, i, p, p, i]
    lib.qs_silu_mul.argtypes = [p, p, i, i]
    lib.qs_kv_write_quant.argtypes = [p, ctypes.c_long, i, i, i, p, p, p, p, i, i, p, p]
    lib.qs_decode_attention_quant.argtypes = [p, ctypes.c_long, p, p, p, p, i, i, i, i, i, i, f, p, i]
    lib.qs_decode_layers.argtypes = [p, i, p, p, p]
    lib.qs_linear_q.argtypes = [p, i, i, p, i, p, p, i, p, p, i, i]
    lib.qs_has_bf16_dot.argtypes, lib.qs_has_bf16_dot.restype = [], i
    lib.qs_prefill_attention.argtypes = [p, ctypes.c_long, p, p, i, p, i, i, i, i, i, i, f, p, i]
    lib.qs_prefill_attention_quant.argtypes = [p, ctypes.c_long, p, p, p, i, i, i, i, i, i, f, p, i]
    for fn in (lib.qs_linear, lib.qs_linear_q, lib.qs_decode_attention, lib.qs_add_rmsnorm, lib.qs_rope, lib.qs_kv_write,
               lib.qs_silu_mul, lib.qs_decode_layers, lib.qs_kv_write_quant, lib.qs_decode_attention_quant,
               lib.qs_prefill_attention, lib.qs_prefill_attention_quant):
        fn.restype = None


PANEL = 16          # output rows per float-weight panel
MAX_HEAD_DIM = 256  # the C kernels keep one head vector on the stack


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> panels [ceil(N / 16), K, 16]: packed[p, k, j] = weight[16 p + j, k] (zero-padded)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


QPANEL = 8          # output rows per integer-weight panel
QBLOCK = 32         # activation quantization block; K and group sizes must be multiples of it


def pack_quantized(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K] (0 .. 2^bits - 1), scales / mins [N, G] (W = code * scale + min) -> the layout of qs_linear_q:
    panels of 8 rows, 4 consecutive k of a row per 32-bit lane. 4-bit: [P, K/8, 8, 4] uint8 holding
    k and k + 4 as low and high nibbles; 8-bit: [P, K/4, 8, 4] int8 (code - 128). Scales and mins
    [P, G, 8] float16, weight = scale * stored code + min."""
    n, k = codes.shape
    rows = -(-n // QPANEL) * QPANEL
    padded = torch.zeros(rows, k, dtype=torch.uint8)
    padded[:n] = codes
    if bits == 4:
        c = padded.view(-1, QPANEL, k // 8, 2, 4).permute(0, 2, 1, 3, 4)           # [P, K/8, 8, 2, 4]
        panels = c[..., 0, :] | (c[..., 1, :] << 4)
    else:
        panels = (padded.view(-1, QPANEL, k // 4, 4).permute(0, 2, 1, 3).short() - 128).to(torch.int8)
    scale, offset = torch.zeros(rows, scales.shape[1]), torch.zeros(rows, scales.shape[1])
    scale[:n], offset[:n] = scales.float(), mins.float()
    offset = offset + 128 * scale if bits == 8 else offset       # 8-bit codes are stored as code - 128

    def by_panel(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, QPANEL, t.shape[1]).transpose(1, 2).half().contiguous()   # [P, G, 8]

    return panels.contiguous(), by_panel(scale), by_panel(offset)


def unpack_quantized(panels: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, n: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_quantized's inverse: -> codes [n, K] uint8, scales and mins [n, G] float32."""
    p, kb = panels.shape[:2]
    if bits == 4:
        c = torch.stack([panels & 0x0F, panels >> 4], dim=3)                             # [P, K/8, 8, 2, 4]
        codes = c.permute(0, 2, 1, 3, 4).reshape(p * QPANEL, kb * 8)
    else:
        codes = (panels.permute(0, 2, 1, 3).reshape(p * QPANEL, kb * 4).short() + 128).to(torch.uint8)

    def by_row(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, t.shape[1]).float()[:n]                       # [n, G]

    scale, offset = by_row(scales), by_row(mins)
    return codes[:n].contiguous(), scale, offset - 128 * scale if bits == 8 else offset


def unpack_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_weight's inverse (and bf16.pack_pairs', given its [P, K/2, 16, 2]): -> [n, K]."""
    if packed.dim() == 4:
        packed = packed.reshape(packed.shape[0], -1, PANEL, 2).transpose(2, 3).reshape(packed.shape[0], -1, PANEL)
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n].contiguous()


class QuantCache(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bits", ctypes.c_int), ("groups", ctypes.c_int), ("fixed_scale", ctypes.c_void_p),
                ("fixed_zero", ctypes.c_void_p), ("hkv", ctypes.c_int)]       # fixed: written only by kv_write


def param_groups(data: torch.Tensor, scale: torch.Tensor) -> int:
    """Groups per head: scale is [..., Hkv] (1) or [..., Hkv, G]."""
    return scale.shape[-1] if scale.dim() == data.dim() else 1


def quant_cache(parts: tuple[torch.Tensor, ...], head_dim: int) -> QuantCache:
    """(codes, scale, zero) of one layer of a quantized KV cache -> the C struct (bits from the
    codes' width)."""
    data, scale, zero = parts
    return QuantCache(data.data_ptr(), scale.data_ptr(), zero.data_ptr(), 8 * data.shape[-1] // head_dim,
                      param_groups(data, scale))
