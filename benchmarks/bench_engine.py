"""Engine throughput vs transformers, same model, same dtype, same machine, same run.

    python benchmarks/bench_engine.py                       # default model, all dtypes
    python benchmarks/bench_engine.py --dtypes float16 --concurrency 16

Measures (prompt 128 tokens, 128 new tokens, EOS ignored):
  - transformers generate() at batch 1: decode tokens/s
  - quantserve at batch 1: decode tokens/s
  - quantserve with N concurrent sequences: total decode tokens/s and end-to-end tokens/s
  - quantserve prefill tokens/s of a 512-token prompt
Each figure is the best of 3 runs (this machine's timings vary by ~10% run to run).
Writes benchmarks/results/engine.json, engine.md (the table for BENCHMARKS.md) and engine.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
        "exchange grain, salt and cloth. Over the centuries it grew into a centre of learning, with "
        "libraries, workshops and a university that drew students from across the continent. ")
RESULTS = Path(__file__).with_name("results")
REPEATS = 3     # every figure is the best of this many runs, for transformers and quantserve alike


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prompt_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(TEXT * (n // 20 + 2), add_special_tokens=False)
    return ids[offset:offset + n]


def hf_rates(model_dir: Path, dtype: str, prompt: list[int], new: int) -> tuple[float, float]:
    """transformers greedy generate() at batch 1: (decode-only rate, prefill excluded;
    generate() rate, new tokens / wall time of the whole call)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(4)
    runs = [(timed(new), timed(1)) for _ in range(REPEATS)]
    return max((new - 1) / (full - one) for full, one in runs), max(new / full for full, _ in runs)


def run_requests(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """-> (seconds until every request has its first token, seconds for the rest)."""
    params = SamplingParams(max_new_tokens=new)
    stamp = time.perf_counter_ns()
    reqs = [engine.add_request(f"b{stamp}-{i}", p, params) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    first = time.perf_counter()
    while engine.has_work:
        engine.step()
    return first - start, time.perf_counter() - first


def engine_rates(engine: Engine, tokenizer, repeats: int = REPEATS, streams: int = 16) -> dict:
    """Prefill of one 512-token prompt, decode at batch 1 (128 new tokens after 128) and `streams`
    prompts of 128 decoded together (total tokens/s of the decode phase), best of `repeats` each."""
    run_requests(engine, [prompt_ids(tokenizer, 128)], 8)                                          # warm-up
    decode1 = min(run_requests(engine, [prompt_ids(tokenizer, 128)], 128)[1] for _ in range(repeats))
    prefill512 = min(run_requests(engine, [prompt_ids(tokenizer, 512)], 1)[0] for _ in range(repeats))
    prompts = [prompt_ids(tokenizer, 128, offset=i) for i in range(streams)]
    decode_n = min(run_requests(engine, prompts, 128)[1] for _ in range(repeats))
    return {"decode_b1_tok_s": 127 / decode1, "prefill512_tok_s": 512 / prefill512,
            f"decode_{streams}_tok_s": streams * 127 / decode_n}


def bench_ours(model_dir: Path, dtype: str, tokenizer, args) -> dict:
    engine = Engine(model_dir, EngineConfig(dtype=dtype, session_len=2048, max_batch_size=max(16, args.concurrency)),
                    progress=False)
    new, plen = args.new_tokens, args.prompt_len
    run_requests(engine, [prompt_ids(tokenizer, plen)], 8)                        # warm-up
    decode1 = min(run_requests(engine, [prompt_ids(tokenizer, plen)], new)[1] for _ in range(REPEATS))
    prompts = [prompt_ids(tokenizer, plen, offset=i) for i in range(args.concurrency)]
    prefill_n, decode_n = min((run_requests(engine, prompts, new) for _ in range(REPEATS)), key=sum)
    prefill512 = min(run_requests(engine, [prompt_ids(tokenizer, 512)], 1)[0] for _ in range(REPEATS))
    n = args.concurrency
    return {
        "batch1_decode_tok_s": (new - 1) / decode1,
        "concurrent_decode_tok_s": n * (new - 1) / decode_n,
        "concurrent_e2e_tok_s": n * new / (prefill_n + decode_n),
        "prefill512_tok_s": 512 / prefill512,
        "weights_gb": engine.weights_bytes / 1e9,
    }


def markdown(results: dict, args) -> str:
    n = args.concurrency
    rows = ["| dtype | transformers b=1 decode | quantserve b=1 | ratio | quantserve " + f"{n} seqs total | ratio vs "
            "transformers b=1 decode | transformers generate() rate | ratio vs it | "
            f"quantserve {n} seqs e2e incl. prefill | prefill 512-token prompt |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, r in results.items():
        hf, gen, ours = r["transformers_b1_tok_s"], r["transformers_generate_tok_s"], r["quantserve"]
        rows.append(
            f"| {dtype} | {hf:.1f} tok/s | {ours['batch1_decode_tok_s']:.1f} tok/s | "
            f"**{ours['batch1_decode_tok_s'] / hf:.1f}x** | {ours['concurrent_decode_tok_s']:.1f} tok/s | "
            f"**{ours['concurrent_decode_tok_s'] / hf:.1f}x** | {gen:.1f} tok/s | "
            f"**{ours['concurrent_decode_tok_s'] / gen:.1f}x** | {ours['concurrent_e2e_tok_s']:.1f} tok/s | "
            f"{ours['prefill512_tok_s']:.0f} tok/s |")
    return "\n".join(rows) + "\n"


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(results)
    series = {"transformers b=1": [results[d]["transformers_b1_tok_s"] for d in dtypes],
              "quantserve b=1": [results[d]["quantserve"]["batch1_decode_tok_s"] for d in dtypes],
              f"quantserve {args.concurrency} seqs": [results[d]["quantserve"]["concurrent_decode_tok_s"] for d in dtypes]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar([x + i * width for x in range(len(dtypes))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width for x in range(len(dtypes))], dtypes)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"SmolLM2-135M-Instruct decode, {torch.get_num_threads()} CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    from transformers import AutoTokenizer

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    for dtype in args.dtypes.split(","):
        log(f"{dtype}: transformers generate() batch 1 ...")
        hf, hf_generate = hf_rates(model_dir, dtype, prompt_ids(tokenizer, args.prompt_len), args.new_tokens)
        log(f"{dtype}: transformers {hf:.1f} tok/s decode, {hf_generate:.1f} tok/s generate(); quantserve ...")
        ours = bench_ours(model_dir, dtype, tokenizer, args)
        log(f"{dtype}: quantserve {ours}")
        results[dtype] = {"transformers_b1_tok_s": hf, "transformers_generate_tok_s": hf_generate, "quantserve": ours}
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    (RESULTS / "engine.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (RESULTS / "engine.md").write_text(markdown(results, args))
    plot(results, args, RESULTS / "engine.png")
    print(markdown(results, args))


if __name__ == "__main__":
    main()
