"""quantserve vs llama.cpp (through llama-cpp-python) vs transformers, same model, same machine, same run.

    pip install llama-cpp-python              # optional: builds llama.cpp from source
    python benchmarks/bench_llamacpp.py       # default model; add --skip-serving for the engine only

Matched precisions on SmolLM2-135M-Instruct: quantserve float16 weights vs llama.cpp F16, our
W8 g64 vs Q8_0, our W4 g64 vs Q4_0 and Q4_1 (4-bit, groups of 32). The GGUF files are the shipped
Q4_1 file requantized by llama.cpp's own quantize API (allow_requantize) into F16, Q8_0 and Q4_0:
the same weights our float model holds, since it was converted from that Q4_1 file. Our integer
models come from `lite rtn` on it.

Engine (both sides greedy, EOS ignored, 2 threads, best of 3): decode at batch 1 (128-token
prompt, 128 new tokens), prefill of a 512-token prompt, and 16 sequences decoded together (total
tokens/s of the decode phase; llama.cpp: one llama_decode per step holding the 16 sequences).
transformers generate() at batch 1 at its faster dtype is the third baseline. Serving: 64
requests at concurrency 8, 128 in / 128 out, `quantserve bench serving` against our api_server
(W4 g64) and llama-cpp-python's OpenAI server (Q4_0). Memory: the machine's copy bandwidth next
to the bytes a batch-1 decode step reads.
Writes benchmarks/results/llamacpp.{json,md,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import REPEATS, hf_rates, log, prompt_ids, run_requests  # noqa: E402
from quantserve import envs  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import default_model_path  # noqa: E402

RESULTS = Path(__file__).with_name("results")
GGUF_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}        # llama.cpp's LLAMA_FTYPE_MOSTLY_*
PAIRS = [("float16", "F16"), ("W8 g64", "Q8_0"), ("W4 g64", "Q4_0"), ("W4 g64", "Q4_1")]
THREADS = 2


class LlamaCpp:
    """llama.cpp's C API through llama-cpp-python's ctypes bindings: no sampling chain, no
    Python per token beyond one llama_decode call and an argmax per sequence."""

    def __init__(self, path: Path, n_seq: int, n_ctx_per_seq: int = 768):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_seq * n_ctx_per_seq, 512, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, THREADS, THREADS
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, n_seq)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def _prefill(self, prompt: list[int], seq: int) -> int:
        for start in range(0, len(prompt), 512):
            chunk = prompt[start:start + 512]
            last = start + len(chunk) == len(prompt)
            self._decode([(t, start + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        return self._argmax(-1)

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        """-> (seconds until every sequence has its first token, seconds for the rest)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        tokens = [self._prefill(p, s) for s, p in enumerate(prompts)]
        first = time.perf_counter()
        positions = [len(p) for p in prompts]
        for _ in range(new - 1):
            self._decode([(t, positions[s], s, True) for s, t in enumerate(tokens)])
            tokens = [self._argmax(i) for i in range(len(prompts))]
            positions = [p + 1 for p in positions]
        return first - start, time.perf_counter() - first


def make_gguf(source: Path, kind: str, out_dir: Path) -> Path:
    """The shipped Q4_1 file requantized by llama.cpp into `kind` (once)."""
    import llama_cpp as lc

    target = out_dir / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if kind == "Q4_1":
        return source
    if not target.exists():
        params = lc.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = GGUF_TYPES[kind], True, THREADS
        if lc.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return target


def engine_rates(run, tokenizer, new: int, concurrency: int) -> dict:
    """Best of REPEATS for each workload; `run(prompts, new) -> (prefill_s, decode_s)`."""
    run([prompt_ids(tokenizer, 128)], 8)                                              # warm-up
    decode1 = min(run([prompt_ids(tokenizer, 128)], new)[1] for _ in range(REPEATS))
    prefill512 = min(run([prompt_ids(tokenizer, 512)], 1)[0] for _ in range(REPEATS))
    prompts = [prompt_ids(tokenizer, 128, offset=i) for i in range(concurrency)]
    decode_n = min(run(prompts, new)[1] for _ in range(REPEATS))
    return {"decode_b1_tok_s": (new - 1) / decode1, "prefill512_tok_s": 512 / prefill512,
            f"decode_{concurrency}seq_tok_s": concurrency * (new - 1) / decode_n}


