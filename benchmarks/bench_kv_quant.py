"""KV cache quantization: quality (perplexity), capacity and speed, float16 KV vs int8 vs int4,
online (per token) and static (`lite calibrate` + `lite kv_qparams`, per layer and head).

    python benchmarks/bench_kv_quant.py [--windows 20]

Static parameters are calibrated on PTB (128 windows of 512 tokens), not on the WikiText-2 text
that is scored.

Perplexity: WikiText-2 test through the engine's paged cache with 64-token prefill chunks, so
most attention reads the (quantized) cache; the first --windows windows of 2048 tokens
(the whole split is ~140 windows, ~25 min per setting on 2 cores). Capacity: tokens a fixed
budget holds, scale/zero overhead included. Speed: decode tokens/s at batch 1 and 16.
Writes benchmarks/results/kv_quant.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import prompt_ids, run_requests  # noqa: E402
from quantserve.bench.perplexity import dataset_text, perplexity  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.kvcache.paged import PagedKVCache  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.text import Tokenizer  # noqa: E402

SETTINGS = {"float16": (0, False), "int8": (8, False), "int8 static": (8, True), "int4": (4, False),
            "int4 static": (4, True)}
SHAPES = {"SmolLM2-135M (30 layers, 3 KV heads, D=64)": (30, 3, 64),
          "InternLM2.5-1.8B (24 layers, 8 KV heads, D=128)": (24, 8, 128)}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def capacity_rows() -> list[str]:
    rows = ["| model shape | KV dtype | bytes / token | tokens in 1 GiB | vs float16 | vs float32 |",
            "|---|---|---:|---:|---:|---:|"]
    for name, (layers, heads, d) in SHAPES.items():
        fp32 = PagedKVCache.bytes_per_token(layers, heads, d, torch.float32)
        for label, dtype, bits in (("float32", torch.float32, 0), ("float16", torch.float16, 0),
                                   ("int8", torch.float16, 8), ("int4", torch.float16, 4)):
            b = PagedKVCache.bytes_per_token(layers, heads, d, dtype, bits)
            fp16 = PagedKVCache.bytes_per_token(layers, heads, d, torch.float16)
            rows.append(f"| {name} | {label} | {b} | {2**30 // b:,} | {fp16 / b:.3f}x | {fp32 / b:.3f}x |")
    return rows


def static_copy(model_dir: Path, root: Path) -> Path:
    """The model's files linked into `root`, with kv_qparams calibrated on PTB beside them."""
    from quantserve.lite import calibrate, kv_qparams

    copy = root / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).symlink_to(f.resolve())
    log("static parameters: lite calibrate (PTB, 128 x 512 tokens) + lite kv_qparams ...")
    calibrate(str(copy), str(root / "stats"), "ptb", 128, 512, 4, progress=False)
    kv_qparams(str(root / "stats"), str(copy))
    return copy


def measure(model_dir: Path, policy: int, windows: int, tokenizer, label: str) -> dict:
    log(f"{label}: perplexity over {windows} windows ...")
    engine = Engine(model_dir, EngineConfig(quant_policy=policy, max_prefill_token_num=64, session_len=2049,
                                            max_batch_size=16), progress=False)
    assert engine.kv_cache_dtype.endswith("static") == label.endswith("static")
    result = perplexity(engine, dataset_text("wikitext2"), tokenizer, 2048, windows)
    speeds = {}
    for n in (1, 16):
        prompts = [prompt_ids(tokenizer, 128, offset=i) for i in range(n)]
        run_requests(engine, prompts, 4)
        engine.scheduler.token_budget = 8192
        _, t = min(run_requests(engine, prompts, 128) for _ in range(2))
        speeds[n] = n * 127 / t
    log(f"{label}: ppl {result.ppl:.4f}, decode {speeds}")
    return {"ppl": result.ppl, "tokens": result.tokens, "decode_b1": speeds[1], "decode_b16": speeds[16]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--windows", type=int, default=20)
    args = p.parse_args()
    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer(model_dir).hf
    with tempfile.TemporaryDirectory() as tmp:
        static_dir = static_copy(model_dir, Path(tmp))
        results = {label: measure(static_dir if static else model_dir, q, args.windows, tokenizer, label)
                   for label, (q, static) in SETTINGS.items()}
    base = results["float16"]
    rows = ["| KV cache | WikiText-2 ppl | vs float16 | decode b=1 | decode 16 seqs |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | "
                    f"{r['decode_b1']:.1f} tok/s | {r['decode_b16']:.1f} tok/s |")
    md = (f"SmolLM2-135M-Instruct, float16 weights, {results['float16']['tokens']:,} tokens scored "
          f"({args.windows} windows x 2048), prefill chunks of 64 tokens\n\n" + "\n".join(rows) + "\n\n"
          + "\n".join(capacity_rows()) + "\n")
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "kv_quant.json").write_text(json.dumps(results, indent=2))
    (out / "kv_quant.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
