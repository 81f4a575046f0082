"""Weight quantization from Python, the same jobs as `quantserve lite`:

    from quantserve import lite
    lite.auto_gptq("path/to/float-model", "path/to/out", w_bits=4, w_group_size=128,
                   calib_dataset="wikitext2", calib_samples=256, calib_seqlen=1024)
    lite.auto_awq(...); lite.rtn(...); lite.smooth_quant(...)
    lite.calibrate("path/to/float-model", "stats/"); lite.kv_qparams("stats/", "path/to/model-or-workspace")

Each quantizer writes a checkpoint that `pipeline()`, `LLM()` and `serve api_server` load, and returns the
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


def smooth_quant(model: str, work_dir: str, calib_dataset: str = "ptb", calib_samples: int = 128,
                 calib_seqlen: int = 2048, batch_size: int = 1, smooth_alpha: float = 0.5, progress: bool = True) -> str:
    """SmoothQuant W8A8: outliers migrated from activations into weights, int8 per output channel."""
    from quantserve.quant.smooth import SPEC

    return quantize(model, work_dir, "smooth_quant", SPEC.bits, SPEC.group_size, SPEC.symmetric, calib_dataset,
                    calib_samples, calib_seqlen, batch_size, progress, smooth_alpha=smooth_alpha)


def rtn(model: str, work_dir: str, w_bits: int = 4, w_group_size: int = 128, w_sym: bool = False,
        progress: bool = True) -> str:
    """Round-to-nearest, data-free."""
    return quantize(model, work_dir, "rtn", w_bits, w_group_size, w_sym, "ptb", 0, 1, 1, progress)


def quantize(model: str, work_dir: str, method: str, bits: int, group: int, sym: bool, dataset: str, samples: int,
             seqlen: int, batch_size: int, progress: bool, **options) -> str:
    """Any method (rtn, awq, gptq, smooth_quant); options: LiteJob's fields (search_scale, clip, …)."""
    from quantserve.quant.calib import check_dataset
    from quantserve.quant.primitives import QuantSpec
    from quantserve.quant.run import LiteJob, run

    if samples:
        check_dataset(dataset)              # before any weights are read
    job = LiteJob(str(_float_model(model, progress)), str(work_dir), method, QuantSpec(bits, group, sym), dataset, samples, seqlen,
                  batch_size, progress=progress, **options)
    return run(job)


def calibrate(model: str, work_dir: str, calib_dataset: str = "ptb", calib_samples: int = 128,
              calib_seqlen: int = 2048, batch_size: int = 1, progress: bool = True) -> str:
    """K/V and linear-input statistics over the calibration set (quant/statistics.py) -> work_dir."""
    from quantserve.quant import statistics
    from quantserve.quant.calib import calibration_windows, check_dataset
    from quantserve.quant.primitives import QuantError
    from quantserve.text import load_hf_tokenizer

    check_dataset(calib_dataset)
    if calib_samples <= 0 or calib_seqlen <= 0 or batch_size <= 0:
        raise QuantError("--calib-samples, --calib-seqlen and --batch-size must be > 0")
    path = _float_model(model, progress)
    windows = calibration_windows(load_hf_tokenizer(path), calib_dataset, calib_samples, calib_seqlen)
    about = {"model": str(model), "dataset": calib_dataset, "samples": calib_samples, "seqlen": calib_seqlen}
    return statistics.calibrate(path, windows, batch_size, Path(work_dir), about, progress)


def kv_qparams(work_dir: str, target: str, kv_bits: int = 8, kv_sym: bool = False) -> str:
    """Static KV parameters from calibrate's statistics, written into a model directory or
    workspace and switched on there (its config.ini's quant_policy = kv_bits)."""
    from quantserve.models.workspace import model_dir_of, write_settings
    from quantserve.quant import statistics
    from quantserve.quant.primitives import QuantError

    directory = model_dir_of(Path(target))
    if not (directory / "config.json").is_file():
        raise QuantError(f"--turbomind-dir {target}: no config.json there; give a model directory or a workspace")
    summary = statistics.kv_qparams(Path(work_dir), directory, kv_sym)
    write_settings(directory, {"quant_policy": kv_bits})
    return f"{summary}\nswitched on: quant_policy = {kv_bits} in {directory / 'config.ini'}"


def _float_model(model: str, progress: bool) -> Path:
    """A directory to run: a .gguf file converted once (at its own bits)."""
    if str(model).lower().endswith(".gguf"):
        from quantserve.models.resolve import resolve_model

        return resolve_model(model, progress=progress)
    return Path(model)