def our_models(model_dir: Path, work: Path) -> dict[str, Path]:
    from quantserve.quant.primitives import QuantSpec
    from quantserve.quant.run import LiteJob, run

    models = {"float16": model_dir}
    for name, bits in (("W8 g64", 8), ("W4 g64", 4)):
        out = work / f"rtn-w{bits}g64"
        if not out.exists():
            run(LiteJob(str(model_dir), str(out), "rtn", QuantSpec(bits, 64), progress=False))
        models[name] = out
    return models


def bench_ours(path: Path, tokenizer, args) -> dict:
    engine = Engine(path, EngineConfig(dtype="float16", session_len=1024, max_batch_size=max(16, args.concurrency),
                                       num_threads=THREADS), progress=False)
    rates = engine_rates(lambda prompts, new: run_requests(engine, prompts, new), tokenizer, args.new_tokens,
                         args.concurrency)
    step_bytes = engine.weights_bytes                       # a batch-1 step reads every weight once
    return {**rates, "weights_gb": step_bytes / 1e9, "step_gb_s": step_bytes / 1e9 * rates["decode_b1_tok_s"]}


def bench_llamacpp(path: Path, tokenizer, args) -> dict:
    single, multi = LlamaCpp(path, 1), LlamaCpp(path, args.concurrency)
    try:
        rates = engine_rates(lambda prompts, new: (single if len(prompts) == 1 else multi).run(prompts, new),
                             tokenizer, args.new_tokens, args.concurrency)
    finally:
        single.close()
        multi.close()
    size = path.stat().st_size
    return {**rates, "weights_gb": size / 1e9, "step_gb_s": size / 1e9 * rates["decode_b1_tok_s"]}


def copy_bandwidth() -> float:
    """STREAM-style copy: (bytes read + bytes written) / s, 256 MB arrays, best of 5."""
    src, dst = torch.ones(64 * 2 ** 20), torch.empty(64 * 2 ** 20)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_measure(command: list[str], port: int, tokenizer_dir: Path, args) -> dict:
    from quantserve.bench.serving import ServingConfig, run
    from quantserve.bench.workload import synthetic
    from quantserve.text import Tokenizer

    log_file = open(RESULTS / f"server-{port}.log", "w")
    proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        requests = synthetic(Tokenizer(tokenizer_dir).hf, args.serving_prompts, 128, 128, seed=1)
        asyncio.run(run(ServingConfig(url, concurrency=8), requests[:8], progress=False))       # warm-up
        return asyncio.run(run(ServingConfig(url, concurrency=8), requests, progress=True))
    finally:
        proc.terminate()
        proc.wait(30)
        log_file.close()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see benchmarks/results/server-*.log")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def serving(models: dict[str, Path], ggufs: dict[str, Path], model_dir: Path, args) -> dict:
    port = free_port()
    ours = serve_and_measure([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server",
                              str(models["W4 g64"]), "--server-port", str(port), "--server-name", "127.0.0.1",
                              "--num-threads", str(THREADS), "--max-batch-size", "16"], port, model_dir, args)
    port = free_port()
    theirs = serve_and_measure([sys.executable, "-m", "llama_cpp.server", "--model", str(ggufs["Q4_0"]),
                                "--n_threads", str(THREADS), "--n_ctx", "4096", "--port", str(port),
                                "--host", "127.0.0.1", "--interrupt_requests", "False"], port, model_dir, args)
    return {"quantserve W4 g64": ours, "llama.cpp Q4_0 (llama-cpp-python server)": theirs}


def ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}x**"


