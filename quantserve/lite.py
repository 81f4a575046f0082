"""Weight quantization from Python, the same jobs as `quantserve lite`:

    from quantserve import lite
    lite.auto_gptq("path/to/float-model", "path/to/out", w_bits=4, w_group_size=128,
                   calib_dataset="wikitext2", calib_samples=256, calib_seqlen=1024)
    lite.auto_awq(...); lite.rtn(...)

Each writes a checkpoint that `pipeline()`, `LLM()` and `serve api_server` load, and returns the
summary `quantserve lite` prints (time, sizes). A model may be a .gguf file.
"""
from __future__ import annotations

from pathlib import Path


def auto_awq(model: str, work_dir: str, w_bits: int = 4, w_group_size: int = 128, w_sym: bool = False,
             calib_dataset: str = "ptb", calib_samples: int = 128, calib_seqlen: int = 2048, batch_size: int = 1,
             search_scale: bool = False, clip: bool = True, progress: bool = True) -> str:
    """AWQ: activation-aware scales and clipping, then group quantization."""
    return quantize(model, work_dir, "awq", w_bits, w_group_size, w_sym, calib_dataset, calib_samples, calib_seqlen,
                    batch_size, progress, search_scale=search_scale, clip=clip)


def auto_gptq(model: str, work_dir: str, w_bits: int = 4, w_group_size: int = 128, w_sym: bool = False,
              calib_dataset: str = "ptb", calib_samples: int = 128, calib_seqlen: int = 2048, batch_size: int = 1,
              damp_percent: float = 0.01, desc_act: bool = True, progress: bool = True) -> str:
    """GPTQ: Hessian-based error compensation, layer by layer."""
    return quantize(model, work_dir, "gptq", w_bits, w_group_size, w_sym, calib_dataset, calib_samples, calib_seqlen,
                    batch_size, progress, damp_percent=damp_percent, desc_act=desc_act)


def rtn(model: str, work_dir: str, w_bits: int = 4, w_group_size: int = 128, w_sym: bool = False,
        progress: bool = True) -> str:
    """Round-to-nearest, data-free."""
    return quantize(model, work_dir, "rtn", w_bits, w_group_size, w_sym, "ptb", 0, 1, 1, progress)


def quantize(model: str, work_dir: str, method: str, bits: int, group: int, sym: bool, dataset: str, samples: int,
             seqlen: int, batch_size: int, progress: bool, **options) -> str:
    """Any method (rtn, awq, gptq); options: LiteJob's fields (search_scale, clip, damp_percent, …)."""
    from quantserve.quant.calib import check_dataset
    from quantserve.quant.primitives import QuantSpec
    from quantserve.quant.run import LiteJob, run

    if samples:
        check_dataset(dataset)              # before any weights are read
    if str(model).lower().endswith(".gguf"):
        from quantserve.models.resolve import resolve_model

        model = resolve_model(model, progress=progress)
    job = LiteJob(str(Path(model)), str(work_dir), method, QuantSpec(bits, group, sym), dataset, samples, seqlen,
                  batch_size, progress=progress, **options)
    return run(job)
