"""quantserve vs llama.cpp's own tools, built natively on this machine, same model, same run.

    ../shared/tools/llamacpp.sh                 # builds llama-bench & co. once (about 8 minutes)
    python benchmarks/bench_llamacpp.py         # default model; --skip-serving for the engine only

llama.cpp is its own C++ tools (`llama-bench`, `llama-batched-bench`, `llama-server`,
`llama-quantize`), compiled with GGML_NATIVE, so it uses every instruction set this CPU has
(AVX-512, VNNI, BF16 where present). Its F16 / BF16 / Q8_0 / Q4_0 files are the shipped Q4_1 GGUF
requantized by `llama-quantize --allow-requantize`: the same weights our float model holds, since
that was converted from the same file. Ours: float16, bfloat16 (`--dtype bfloat16`: vdpbf16ps where
the CPU has it), and `lite rtn` W8 / W4 group 64 (int8
output head), on the kernel backend chosen at load (its ISA is named in the results).

Both sides 2 threads, greedy, best of 3:
- decode batch 1: `llama-bench -n 128` (tg128); ours 128 new tokens after a 128-token prompt;
- prefill: `llama-bench -p 512` (pp512); ours one 512-token prompt;
- 16 streams: `llama-batched-bench -npp 128 -ntg 128 -npl 16` (its S_TG, total generation
  tokens/s); ours 16 prompts of 128 decoded together, total tokens/s of the decode phase;
- serving: 64 requests, 128 in / 128 out, concurrency 16, `quantserve bench serving` against our
  api_server (W4 g64) and the C++ `llama-server -np 16` (Q4_0, 16 parallel slots).
Writes benchmarks/results/llamacpp.{json,md,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import REPEATS, engine_rates, log  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve import envs, kernels  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import default_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
PAIRS = [("float16", "F16"), ("bfloat16", "BF16"), ("W8 g64", "Q8_0"), ("W4 g64", "Q4_0")]
THREADS = 2
STREAMS = 16


def tool(name: str) -> str:
    """Path of one of llama.cpp's tools, built once by ../shared/tools/llamacpp.sh."""
    script = ROOT.parent / "shared" / "tools" / "llamacpp.sh"
    return subprocess.run(["bash", str(script), name], check=True, capture_output=True, text=True).stdout.strip()


def make_gguf(source: Path, kind: str, out_dir: Path) -> Path:
    """The shipped Q4_1 file requantized by llama-quantize into `kind` (once)."""
    target = out_dir / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not target.exists():
        subprocess.run([tool("llama-quantize"), "--allow-requantize", str(source), str(target), kind, str(THREADS)],
                       check=True, capture_output=True)
    return target


def llamacpp_isa() -> str:
    """What the native build really uses: the instructions found in its CPU backend library."""
    lib = Path(tool("llama-bench")).parent / "libggml-cpu.so"
    text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
    used = [name for name, insn in (("AVX-512 (zmm)", "zmm"), ("VNNI (vpdpbusd)", "vpdpbusd"),
                                    ("BF16 (vdpbf16ps)", "vdpbf16ps")) if insn in text]
    return f"GGML_NATIVE build (-march=native), libggml-cpu uses {', '.join(used) or 'no AVX-512'}"


def llama_bench(gguf: Path) -> tuple[dict, dict]:
    """pp512 and tg128, best of 3 repetitions; and llama.cpp's own view of the build."""
    out = subprocess.run([tool("llama-bench"), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(THREADS),
                          "-r", str(REPEATS), "-o", "json"], check=True, capture_output=True, text=True).stdout
    tests = json.loads(out)
    best = {("prefill512_tok_s" if t["n_prompt"] else "decode_b1_tok_s"): max(t["samples_ts"]) for t in tests}
    info = {k: tests[0].get(k) for k in ("cpu_info", "backends", "build_commit", "type_k")}
    return best, info


