"""Integer-weight inference vs the bfloat16 model: decode tokens/s and memory, same run.

    python benchmarks/bench_weight_quant.py            # default model: bf16, W8 g64, W4 g64, W4 g32 (576 = 4.5 x 128)

Each quantized model is made here with `lite rtn` (speed and memory do not depend on how the
codes were chosen). Prompt 128 tokens, 128 new tokens, EOS ignored; batch 1 and 16 concurrent
sequences; best of 3. Writes benchmarks/results/weight_quant.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.quant.primitives import QuantSpec  # noqa: E402
from quantserve.quant.run import LiteJob, run  # noqa: E402

RESULTS = Path(__file__).with_name("results")
REPEATS = 3


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def decode_rate(engine: Engine, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Decode tokens/s with `batch` sequences (prefill excluded), best of REPEATS."""
    best = 0.0
    for r in range(REPEATS):
        params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=())
        for i in range(batch):
            engine.add_request(f"r{r}-{i}", [(7 * i + t) % 1000 + 10 for t in range(prompt_len)], params)
        while any(len(req.output_token_ids) == 0 for req in engine.requests.values()):
            engine.step()
        start, produced = time.perf_counter(), 0
        while engine.has_work:
            produced += len(engine.step())
        best = max(best, produced / (time.perf_counter() - start))
    return best


def measure(path: Path, dtype: str, args) -> dict:
    engine = Engine(path, EngineConfig(dtype=dtype, cache_max_tokens=32768, max_batch_size=16), progress=False)
    row = {"weights_gb": engine.weights_bytes / 1e9,
           "fused": engine.model.fused is not None,
           "decode_b1": decode_rate(engine, 1, args.prompt_len, args.new_tokens),
           f"decode_b{args.concurrency}": decode_rate(engine, args.concurrency, args.prompt_len, args.new_tokens)}
    del engine
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = resolve_model(args.model)
    rows = {}
    log("bfloat16 model")
    rows["bf16"] = measure(model, "bfloat16", args)
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in ((8, 64), (4, 64), (4, 32)):
            name = f"W{bits} g{group}"
            log(f"{name}: quantizing (RTN) and measuring")
            out = Path(tmp) / name.replace(" ", "_")
            run(LiteJob(str(model), str(out), "rtn", QuantSpec(bits, group), progress=False))
            rows[name] = measure(out, "bfloat16", args)
    write(rows, args)


def write(rows: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "weight_quant.json").write_text(json.dumps(rows, indent=2))
    base = rows["bf16"]
    b = f"decode_b{args.concurrency}"
    lines = ["| weights | memory (GB) | vs bf16 | decode b=1 (tok/s) | vs bf16 | "
             f"decode {args.concurrency} seqs (tok/s) | vs bf16 | fused decode |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['weights_gb']:.3f} | {r['weights_gb'] / base['weights_gb']:.0%} | "
                     f"{r['decode_b1']:.1f} | {r['decode_b1'] / base['decode_b1']:.2f}x | {r[b]:.1f} | "
                     f"{r[b] / base[b]:.2f}x | {'yes' if r['fused'] else 'no'} |")
    (RESULTS / "weight_quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
