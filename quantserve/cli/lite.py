"""`quantserve lite auto_awq | auto_gptq | rtn MODEL`: weight quantization; `lite calibrate` and
`lite kv_qparams`: static KV cache parameters. LMDeploy's flags, old spellings included."""
from __future__ import annotations

import argparse
import logging
import sys

from quantserve.cli.args import boolean

METHODS = {"auto_awq": "awq", "auto_gptq": "gptq", "rtn": "rtn", "smooth_quant": "smooth_quant"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lite_command", required=True,
                           metavar="{auto_awq,auto_gptq,rtn,smooth_quant,calibrate,kv_qparams}")
    helps = {"auto_awq": "AWQ: activation-aware scales and clipping, then 4-bit group quantization",
             "auto_gptq": "GPTQ: Hessian-based error compensation, layer by layer",
             "rtn": "round-to-nearest, data-free",
             "smooth_quant": "SmoothQuant W8A8: activation outliers migrated into the weights, int8 per channel"}
    for name, text in helps.items():
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("model_path", nargs="?", default=None,
                       help="a float Hugging Face model directory, or a .gguf file")
        q.add_argument("--model", dest="model_flag", default=None, help="the model, as LMDeploy's older --model")
        q.add_argument("--work-dir", default="./work_dir", help="where the quantized model is written")
        smooth = name == "smooth_quant"
        q.add_argument("--w-bits", type=int, default=8 if smooth else 4, help="weight bits: 4 or 8 (smooth_quant: 8)")
        q.add_argument("--w-group-size", type=int, default=-1 if smooth else 128,
                       help="input channels per group: 32, 64, 128, -1 (smooth_quant: -1, per channel)")
        q.add_argument("--w-sym", action="store_true", default=smooth, help="symmetric quantization (no zero point)")
        q.add_argument("--smooth-alpha", "--migration-strength", type=float, default=0.5,
                       help="smooth_quant: how much of the activations' range moves into the weights")
        q.add_argument("--calib-dataset", default="ptb", help="ptb, wikitext2, c4, pileval, or a .txt/.jsonl path")
        q.add_argument("--calib-samples", type=int, default=128, help="0 = data-free (round-to-nearest)")
        q.add_argument("--calib-seqlen", type=int, default=2048)
        q.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward")
        q.add_argument("--search-scale", type=boolean, nargs="?", const=True, default=False,
                       help="AWQ: search the scale exponent per block (default: 0.5)")
        q.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
        q.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ: Hessian damping")
        q.add_argument("--desc-act", type=boolean, nargs="?", const=True, default=True,
                       help="GPTQ: act-order, columns by decreasing Hessian diagonal (default: True; static groups "
                            "keep it free at inference); False: columns in order")
        q.add_argument("--fake-quant", action="store_true",
                       help="write the dequantized float weights instead of packed codes (any bits, e.g. 3, for evaluation)")
        q.add_argument("--dtype", default="auto", help="accepted for LMDeploy compatibility")
        q.add_argument("--device", default="cpu", help="accepted for LMDeploy compatibility (runs on the CPU)")
        q.add_argument("--trust-remote-code", action="store_true")
    add_calibrate_args(sub.add_parser("calibrate", help="K/V and linear-input statistics over a calibration set",
                                      description="K/V and linear-input statistics over a calibration set"))
    add_kv_qparams_args(sub.add_parser("kv_qparams", help="static KV cache parameters from `lite calibrate`",
                                       description="static KV cache parameters from `lite calibrate`, switched on "
                                                   "in the target model or workspace directory"))


def add_calibrate_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("model_path", nargs="?", default=None, help="a float Hugging Face model directory, or a .gguf file")
    q.add_argument("--model", dest="model_flag", default=None, help="the model, as LMDeploy's older --model")
    q.add_argument("--work-dir", default="./work_dir", help="where the statistics are written")
    q.add_argument("--calib-dataset", default="ptb", help="ptb, wikitext2 (bundled), or a .txt/.jsonl path")
    q.add_argument("--calib-samples", type=int, default=128)
    q.add_argument("--calib-seqlen", type=int, default=2048)
    q.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward")
    q.add_argument("--dtype", default="auto", help="accepted for LMDeploy compatibility")
    q.add_argument("--device", default="cpu", help="accepted for LMDeploy compatibility (runs on the CPU)")


def add_kv_qparams_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("work_dir_arg", nargs="?", default=None, metavar="WORK_DIR", help="`lite calibrate`'s work dir")
    q.add_argument("turbomind_dir_arg", nargs="?", default=None, metavar="TARGET_DIR",
                   help="the model directory or workspace (or its triton_models/weights) to switch static KV on in")
    q.add_argument("--work-dir", default=None)
    q.add_argument("--turbomind-dir", default=None)
    q.add_argument("--kv-bits", type=int, default=8, choices=[8, 4], help="the quant_policy switched on (default 8)")
    q.add_argument("--kv-sym", type=boolean, nargs="?", const=True, default=False,
                   help="symmetric (absmax) parameters instead of min / max")
    q.add_argument("--num-tp", type=int, default=1, help="tensor parallel shards: 1 only")


def run(ns) -> int:
    from quantserve.lite import quantize
    from quantserve.quant.primitives import QuantError

    logging.basicConfig(level="WARNING", stream=sys.stderr)
    if ns.lite_command == "kv_qparams":
        return run_kv_qparams(ns)
    if ns.calib_samples < 0 or ns.calib_seqlen <= 0 or ns.batch_size <= 0:
        raise QuantError("--calib-samples must be >= 0, --calib-seqlen and --batch-size > 0")
    if ns.lite_command == "calibrate":
        from quantserve.lite import calibrate

        print(calibrate(model_of(ns), ns.work_dir, ns.calib_dataset, ns.calib_samples, ns.calib_seqlen, ns.batch_size))
        return 0
    samples = 0 if ns.lite_command == "rtn" else ns.calib_samples
    print(quantize(model_of(ns), ns.work_dir, METHODS[ns.lite_command], ns.w_bits, ns.w_group_size, ns.w_sym,
                   ns.calib_dataset, samples, ns.calib_seqlen, ns.batch_size, True, search_scale=ns.search_scale,
                   clip=not ns.no_clip, damp_percent=ns.damp_percent, desc_act=ns.desc_act, fake_quant=ns.fake_quant,
                   smooth_alpha=ns.smooth_alpha))
    return 0


def model_of(ns) -> str:
    """MODEL_PATH or --model (LMDeploy's older spelling): exactly one of them."""
    if (ns.model_path is None) == (ns.model_flag is None):
        raise ValueError("give the model once: as MODEL_PATH or as --model PATH")
    return ns.model_path or ns.model_flag


def run_kv_qparams(ns) -> int:
    from quantserve.lite import kv_qparams

    if ns.num_tp != 1:
        raise ValueError(f"--num-tp {ns.num_tp}: quantserve runs one process per model; use --num-tp 1")
    work_dir, target = ns.work_dir or ns.work_dir_arg, ns.turbomind_dir or ns.turbomind_dir_arg
    if not work_dir or not target:
        raise ValueError("give --work-dir (lite calibrate's output) and --turbomind-dir (the model or workspace)")
    print(kv_qparams(work_dir, target, ns.kv_bits, ns.kv_sym))
    return 0