def batched(gguf: Path) -> float:
    """llama-batched-bench's S_TG (total generation tokens/s) for 16 streams, best of 3."""
    cmd = [tool("llama-batched-bench"), "-m", str(gguf), "-c", str(STREAMS * 256 + 256), "-b", "2048", "-ub", "512",
           "-npp", "128", "-ntg", "128", "-npl", str(STREAMS), "-t", str(THREADS), "-tb", str(THREADS)]
    best = 0.0
    for _ in range(REPEATS):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = next(line for line in out.splitlines() if re.match(rf"\|\s+128 \|\s+128 \|\s+{STREAMS} \|", line))
        cells = [c.strip() for c in row.strip("|").split("|")]
        best = max(best, float(cells[7]))                                 # PP TG B N_KV T_PP S_PP T_TG S_TG T S
    return best


def our_models(model_dir: Path, work: Path) -> dict[str, Path]:
    from quantserve.quant.primitives import QuantSpec
    from quantserve.quant.run import LiteJob, run

    models = {"float16": model_dir, "bfloat16": model_dir}
    for name, bits in (("W8 g64", 8), ("W4 g64", 4)):
        out = work / f"rtn-w{bits}g64"
        if not out.exists():
            run(LiteJob(str(model_dir), str(out), "rtn", QuantSpec(bits, 64), progress=False))
        models[name] = out
    return models


def bench_ours(path: Path, tokenizer, dtype: str) -> dict:
    engine = Engine(path, EngineConfig(dtype=dtype, session_len=1024, max_batch_size=STREAMS,
                                       num_threads=THREADS), progress=False)
    rates = engine_rates(engine, tokenizer)
    step = engine.weights_bytes                          # a batch-1 step reads every weight once
    return {**rates, "weights_gb": step / 1e9, "step_gb_s": step / 1e9 * rates["decode_b1_tok_s"]}


def bench_theirs(gguf: Path) -> tuple[dict, dict]:
    rates, info = llama_bench(gguf)
    size = gguf.stat().st_size
    rates.update(decode_16_tok_s=batched(gguf), weights_gb=size / 1e9, step_gb_s=size / 1e9 * rates["decode_b1_tok_s"])
    return rates, info


def read_bandwidth() -> float:
    """GB/s of a sum over a 512 MB array (read only), best of 5: what a decode step can stream."""
    src = torch.ones(128 * 2 ** 20)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def serve_and_measure(command: list[str], port: int, tokenizer_dir: Path, prompts: int) -> dict:
    from quantserve.bench.serving import ServingConfig, run
    from quantserve.bench.workload import synthetic
    from quantserve.text import Tokenizer

    log_file = open(RESULTS / f"server-{port}.log", "w")
    proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        requests = synthetic(Tokenizer(tokenizer_dir).hf, prompts, 128, 128, seed=1)
        asyncio.run(run(ServingConfig(url, concurrency=STREAMS), requests[:STREAMS], progress=False))   # warm-up
        return asyncio.run(run(ServingConfig(url, concurrency=STREAMS), requests, progress=True))
    finally:
        proc.terminate()
        proc.wait(30)
        log_file.close()


def serving(models: dict[str, Path], ggufs: dict[str, Path], model_dir: Path, prompts: int) -> dict:
    port = free_port()
    ours = serve_and_measure([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server",
                              str(models["W4 g64"]), "--server-port", str(port), "--server-name", "127.0.0.1",
                              "--num-threads", str(THREADS), "--max-batch-size", str(STREAMS)], port, model_dir, prompts)
    port = free_port()
    theirs = serve_and_measure([tool("llama-server"), "-m", str(ggufs["Q4_0"]), "-t", str(THREADS), "-np", str(STREAMS),
                                "-c", str(STREAMS * 512), "--port", str(port), "--host", "127.0.0.1"],
                               port, model_dir, prompts)
    return {"quantserve W4 g64": ours, f"llama-server -np {STREAMS}, Q4_0": theirs}


def ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}x**"


def markdown(engine: dict, serve: dict | None, sides: dict, bandwidth: float) -> str:
    rows = [f"quantserve: {sides['quantserve']}. llama.cpp: {sides['llama.cpp']}.", "",
            "| quantserve | llama.cpp | decode b=1 (ours / theirs) | ratio | prefill 512 (ours / theirs) | ratio | "
            f"{STREAMS} streams (ours / theirs) | ratio | step reads (ours / theirs) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ours_name, theirs_name in PAIRS:
        o, t = engine["quantserve"][ours_name], engine["llama.cpp"][theirs_name]
        cells = [f"{o[k]:.1f} / {t[k]:.1f} | {ratio(o[k], t[k])}"
                 for k in ("decode_b1_tok_s", "prefill512_tok_s", "decode_16_tok_s")]
        rows.append(f"| {ours_name} | {theirs_name} | " + " | ".join(cells) +
                    f" | {o['step_gb_s']:.1f} / {t['step_gb_s']:.1f} GB/s |")
    rows += ["", f"Read bandwidth of this machine (a sum over 512 MB, 2 threads): {bandwidth:.1f} GB/s."]
    if serve:
        (_, o), (_, t) = serve.items()
        rows += ["", "| server | requests/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | failed |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        rows += [f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms']['p50']:.0f} | "
                 f"{r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['p50']:.1f} | {r['failed']} |" for name, r in serve.items()]
        rows.append(f"\nrequests/s {ratio(o['requests_per_s'], t['requests_per_s'])}; p50 TTFT "
                    f"{o['ttft_ms']['p50']:.0f} ms vs {t['ttft_ms']['p50']:.0f} ms.")
    return "\n".join(rows) + "\n"


def plot(engine: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("decode_b1_tok_s", "decode, batch 1"), ("prefill512_tok_s", "prefill, 512-token prompt"),
               ("decode_16_tok_s", f"decode, {STREAMS} streams (total)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(PAIRS))
    for ax, (key, title) in zip(axes, metrics):
        ours = [engine["quantserve"][o][key] for o, _ in PAIRS]
        theirs = [engine["llama.cpp"][t][key] for _, t in PAIRS]
        ax.bar_label(ax.bar(x - 0.2, ours, 0.4, label="quantserve"), fmt="%.0f", fontsize=7)
        ax.bar_label(ax.bar(x + 0.2, theirs, 0.4, label="llama.cpp (native)"), fmt="%.0f", fontsize=7)
        ax.set_xticks(x, [f"{o}\nvs {t}" for o, t in PAIRS], fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, {THREADS} threads, {cpu_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ggufs = {kind: make_gguf(source, kind, work) for _, kind in PAIRS}
    models = our_models(model_dir, work)
    engine, info = {"quantserve": {}, "llama.cpp": {}}, {}
    for (name, path), (_, kind) in zip(models.items(), PAIRS):
        log(f"quantserve {name} / llama.cpp {kind} ...")
        engine["quantserve"][name] = bench_ours(path, tokenizer, "bfloat16" if name == "bfloat16" else "float16")
        engine["llama.cpp"][kind], info = bench_theirs(ggufs[kind])
    sides = {"quantserve": f"kernels {kernels.describe()}",
             "llama.cpp": f"{llamacpp_isa()}, backend {info.get('backends')}; machine {cpu_name()}"}
    serve = None if args.skip_serving else serving(models, ggufs, model_dir, args.serving_prompts)
    bandwidth = read_bandwidth()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp.json").write_text(json.dumps({"engine": engine, "serving": serve, "sides": sides,
                                                       "read_gb_s": bandwidth, "args": vars(args)}, indent=2))
    text = markdown(engine, serve, sides, bandwidth)
    (RESULTS / "llamacpp.md").write_text(text)
    plot(engine, RESULTS / "llamacpp.png")
    print(text)


if __name__ == "__main__":
    main()
