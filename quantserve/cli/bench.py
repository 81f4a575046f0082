"""`quantserve bench throughput|latency [MODEL]` (the engine, offline) and `quantserve bench serving
--base-url URL` (any OpenAI-compatible server). Each prints a table and writes JSON, CSV and a
PNG plot to --output-dir.

    quantserve bench throughput --num-prompts 64 --input-len 128 --output-len 128
    quantserve bench latency --batch-size 1 4 16 --input-len 128 512 --output-len 128
    quantserve bench serving --base-url http://localhost:23333 --concurrency 1 4 8 --num-prompts 64
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from quantserve.cli.args import add_engine_args, add_model_arg, engine_config


# shown when the rows have them (speculative decoding on)
SPECULATION_COLUMNS = [("draft_accepted_pct", "accepted %"), ("mean_acceptance_length", "tok/verify")]


def numbers(kind):
    """A flag taking `1 4 16` or `1,4,16`."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{throughput,latency,serving}")
    tp = sub.add_parser("throughput", help="offline engine throughput: requests/s, input and output tokens/s")
    add_model_arg(tp)
    add_workload_args(tp)
    tp.add_argument("--concurrency", type=int, default=0, help="requests in the engine at once (0: all)")
    add_engine_args(tp)
    lat = sub.add_parser("latency", help="batch x prompt length x output length grid: prefill / decode tokens/s, "
                                         "TTFT, TPOT, memory")
    add_model_arg(lat)
    lat.add_argument("--batch-size", "--concurrency", dest="batch_sizes", type=numbers(int), nargs="+",
                     default=[[1, 4, 16]], help="batch sizes (e.g. 1 4 16)")
    lat.add_argument("--input-len", "--prompt-tokens", dest="input_lens", type=numbers(int), nargs="+",
                     default=[[128]], help="prompt lengths in tokens")
    lat.add_argument("--output-len", "--completion-tokens", dest="output_lens", type=numbers(int), nargs="+",
                     default=[[128]], help="new tokens per request")
    lat.add_argument("--repeats", type=int, default=1, help="runs per grid point; the best is kept")
    add_output_args(lat)
    add_engine_args(lat)
    srv = sub.add_parser("serving", help="load an OpenAI-compatible server: TTFT, TPOT, ITL, e2e, requests/s")
    srv.add_argument("--base-url", required=True, help="e.g. http://localhost:23333 (quantserve, llama.cpp, vLLM, LMDeploy)")
    srv.add_argument("--model", default=None, help="model name (default: the server's first)")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--tokenizer", default=None,
                     help="tokenizer for prompts and counts (default: the default model's)")
    add_workload_args(srv)
    srv.add_argument("--concurrency", type=numbers(int), nargs="+", default=[[8]],
                     help="requests in flight; several values run one after another (e.g. 1 4 8)")
    srv.add_argument("--request-rate", type=float, default=float("inf"),
                     help="requests per second, Poisson arrivals (default inf: all at once)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default=None,
                   help="a ShareGPT-format JSON file (default: synthetic prompts of --input-len tokens)")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in tokens")
    g.add_argument("--output-len", type=int, default=None,
                   help="new tokens per request (default 128; ShareGPT: the recorded reply's length)")
    g.add_argument("--seed", type=int, default=0)
    add_output_args(p)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="bench_results", help="where the JSON, CSV and PNG files go")
    p.add_argument("--no-progress", action="store_true")


def run(ns) -> int:
    return {"throughput": run_throughput, "latency": run_latency, "serving": run_serving}[ns.bench_command](ns)


def output_paths(ns, name: str) -> dict[str, str]:
    out = Path(ns.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {out}: {e.strerror}") from None
    stem = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"json": f"{stem}.json", "csv": f"{stem}.csv", "png": f"{stem}.png"}


def workload(ns, tokenizer_path) -> list:
    from quantserve.bench.workload import load
    from quantserve.text import Tokenizer

    if ns.dataset is None and ns.output_len is None:
        ns.output_len = 128
    return load(Tokenizer(tokenizer_path).hf, ns.dataset, ns.num_prompts, ns.input_len, ns.output_len, ns.seed)


def load_engine(ns, path: Path, session_len: int):
    from quantserve.engine.engine import Engine

    ns.session_len = max(ns.session_len or 0, session_len)
    return Engine(path, engine_config(ns), progress=not ns.no_progress)


