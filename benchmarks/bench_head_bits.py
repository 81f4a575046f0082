"""The output head of a W4 model at 8 bits (default) and 4 bits (--head-bits 4): what it saves and costs.

    python benchmarks/bench_head_bits.py

W4 g64 RTN of the default model. For each head: weight bytes, decode batch 1 (128 new tokens
after a 128-token prompt, best of 3, the two heads in alternating rounds) and WikiText-2
perplexity (seqlen 512, 10 windows, through the engine). Writes benchmarks/results/head_bits.{json,md}.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import REPEATS, prompt_ids, run_requests  # noqa: E402
from benchmarks.soak import cpu_name, w4_model  # noqa: E402
from quantserve import kernels  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.text import Tokenizer  # noqa: E402

RESULTS = Path(__file__).with_name("results")
HEADS = (8, 4)


def perplexity(model: Path, head_bits: int) -> float:
    done = subprocess.run(["quantserve", "eval", "ppl", str(model), "--head-bits", str(head_bits), "--seqlen", "512",
                           "--max-windows", "10", "--json"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["ppl"]


def main() -> None:
    model = w4_model()
    tokenizer = Tokenizer(model).hf
    engines = {b: Engine(model, EngineConfig(session_len=1024, max_batch_size=1, head_bits=b), progress=False)
               for b in HEADS}
    best = {b: float("inf") for b in HEADS}
    for engine in engines.values():
        run_requests(engine, [prompt_ids(tokenizer, 128)], 8)                        # warm-up
    for _ in range(REPEATS):
        for b in HEADS:
            best[b] = min(best[b], run_requests(engines[b], [prompt_ids(tokenizer, 128)], 128)[1])
    rows = {b: {"weights_gb": engines[b].weights_bytes / 1e9, "decode_b1_tok_s": 127 / best[b],
                "ppl_wikitext2_512": perplexity(model, b)} for b in HEADS}
    base = rows[8]
    lines = [f"W4 g64 RTN SmolLM2-135M-Instruct, kernels {kernels.describe()}, {cpu_name()}.\n",
             "| head | weights | decode b=1 tok/s | vs 8-bit head | WikiText-2 ppl @512 (10 windows) | change |",
             "|---|---:|---:|---:|---:|---:|"]
    for b, r in rows.items():
        lines.append(f"| {b}-bit | {r['weights_gb'] * 1000:.0f} MB | {r['decode_b1_tok_s']:.1f} | "
                     f"**{r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f}x** | {r['ppl_wikitext2_512']:.3f} | "
                     f"{r['ppl_wikitext2_512'] / base['ppl_wikitext2_512'] - 1:+.2%} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "head_bits.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "head_bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
