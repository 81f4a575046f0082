"""Prefill attention: the native flash kernel (kernels/flash.py) vs torch's fused SDPA.

    python benchmarks/bench_attention.py                 # the process's kernel build, 2 threads
    python benchmarks/bench_attention.py --isa avx2 --repeats 7

Shapes of SmolLM2-135M (9 query / 3 KV heads) and Qwen2.5-0.5B (14 / 2), head_dim 64, N = 512,
1024, 2048 new tokens with no past, float32 and bfloat16 caches (block size 16, shuffled
blocks); plus N = 512 after 1536 cached tokens. The kernel reads the paged cache in place; torch
gets its best case, F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on
contiguous float32 [1, H, S, D] tensors holding the same values (a bf16 cache is widened before
timing, not during). With a past, is_causal cannot say where the diagonal sits, so SDPA gets an
explicit boolean mask, and quantserve's blocked-matmul `causal_attention` (today's path for a
prefill with a past) is timed too. Calls alternate between the two sides in rounds so that slow
spells of a shared machine fall on both; each figure is the best of the rounds.
Writes benchmarks/results/attention.json.
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
from quantserve.kernels.flash import prefill_attention  # noqa: E402
from quantserve.kvcache.paged import causal_attention  # noqa: E402

RESULTS = Path(__file__).with_name("results")
SHAPES = {"SmolLM2-135M": (9, 3, 64), "Qwen2.5-0.5B": (14, 2, 64)}
BLOCK = 16


def log(msg: str) -> None:
    print(f"[attention] {msg}", file=sys.stderr, flush=True)


def paged(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[S, Hkv, D] -> (k cache, v cache) [blocks, BLOCK, Hkv, D] in shuffled blocks, block ids."""
    s, hkv, d = k.shape
    nblocks = -(-s // BLOCK)
    ids = torch.randperm(nblocks)
    caches = []
    for x in (k, v):
        cache = torch.zeros(nblocks, BLOCK, hkv, d, dtype=dtype)
        cache.view(-1, hkv, d)[(ids[torch.arange(s) // BLOCK] * BLOCK + torch.arange(s) % BLOCK)] = x.to(dtype)
        caches.append(cache)
    return caches[0], caches[1], ids


def best_of(fns: dict, rounds: int) -> dict:
    """Milliseconds, best of `rounds`, the functions taking turns (one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def one_case(lib, model: str, n: int, past: int, dtype: torch.dtype, rounds: int) -> dict:
    hq, hkv, d = SHAPES[model]
    s, scale = past + n, d ** -0.5
    q, k, v = torch.randn(n, hq, d), torch.randn(s, hkv, d), torch.randn(s, hkv, d)
    kc, vc, ids = paged(k, v, dtype)
    k, v = k.to(dtype).float(), v.to(dtype).float()          # the values the cache holds
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))     # [1, H, S, D]
    mask = torch.ones(n, s, dtype=torch.bool).tril_(past) if past else None
    fns = {"kernel": lambda: prefill_attention(lib, q, (kc,), (vc,), ids, s, scale),
           "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=not past,
                                                          scale=scale, enable_gqa=True)}
    if past:
        fns["blocked"] = lambda: causal_attention(q, k, v, scale)
    ms = best_of(fns, rounds)
    expected = fns["sdpa"]()[0].transpose(0, 1)
    err = (fns["kernel"]() - expected).abs().max().item()
    row = {"model": model, "Hq": hq, "Hkv": hkv, "D": d, "N": n, "past": past, "cache": str(dtype)[6:],
           "kernel_ms": ms["kernel"], "sdpa_ms": ms["sdpa"], "speedup": ms["sdpa"] / ms["kernel"],
           "max_abs_diff": err}
    if past:
        row["blocked_ms"] = ms["blocked"]
    log(json.dumps(row))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | N | past | cache | kernel ms | torch SDPA ms | speedup |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        extra = f" (blocked matmuls {r['blocked_ms']:.2f} ms)" if "blocked_ms" in r else ""
        lines.append(f"| {r['model']} ({r['Hq']}/{r['Hkv']}, D {r['D']}) | {r['N']} | {r['past']} | {r['cache']} | "
                     f"{r['kernel_ms']:.2f} | {r['sdpa_ms']:.2f}{extra} | **{r['speedup']:.2f}x** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", default=None, choices=list(kernels.ISAS), help="kernel build (default: the process's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each figure is the best of them")
    args = p.parse_args()
    isa = args.isa or kernels.backend()
    if isa not in kernels.ISAS or not kernels.runs_here(isa) or kernels.load(isa) is None:
        sys.exit(f"no native kernel build {isa!r} on this machine")
    lib = kernels.load(isa)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [(m, n, 0, dt) for m in SHAPES for dt in (torch.float32, torch.bfloat16) for n in (512, 1024, 2048)]
    cases += [(m, 512, 1536, dt) for m in SHAPES for dt in (torch.float32, torch.bfloat16)]
    rows = [one_case(lib, m, n, past, dt, args.repeats) for m, n, past, dt in cases]
    build = f"{isa} ({kernels.ISAS[isa][2]})"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attention.json").write_text(json.dumps(
        {"cpu": cpu_name(), "kernels": build, "threads": args.threads, "repeats": args.repeats,
         "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"CPU: {cpu_name()}; kernels: {build}; {args.threads} threads, best of {args.repeats}.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