def markdown(engine: dict, hf: dict, serve: dict | None, bandwidth: float, n: int) -> str:
    key = f"decode_{n}seq_tok_s"
    rows = ["| quantserve | llama.cpp | decode b=1 (ours / theirs) | ratio | prefill 512 (ours / theirs) | ratio | "
            f"{n} seqs decode (ours / theirs) | ratio | step reads (ours / theirs) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ours_name, theirs_name in PAIRS:
        o, t = engine["quantserve"][ours_name], engine["llama.cpp"][theirs_name]
        rows.append(f"| {ours_name} | {theirs_name} | {o['decode_b1_tok_s']:.1f} / {t['decode_b1_tok_s']:.1f} | "
                    f"{ratio(o['decode_b1_tok_s'], t['decode_b1_tok_s'])} | {o['prefill512_tok_s']:.0f} / "
                    f"{t['prefill512_tok_s']:.0f} | {ratio(o['prefill512_tok_s'], t['prefill512_tok_s'])} | "
                    f"{o[key]:.1f} / {t[key]:.1f} | {ratio(o[key], t[key])} | "
                    f"{o['step_gb_s']:.1f} / {t['step_gb_s']:.1f} GB/s |")
    best_hf = max(hf.values())
    w4 = engine["quantserve"]["W4 g64"]["decode_b1_tok_s"]
    lines = ["\n".join(rows), "",
             f"transformers generate() at batch 1 (its faster dtype, {max(hf, key=hf.get)}): {best_hf:.1f} tok/s; "
             f"quantserve W4 g64 at batch 1: {w4:.1f} tok/s = {ratio(w4, best_hf)}.",
             f"Copy bandwidth of this machine (read + write): {bandwidth:.1f} GB/s."]
    if serve:
        (ours_name, o), (theirs_name, t) = serve.items()
        lines += ["", "| server | requests/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | failed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in serve.items():
            lines.append(f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                         f"{r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['p50']:.1f} | "
                         f"{r['failed']} |")
        lines.append(f"\nrequests/s {ratio(o['requests_per_s'], t['requests_per_s'])}; p50 TTFT "
                     f"{o['ttft_ms']['p50']:.0f} ms vs {t['ttft_ms']['p50']:.0f} ms.")
    return "\n".join(lines) + "\n"


def plot(engine: dict, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("decode_b1_tok_s", "decode, batch 1"), ("prefill512_tok_s", "prefill, 512-token prompt"),
               (f"decode_{n}seq_tok_s", f"decode, {n} sequences (total)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [f"{o}\nvs {t}" for o, t in PAIRS]
    x = np.arange(len(PAIRS))
    for ax, (key, title) in zip(axes, metrics):
        ours = [engine["quantserve"][o][key] for o, _ in PAIRS]
        theirs = [engine["llama.cpp"][t][key] for _, t in PAIRS]
        ax.bar_label(ax.bar(x - 0.2, ours, 0.4, label="quantserve"), fmt="%.0f", fontsize=7)
        ax.bar_label(ax.bar(x + 0.2, theirs, 0.4, label="llama.cpp"), fmt="%.0f", fontsize=7)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, {THREADS} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--serving-prompts", type=int, default=64)
    p.add_argument("--skip-serving", action="store_true")
    args = p.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(THREADS)
    model_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    work = envs.quantserve_home() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    source = envs.quantserve_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ggufs = {kind: make_gguf(source, kind, work) for kind in GGUF_TYPES}
    models = our_models(model_dir, work)
    engine = {"quantserve": {}, "llama.cpp": {}}
    for name, path in models.items():
        log(f"quantserve {name} ...")
        engine["quantserve"][name] = bench_ours(path, tokenizer, args)
    for kind, path in ggufs.items():
        log(f"llama.cpp {kind} ...")
        engine["llama.cpp"][kind] = bench_llamacpp(path, tokenizer, args)
    hf = {}
    for dtype in ("float32", "bfloat16"):
        log(f"transformers {dtype} ...")
        hf[dtype] = hf_rates(model_dir, dtype, prompt_ids(tokenizer, 128), args.new_tokens)[1]
    serve = None if args.skip_serving else serving(models, ggufs, model_dir, args)
    bandwidth = copy_bandwidth()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp.json").write_text(json.dumps(
        {"engine": engine, "transformers_generate_b1": hf, "serving": serve, "copy_gb_s": bandwidth,
         "args": vars(args)}, indent=2))
    text = markdown(engine, hf, serve, bandwidth, args.concurrency)
    (RESULTS / "llamacpp.md").write_text(text)
    plot(engine, args.concurrency, RESULTS / "llamacpp.png")
    print(text)


if __name__ == "__main__":
    main()