def run_throughput(ns) -> int:
    from quantserve.bench import offline, results
    from quantserve.models.resolve import resolve_model

    path = resolve_model(ns.model_path)
    requests = workload(ns, path)
    ns.max_batch_size = ns.max_batch_size or min(len(requests), ns.concurrency or len(requests), 64)
    engine = load_engine(ns, path, max(len(r.prompt_ids) + r.output_len for r in requests) + 1)
    offline.throughput(engine, requests[:1], progress=False)                         # warm-up
    row = {"model": str(path), **offline.throughput(engine, requests, ns.concurrency, not ns.no_progress)}
    print(results.table([row], [("num_prompts", "prompts"), ("elapsed_s", "seconds"), ("requests_per_s", "req/s"),
                                ("input_tokens_per_s", "input tok/s"), ("output_tokens_per_s", "output tok/s"),
                                ("total_tokens_per_s", "total tok/s"), *SPECULATION_COLUMNS]))
    paths = output_paths(ns, "throughput")
    results.write([row], paths["json"], paths["csv"])
    print(f"results: {paths['json']}  {paths['csv']}", file=sys.stderr)
    return 0


def run_latency(ns) -> int:
    from quantserve.bench import offline, results
    from quantserve.bench.workload import synthetic
    from quantserve.models.resolve import resolve_model
    from quantserve.text import Tokenizer

    flat = lambda groups: [v for g in groups for v in g]  # noqa: E731
    points = offline.grid(flat(ns.batch_sizes), flat(ns.input_lens), flat(ns.output_lens))
    if any(min(p.batch, p.input_len, p.output_len) < 1 for p in points):
        raise ValueError("--batch-size, --input-len and --output-len must be at least 1")
    ns.max_batch_size = max(ns.max_batch_size or 0, *(p.batch for p in points))
    path = resolve_model(ns.model_path)
    engine = load_engine(ns, path, max(p.input_len + p.output_len for p in points) + 1)
    tokenizer = Tokenizer(path).hf
    offline.latency(engine, points[0], [synthetic(tokenizer, 1, 8, 1)[0].prompt_ids], 1)    # warm-up
    rows = []
    for i, point in enumerate(points):
        prompts = [r.prompt_ids for r in synthetic(tokenizer, point.batch, point.input_len, point.output_len, seed=i)]
        rows.append(offline.latency(engine, point, prompts, ns.repeats))
        if not ns.no_progress:
            print(f"[{i + 1}/{len(points)}] batch {point.batch}, {point.input_len} in, {point.output_len} out",
                  file=sys.stderr)
    print(results.table(rows, [("batch", "batch"), ("input_len", "in"), ("output_len", "out"),
                               ("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s"),
                               ("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("peak_rss_gb", "peak RSS GB"),
                               *SPECULATION_COLUMNS]))
    paths = output_paths(ns, "latency")
    results.write(rows, paths["json"], paths["csv"])
    written = [paths["json"], paths["csv"]]
    if results.try_plot(results.plot_curve, rows, "batch", [("decode_tokens_per_s", "decode"),
                        ("prefill_tokens_per_s", "prefill")], "batch size", f"{path.name}: tokens/s vs batch",
                        paths["png"]):
        written.append(paths["png"])
    print("results: " + "  ".join(written), file=sys.stderr)
    return 0


def run_serving(ns) -> int:
    from quantserve.bench import results, serving
    from quantserve.models.resolve import resolve_model

    requests = workload(ns, ns.tokenizer or resolve_model(None))
    base = ns.base_url.rstrip("/").removesuffix("/v1")
    if ns.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    rows = []
    for concurrency in [c for group in ns.concurrency for c in group]:
        if concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        cfg = serving.ServingConfig(base, ns.model, ns.api_key, concurrency, ns.request_rate, ns.seed)
        rows.append(asyncio.run(serving.run(cfg, requests, not ns.no_progress)))
    print(results.table(rows, [("concurrency", "concurrency"), ("completed", "ok"), ("failed", "failed"),
                               ("requests_per_s", "req/s"), ("output_tokens_per_s", "output tok/s"),
                               ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"),
                               ("tpot_ms_p50", "TPOT p50 ms"), ("itl_ms_p50", "ITL p50 ms"),
                               ("e2e_ms_p50", "e2e p50 ms")]))
    for row in rows:
        for error in row["errors"]:
            print(f"error (concurrency {row['concurrency']}): {error}", file=sys.stderr)
    paths = output_paths(ns, "serving")
    results.write(rows, paths["json"], paths["csv"])
    written = [paths["json"], paths["csv"]]
    plots = [(results.plot_latency, rows, paths["png"])]
    if len(rows) > 1:
        plots.append((results.plot_curve, rows, "concurrency", [("output_tokens_per_s", "output tokens/s")],
                      "concurrency", f"{rows[0]['model']}: throughput vs concurrency",
                      paths["png"].replace(".png", "-throughput.png")))
    written += [args[-1] for plot, *args in plots if results.try_plot(plot, *args)]
    print("results: " + "  ".join(written), file=sys.stderr)
    return 0 if all(r["completed"] for r in rows) else 1
