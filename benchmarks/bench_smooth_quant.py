"""SmoothQuant W8A8 against W8 round-to-nearest and the float model: perplexity and speed.

    python benchmarks/bench_smooth_quant.py [--windows 10]

On the default model (SmolLM2-135M-Instruct, float16): the float model; `-q w8a8` (int8 per output
channel, rounded to nearest at load, no calibration); `lite smooth_quant` (alpha 0.5, calibrated on
PTB, 128 x 512 tokens). The two int8 models run on the same integer kernels (activations int8 per
row in blocks of 32). Perplexity: WikiText-2 test, the first --windows windows of 2048 tokens.
Speed: prefill of one 512-token prompt, decode at batch 1 and 16 (128 new tokens), best of 2.
Writes benchmarks/results/smooth_quant.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import prompt_ids, run_requests  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.bench.perplexity import dataset_text, perplexity  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.lite import smooth_quant  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.text import Tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def measure(model_dir: Path, quantization: str | None, windows: int, tokenizer) -> dict:
    config = dict(max_prefill_token_num=2048, session_len=2049, max_batch_size=16, quantization=quantization)
    engine = Engine(model_dir, EngineConfig(**config), progress=False)
    result = perplexity(engine, dataset_text("wikitext2"), tokenizer, 2048, windows)
    prefill = min(sum(run_requests(engine, [prompt_ids(tokenizer, 512)], 1)) for _ in range(2))
    speeds = {"prefill_512": 512 / prefill, "weights_mb": engine.weights_bytes / 1e6}
    for n in (1, 16):
        prompts = [prompt_ids(tokenizer, 128, offset=i) for i in range(n)]
        run_requests(engine, prompts, 4)
        _, t = min(run_requests(engine, prompts, 128) for _ in range(2))
        speeds[f"decode_b{n}"] = n * 127 / t
    return {"ppl": result.ppl, "tokens": result.tokens, **speeds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=10)
    args = p.parse_args()
    model = resolve_model(None)
    tokenizer = Tokenizer(model).hf
    with tempfile.TemporaryDirectory() as tmp:
        log("lite smooth_quant (PTB, 128 x 512) ...")
        log(smooth_quant(str(model), f"{tmp}/w8a8", "ptb", 128, 512, 4, progress=False))
        runs = {"float16": (model, None), "W8 RTN (-q w8a8)": (model, "w8a8"),
                "SmoothQuant W8A8": (Path(tmp) / "w8a8", None)}
        results = {}
        for name, (path, quantization) in runs.items():
            log(f"{name} ...")
            results[name] = measure(path, quantization, args.windows, tokenizer)
            log(f"{name}: {results[name]}")
    base = results["float16"]
    rows = ["| model | WikiText-2 ppl | vs float16 | weights | prefill 512 | decode b=1 | decode 16 seqs |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['weights_mb']:.0f} MB | "
                    f"{r['prefill_512']:.0f} tok/s ({r['prefill_512'] / base['prefill_512']:.2f}x) | "
                    f"{r['decode_b1']:.1f} tok/s ({r['decode_b1'] / base['decode_b1']:.2f}x) | "
                    f"{r['decode_b16']:.1f} tok/s ({r['decode_b16'] / base['decode_b16']:.2f}x) |")
    md = (f"SmolLM2-135M-Instruct; {base['tokens']:,} WikiText-2 tokens scored ({args.windows} windows x 2048); "
          f"machine {cpu_name()}, 2 threads, one run.\n\n" + "\n".join(rows) + "\n")
    out = Path(__file__).with_name("results")
    (out / "smooth_quant.json").write_text(json.dumps(results, indent=2))
    (out / "smooth_quant.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
