"""The same engine on each kernel backend this CPU runs (avx512 / avx2 / torch), same run, same model.

    python benchmarks/bench_isa.py                  # W4 g64 RTN of the default model
    python benchmarks/bench_isa.py --model DIR      # any model directory

Each backend runs in its own process (QUANTSERVE_ISA=...), in rounds that alternate the backends
so that slow spells of the machine fall on all of them; each figure is the best of the rounds.
Measures prefill of a 512-token prompt, decode at batch 1 and 16 sequences decoded together
(128-token prompts, 128 new tokens, greedy, EOS ignored). That avx512 and avx2 agree to the
bit on integer weights is tests/test_isa.py's job. Writes benchmarks/results/isa.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.soak import cpu_name, w4_model  # noqa: E402
from quantserve import kernels  # noqa: E402

RESULTS = Path(__file__).with_name("results")
ONE_ROUND = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from benchmarks.bench_engine import engine_rates
from quantserve import kernels
from quantserve.config import EngineConfig
from quantserve.engine.engine import Engine
from quantserve.text import Tokenizer
engine = Engine({model!r}, EngineConfig(session_len=2048, max_batch_size=16), progress=False)
rates = engine_rates(engine, Tokenizer({model!r}).hf, repeats=1)
print(json.dumps({{"backend": kernels.backend(), **rates, "threads": torch.get_num_threads()}}))
"""


def one_round(backend: str, model: Path) -> dict:
    env = {**os.environ, "QUANTSERVE_ISA": backend}
    code = ONE_ROUND.format(root=str(Path(__file__).resolve().parents[1]), model=str(model))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def markdown(best: dict, cpu: str, model: str) -> str:
    base = best["avx2"]
    rows = [f"Model: `{model}`. CPU: {cpu}; every backend in the same run, best of the rounds.\n",
            "| backend | prefill 512 tok/s | vs avx2 | decode batch 1 tok/s | vs avx2 | 16 streams tok/s | vs avx2 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in best.items():
        cells = []
        for key in ("prefill512_tok_s", "decode_b1_tok_s", "decode_16_tok_s"):
            cells += [f"{r[key]:.1f}", f"**{r[key] / base[key]:.2f}x**"]
        rows.append(f"| {kernels.ISAS[name][2] if name in kernels.ISAS else name} ({name}) | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: W4 g64 RTN of the default model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=[b for b in ("avx512", "avx2") if kernels.runs_here(b)])
    args = p.parse_args()
    model = Path(args.model) if args.model else w4_model()
    runs: dict[str, list[dict]] = {b: [] for b in args.backends}
    for i in range(args.rounds):
        for backend in args.backends if i % 2 == 0 else args.backends[::-1]:     # alternate who goes first
            runs[backend].append(one_round(backend, model))
            print(f"[isa] round {i + 1} {backend}: {runs[backend][-1]}", file=sys.stderr, flush=True)
    best = {b: {k: max(r[k] for r in rs) for k in rs[0] if k.endswith("tok_s")} for b, rs in runs.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "isa.json").write_text(json.dumps({"cpu": cpu_name(), "model": str(model), "runs": runs,
                                                  "best": best}, indent=1) + "\n")
    (RESULTS / "isa.md").write_text(markdown(best, cpu_name(), model.name))
    print((RESULTS / "isa.md").read_text())


if __name__ == "__main__":
    main()
