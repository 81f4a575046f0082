"""Quantized checkpoints on disk: write (AutoAWQ / GPTQ layout, atomically) and read back.

A run writes into a hidden sibling directory and renames it into place only when everything is
written, so a failed or interrupted run never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from quantserve.models.workspace import CALIBRATION_FILES
from quantserve.quant import smooth
from quantserve.quant.formats import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from quantserve.quant.primitives import QuantError, QuantizedWeight, QuantSpec

COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
          "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
OUTPUT_FILES = {"config.json", "model.safetensors", *COPIED, *CALIBRATION_FILES}


def quantization_config(method: str, spec: QuantSpec, desc_act: bool = False) -> dict:
    if method == "smooth_quant":
        return dict(smooth.QUANTIZATION_CONFIG)
    if method == "awq":
        return {"quant_method": "awq", "version": "gemm", "bits": spec.bits, "group_size": spec.group_size,
                "zero_point": not spec.symmetric}
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": desc_act,
            "sym": spec.symmetric, "checkpoint_format": "gptq"}


def save_quantized(src_dir: Path, out_dir: Path, config: dict, floats: dict[str, torch.Tensor],
                   quantized: dict[str, QuantizedWeight], method: str, spec: QuantSpec) -> None:
    """floats: every tensor kept in floating point (HF names; float32 is stored as float16, as
    AutoAWQ does); quantized: linear name -> codes."""
    tensors = {k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in floats.items()}
    pack = {"awq": pack_awq, "gptq": pack_gptq, "smooth_quant": smooth.pack}[method]
    for name, qw in quantized.items():
        tensors.update({f"{name}.{k}": v for k, v in pack(qw).items()})
    write_checkpoint(src_dir, out_dir, {**config, "quantization_config": quantization_config(method, spec)}, tensors)


def save_float(src_dir: Path, out_dir: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """A plain float checkpoint (pseudo-quantized weights, for evaluation)."""
    write_checkpoint(src_dir, out_dir, config, {k: v.contiguous() for k, v in weights.items()})


def write_checkpoint(src_dir: Path, out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    try:
        with staged_dir(out_dir) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for name in COPIED:
                if (Path(src_dir) / name).is_file():
                    shutil.copy2(Path(src_dir) / name, tmp / name)
            for name in CALIBRATION_FILES:      # `lite calibrate` ran into this work dir first (seed 001)
                if (out_dir / name).is_file():
                    shutil.copy2(out_dir / name, tmp / name)
    except OSError as e:
        raise QuantError(f"--work-dir {out_dir}: cannot write there ({e.strerror or e})") from None


def check_replaceable(out_dir: Path) -> None:
    """Before any work: clear what killed runs left beside out_dir, and refuse an out_dir holding
    anything but an earlier result (a new result replaces it as a whole)."""
    out_dir = Path(os.path.abspath(out_dir))  # `.` and `..` have no name to hide a sibling under
    sweep_stale(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QuantError(f"--work-dir {out_dir} is a file; remove it or choose another directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES or not p.is_file())
        if foreign:
            raise QuantError(f"--work-dir {out_dir} holds files a quantized model does not "
                             f"({', '.join(foreign[:3])}); remove them or choose another directory")


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling to write into, renamed to out_dir only once the block completes: a failed
    or killed run never leaves a directory that looks complete."""
    out_dir = Path(os.path.abspath(out_dir))
    sweep_stale(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_stale(out_dir: Path) -> None:
    """Remove the hidden siblings of out_dir that runs killed mid-write left (their process is gone)."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)(?:-\w+)?")
    parent = out_dir.parent
    for path in parent.iterdir() if parent.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place (an older result there is replaced)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def split_quantized(weights: dict[str, torch.Tensor], qcfg: dict
                    ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """A loaded quantized checkpoint -> (plain tensors, linear name -> unpacked codes)."""
    method = qcfg.get("quant_method")
    bits, group = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    if method == "gguf":
        return split_gguf(weights, group)
    if method == "smooth_quant":
        return split_smooth(weights)
    if method not in ("awq", "gptq"):
        raise QuantError(f"quantization method {method!r} is not supported (awq, gptq, smooth_quant and gguf are)")
    if method == "awq" and str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise QuantError(f"AWQ version {qcfg.get('version')!r} is not supported (gemm is)")
    bases = sorted(n[: -len(".qweight")] for n in weights if n.endswith(".qweight"))
    quantized: dict[str, QuantizedWeight] = {}
    for base in bases:
        parts = {k: weights.pop(f"{base}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{base}.{k}" in weights}
        if method == "awq":
            quantized[base] = unpack_awq(parts, group)
        else:
            qw, g_idx = unpack_gptq(parts, bits, group)
            if not torch.equal(g_idx, torch.arange(len(g_idx)) // (len(g_idx) // qw.scales.shape[1])):
                raise QuantError(f"{base}: act-order GPTQ without static groups (g_idx not monotonic) is not "
                                 "supported; quantize with --desc-act False, or with static groups")
            quantized[base] = qw
    return weights, quantized


def split_smooth(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """A SmoothQuant checkpoint: every linear with an int8 `weight` and a per-channel `scale`."""
    bases = sorted(n.removesuffix(".scale") for n in weights
                   if n.endswith(".scale") and weights.get(n.removesuffix(".scale") + ".weight") is not None
                   and weights[n.removesuffix(".scale") + ".weight"].dtype == torch.int8)
    return weights, {b: smooth.unpack(weights.pop(f"{b}.weight"), weights.pop(f"{b}.scale")) for b in bases}


def split_gguf(weights: dict[str, torch.Tensor], group: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """A converted GGUF (models/gguf.py): `.codes` (4-bit two to a byte, even k low), `.scales` and
    `.mins` per group, W = code * scale + min. 4-bit codes come in groups of `group` (32), so the
    width and the group size are read from the shapes."""
    from quantserve.quant.linear import unpack_nibbles

    quantized: dict[str, QuantizedWeight] = {}
    for base in sorted(n.removesuffix(".codes") for n in weights if n.endswith(".codes")):
        codes, scales, mins = (weights.pop(f"{base}.{k}") for k in ("codes", "scales", "mins"))
        bits = 4 if 2 * codes.shape[1] == group * scales.shape[1] else 8
        q = unpack_nibbles(codes) if bits == 4 else codes
        spec = QuantSpec(bits, q.shape[1] // scales.shape[1])
        quantized[base] = QuantizedWeight(q, scales.float(), None, spec, mins.float())
    return weights, quantized
