"""`quantserve lite …`: model directory -> quantized checkpoint, with a summary.

read config and weights (HF names; a GGUF converted at its own bits is dequantized to a temporary
float16 copy first) -> check the settings against every linear -> the method
(RTN, AWQ, GPTQ) turns float linears into integer codes (AWQ also rescales the float weights
that feed them) -> packed checkpoint written atomically -> summary (time, sizes).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from quantserve.quant.arch import arch_for, num_experts, quantized_linears
from quantserve.quant.calib import MIN_EXPERT_ROWS
from quantserve.quant.checkpoint import check_replaceable, save_float, save_quantized
from quantserve.models.workspace import SIDE_FILES
from quantserve.quant.smooth import SPEC as SMOOTH_SPEC
from quantserve.quant.primitives import QuantError, QuantSpec, check_spec, quantize


@dataclass
class LiteJob:
    model: str
    work_dir: str
    method: str                     # rtn, awq, gptq or smooth_quant
    spec: QuantSpec
    calib_dataset: str = "ptb"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 1
    search_scale: bool = False
    clip: bool = True
    damp_percent: float = 0.01
    desc_act: bool = True           # GPTQ act-order (static groups: free at inference)
    progress: bool = True
    fake_quant: bool = False        # write dequantized float weights (any bits, e.g. W3 for evaluation)
    smooth_alpha: float = 0.5       # SmoothQuant's migration strength


def run(job: LiteJob, start: float | None = None, origin: Path | None = None) -> str:
    """origin: the model the summary names, when job.model is a temporary float copy of it."""
    from quantserve.models.loader import checkpoint_files, read_checkpoint, read_config

    start = start or time.monotonic()
    src = Path(job.model)
    cfg = read_config(src)
    ensure_writable(Path(job.work_dir), src)
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        with dequantized_copy(src, cfg, job.progress) as float_dir:     # calibration runs the float model
            return run(replace(job, model=str(float_dir)), start, src)
    if job.method == "smooth_quant" and (job.spec != SMOOTH_SPEC or not job.calib_samples):
        raise QuantError("smooth_quant needs calibration samples (--calib-samples > 0) and writes int8 weights per "
                         "output channel (--w-bits 8)")
    if job.spec.bits not in (4, 8) and not job.fake_quant:
        raise QuantError(f"--w-bits {job.spec.bits}: packed checkpoints hold 4 or 8 bits; add --fake-quant to "
                         "write dequantized weights for evaluation")
    if cfg.get("quantization_config"):
        raise QuantError(f"{src} is already quantized ({cfg['quantization_config'].get('quant_method')}); "
                         "start from the float model")
    arch = arch_for(cfg.get("model_type"))
    weights = read_checkpoint(checkpoint_files(src), job.progress)
    names = quantized_linears(arch, cfg, weights)
    for name in names:
        check_spec(job.spec, weights[f"{name}.weight"].shape[1], name)
    float_bytes = sum(t.nbytes for t in weights.values())
    data_free: list[str] = []        # experts too few calibration tokens reached: rounded to nearest
    quantized = quantize_linears(job, cfg, weights, names, data_free)
    if job.fake_quant:
        for name, qw in quantized.items():
            weights[f"{name}.weight"] = qw.dequantize().to(weights[f"{name}.weight"].dtype)
        save_float(src, Path(job.work_dir), cfg, weights)
        return summary(job, start, float_bytes, origin or src, data_free)
    method = job.method if job.method == "smooth_quant" else "gptq" if job.method == "gptq" or job.spec.bits != 4 \
        else "awq"
    for name in quantized:
        del weights[f"{name}.weight"]
    save_quantized(src, Path(job.work_dir), cfg, weights, quantized, method, job.spec)
    return summary(job, start, float_bytes, origin or src, data_free)


@contextmanager
def dequantized_copy(src: Path, cfg: dict, progress: bool) -> Iterator[Path]:
    """A GGUF converted at its own bits -> a temporary float16 directory of the same name."""
    from quantserve import envs
    from quantserve.models.loader import checkpoint_files, read_checkpoint
    from quantserve.quant.checkpoint import split_gguf, write_checkpoint

    weights, codes = split_gguf(read_checkpoint(checkpoint_files(src), progress), cfg["quantization_config"]["group_size"])
    for name, qw in tqdm(codes.items(), desc="dequantizing GGUF weights", disable=not progress, file=sys.stderr):
        weights[f"{name}.weight"] = qw.dequantize().half()
    float_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"} | {"torch_dtype": "float16"}
    home = envs.quantserve_home()
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lite-", dir=home) as tmp:
        write_checkpoint(src, Path(tmp) / src.name, float_cfg, weights)
        yield Path(tmp) / src.name


def ensure_writable(out: Path, src: Path) -> None:
    """Fail before any work when the result could not be written, or would replace files that are
    not an earlier result (the model being quantized among them)."""
    if out.resolve() == src.resolve():
        raise QuantError(f"--work-dir {out} is the model being quantized; choose another directory")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise QuantError(f"--work-dir {out}: cannot write there ({probe} is not a writable directory)")
    check_replaceable(out)


def quantize_linears(job: LiteJob, cfg: dict, weights: dict[str, torch.Tensor], names: list[str],
                     data_free: list[str]) -> dict:
    gptq_zeros = job.method == "gptq" or job.spec.bits != 4     # GPTQ's format stores zero - 1
    if job.method == "rtn" or job.calib_samples == 0:
        return {name: rtn(weights[f"{name}.weight"], job.spec, gptq_zeros)
                for name in tqdm(names, desc="round-to-nearest", disable=not job.progress, file=sys.stderr)}
    if job.method == "smooth_quant":
        from quantserve.quant.smooth import smooth_quant

        return smooth_quant(weights, arch_for(cfg["model_type"]), cfg["num_hidden_layers"], calibrate(job),
                            job.smooth_alpha, job.progress, num_experts(cfg))
    if job.method == "awq":
        from quantserve.quant.awq import awq

        stats = calibrate(job)
        return awq(weights, arch_for(cfg["model_type"]), cfg["num_hidden_layers"], stats, job.spec,
                   job.search_scale, job.clip, job.progress, num_experts(cfg), data_free)
    from quantserve.quant.gptq import gptq
    from quantserve.quant.sequential import LayerwiseRunner

    runner = LayerwiseRunner(Path(job.model), calibration_set(job), job.batch_size)
    return gptq(weights, arch_for(cfg["model_type"]), runner, job.spec, job.damp_percent, job.desc_act, job.progress,
                num_experts(cfg), data_free)


def calibration_set(job: LiteJob) -> list[list[int]]:
    from quantserve.quant.calib import calibration_windows
    from quantserve.text import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(job.model)
    return calibration_windows(tokenizer, job.calib_dataset, job.calib_samples, job.calib_seqlen)


def calibrate(job: LiteJob) -> dict:
    from quantserve.quant.calib import collect_stats

    return collect_stats(Path(job.model), calibration_set(job), job.batch_size, progress=job.progress)


def rtn(w: torch.Tensor, spec: QuantSpec, gptq_zeros: bool):
    return quantize(w.float(), spec, min_zero=1 if gptq_zeros else 0)


def summary(job: LiteJob, start: float, float_bytes: int, src: Path, data_free: list[str]) -> str:
    out = Path(job.work_dir)
    disk_before = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    disk_after = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    quant_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors") if f.name not in SIDE_FILES)
    return (f"quantized {src.name} with {job.method.upper()} W{job.spec.bits} g{job.spec.group_size} "
            f"in {time.monotonic() - start:.1f} s -> {out}\n"
            f"on disk:   {disk_before / 1e6:,.1f} MB -> {disk_after / 1e6:,.1f} MB\n"
            f"weights:   {float_bytes / 1e6:,.1f} MB -> {quant_bytes / 1e6:,.1f} MB"
            + (f"\n{len(data_free)} expert linears that fewer than {MIN_EXPERT_ROWS} calibration tokens reached, "
               f"rounded to nearest (data-free): {', '.join(data_free[:4])}{' ...' if len(data_free) > 4 else ''}"
               if data_free else ""))
