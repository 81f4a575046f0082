"""`quantserve mem [MODEL]`: memory calculator (no weights loaded), inference and training.

    quantserve mem --params 7B --dtype bf16 --device-memory 24GB                 # 14 + 8 + 1 = 23 GB
    quantserve mem --params 7B --w-bits 4 --cache-max-entry-count 0.4 --quant-policy 4
    quantserve mem MODEL_DIR --train lora --optimizer adam8bit --seq-len 2048
    quantserve mem MODEL_DIR --measure       # load the model, run a workload, compare with reality
"""
from __future__ import annotations

import json
from pathlib import Path

GIB = 2 ** 30


def add_arguments(p) -> None:
    p.add_argument("model_path", nargs="?", default=None, help="model directory or config.json (optional with --params)")
    p.add_argument("--params", default=None, help="parameter count instead of a model, e.g. 7B, 1.8B")
    p.add_argument("--vision-params", default="0", help="vision tower parameters, kept in half precision (e.g. 6B)")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, fp16, bf16")
    p.add_argument("--w-bits", type=int, default=16, choices=[4, 8, 16], help="weight bits (4/8 = quantized)")
    p.add_argument("--w-group-size", type=int, default=128, help="quantization group (0 = per channel, no group scales)")
    p.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8], help="KV cache quantization")
    p.add_argument("--device-memory", default=None, help="memory of the device, e.g. 24GB (default: this machine's RAM)")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8)
    p.add_argument("--other-gb", type=float, default=1.0, help="activations and buffers (the tutorials' ~1 GB)")
    p.add_argument("--layers", type=int, help="with --params: layers (for KV and activation sizes)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--train", choices=["full", "lora"], default=None, help="training memory instead of inference")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "adam8bit", "sgd"])
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--recompute", action="store_true", help="activation recomputation (checkpointing)")
    p.add_argument("--measure", action="store_true", help="also load the model on this machine and measure")
    p.add_argument("--json", action="store_true")


def shape(ns):
    from quantserve.bench.memory import ModelShape, parse_count, shape_from_config
    from quantserve.models.loader import read_config
    from quantserve.models.resolve import resolve_model

    if ns.params:
        head_dim = ns.hidden_size // ns.heads if ns.hidden_size and ns.heads else None
        return ModelShape(parse_count(ns.params), ns.layers, ns.hidden_size, ns.heads, ns.kv_heads or ns.heads, head_dim)
    path = Path(ns.model_path) if ns.model_path else resolve_model(None)
    return shape_from_config(read_config(path.parent if path.name == "config.json" else resolve_model(str(path))))


def estimate(ns) -> dict:
    from quantserve.bench.memory import inference_memory, parse_count, training_memory
    from quantserve.values import parse_size
    from quantserve.kvcache.budget import free_memory

    s = shape(ns)
    if ns.train:
        return training_memory(s, ns.dtype, ns.optimizer, ns.train, ns.lora_rank, ns.batch_size, ns.seq_len,
                               ns.recompute, ns.w_bits).as_dict()
    device = parse_size(ns.device_memory) if ns.device_memory else total_memory() or free_memory("cpu")
    return inference_memory(s, device, ns.dtype, ns.w_bits, ns.w_group_size, ns.quant_policy,
                            ns.cache_max_entry_count, ns.other_gb, parse_count(ns.vision_params)).as_dict()


def total_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except OSError:
        return None


def run(ns) -> int:
    report = estimate(ns)
    if ns.measure:
        report["measured"] = measure(ns)
    if ns.json:
        print(json.dumps(report))
        return 0
    print(table(report))
    return 0


def table(report: dict) -> str:
    rows = [("item", "GB", "GiB")]
    for key, value in report.items():
        if key.endswith("_gb") and key != "device_gb":
            rows.append((key[:-3].replace("_", " "), f"{value:.3f}", f"{value * 1e9 / GIB:.3f}"))
    extra = [f"{k.replace('_', ' ')}: {v:,.0f}" if isinstance(v, (int, float)) else f"{k}: {v}"
             for k, v in report.items() if not k.endswith("_gb") and v is not None and k != "measured"]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    if "device_gb" in report:
        lines.append(f"(device {report['device_gb']:.1f} GB)")
    lines += extra
    if "measured" in report:
        lines.append("measured on this machine: " + ", ".join(f"{k} {v:.3f}" for k, v in report["measured"].items()))
    return "\n".join(lines)


def measure(ns) -> dict:
    """Load the model with the same settings, run a short workload, report what it holds."""
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.models.resolve import resolve_model

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(ns.dtype, ns.dtype)
    engine = Engine(resolve_model(ns.model_path), EngineConfig(dtype=dtype, quant_policy=ns.quant_policy,
                                                               cache_max_entry_count=ns.cache_max_entry_count),
                    progress=False)
    return engine.measure_memory()
