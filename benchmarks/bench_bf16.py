"""GEMM speed of the bf16-pair kernels (wtype 3, vdpbf16ps) against today's float paths and torch.

    python benchmarks/bench_bf16.py                 # 2 threads, best of 7 rounds
    python benchmarks/bench_bf16.py --repeats 9 --threads 1

On the linears of SmolLM2-135M (hidden 576, intermediate 1536) and Qwen2.5-0.5B (hidden 896,
intermediate 4864, q/k/v 1152), random weights, M = 512 rows (a prefill) and M = 1 (a decode GEMV):
- pairs (w3): bf16 weights x bf16-rounded activations, fp32 sums (the rounding of x is timed);
- bf16 (w1): bf16 weights, fp32 activations, fp32 FMA (the float path before wtype 3);
- fp16 (w2): float16 weights, fp32 activations, fp32 FMA;
- fp32 (w0): fp32 weights and activations;
- torch bf16 / torch fp32: F.linear on bf16 (x already bf16, bf16 out) / fp32 tensors.
Each repeat is a round over every shape and method, so slow spells of a shared machine fall on all
of them; each figure is the best round, a round timing enough calls of each to last ~20 ms. GFLOP/s =
2 M N K / time. Writes benchmarks/results/bf16.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.soak import cpu_name  # noqa: E402
from quantserve import kernels  # noqa: E402
from quantserve.kernels import bf16  # noqa: E402

RESULTS = Path(__file__).with_name("results")
# model: {linear: (K, N)}
SHAPES = {
    "SmolLM2-135M": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
    "Qwen2.5-0.5B": {"qkv": (896, 1152), "o": (896, 896), "gate_up": (896, 9728), "down": (4864, 896)},
}
METHODS = ("pairs (w3)", "bf16 (w1)", "fp16 (w2)", "fp32 (w0)", "torch bf16", "torch fp32")


def native(lib, x: torch.Tensor, packed: torch.Tensor, wtype: int, n: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n)
    lib.qs_linear(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), wtype, None, y.data_ptr(), n,
                  torch.get_num_threads())
    return y


def calls(lib, x: torch.Tensor, w: torch.Tensor) -> dict:
    """Each method's zero-argument call on x [M, K] and w [N, K]."""
    n = w.shape[0]
    xb, wb = x.bfloat16(), w.bfloat16()
    fns = {"bf16 (w1)": lambda p=kernels.pack_weight(wb): native(lib, x, p, 1, n),
           "fp16 (w2)": lambda p=kernels.pack_weight(w.half()): native(lib, x, p, 2, n),
           "fp32 (w0)": lambda p=kernels.pack_weight(w): native(lib, x, p, 0, n),
           "torch bf16": lambda: F.linear(xb, wb), "torch fp32": lambda: F.linear(x, w)}
    if bf16.available(lib):
        fns["pairs (w3)"] = lambda p=bf16.pack_pairs(w): bf16.linear(lib, x, p, n, None)
    return fns


def timed(fn, seconds: float = 0.02) -> float:
    """Seconds per call, over enough calls to last about `seconds`."""
    fn()
    start, count = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return elapsed / count


def measure(lib, ms: list[int], repeats: int) -> list[dict]:
    """Best seconds per call of every method on every shape. Each repeat is one round over all of
    them, so a slow spell of the machine spoils one round of each, not every round of one."""
    cases = []
    for model, linears in SHAPES.items():
        for name, (k, n) in linears.items():
            w = torch.randn(n, k)
            for m in ms:
                cases.append(dict(model=model, linear=name, m=m, k=k, n=n, fns=calls(lib, torch.randn(m, k), w)))
    for case in cases:
        case["seconds"] = {meth: float("inf") for meth in case["fns"]}
    for r in range(repeats):
        for case in cases:
            for meth, fn in case["fns"].items():
                case["seconds"][meth] = min(case["seconds"][meth], timed(fn))
        print(f"[bf16] round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    rows = [{key: v for key, v in case.items() if key != "fns"} for case in cases]
    for r in rows:
        r["gflops"] = {meth: 2 * r["m"] * r["n"] * r["k"] / t / 1e9 for meth, t in r["seconds"].items()}
    return sorted(rows, key=lambda r: ms.index(r["m"]))


def table(rows: list[dict]) -> str:
    head = "| model | linear | M | K x N | " + " | ".join(METHODS) + " | w3 / w1 |"
    lines = [head, "|" + "---|" * 4 + "---:|" * (len(METHODS) + 1)]
    for r in rows:
        g = r["gflops"]
        cells = [f"{g[name]:.0f}" if name in g else "-" for name in METHODS]
        ratio = f"**{g['pairs (w3)'] / g['bf16 (w1)']:.2f}x**" if "pairs (w3)" in g else "-"
        lines.append(f"| {r['model']} | {r['linear']} | {r['m']} | {r['k']} x {r['n']} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--m", type=int, nargs="+", default=[512, 1], help="rows of x")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lib = kernels.cpu()
    if lib is None:
        sys.exit("no native kernels here (torch backend): nothing to compare")
    if not bf16.available(lib):
        print(f"[bf16] {kernels.describe()}: no bf16-pair kernels (needs the avx512 build and avx512_bf16)",
              file=sys.stderr)
    rows = measure(lib, args.m, args.repeats)
    text = table(rows)
    header = (f"CPU: {cpu_name()}; kernels: {kernels.describe()}; {args.threads} threads; GFLOP/s, best of "
              f"{args.repeats} rounds\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bf16.json").write_text(json.dumps({"cpu": cpu_name(), "kernels": kernels.describe(),
                                                   "threads": args.threads, "repeats": args.repeats,
                                                   "rows": rows}, indent=1) + "\n")
    print(header + "\n" + text)


if __name__ == "__main__":
    main()
