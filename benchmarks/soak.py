"""Soak: a real `serve api_server` under mixed traffic from many clients, with its memory watched.

    python benchmarks/soak.py --duration 3600 --label after      # the 60-minute run of BENCHMARKS.md
    python benchmarks/soak.py --duration 120                     # a short look

Starts `quantserve serve api_server W4_MODEL --quant-policy 8` (W4 g64 RTN of the default model,
made once with `quantserve lite rtn`), or attaches to a running one (--url and --pid). 16 clients
loop over chat, streamed chat with usage, completions, n > 1, tools, json_schema, logprobs,
streams dropped mid-way and bad requests, through the official `openai` client. Every
--interval seconds it samples the server's RSS and thread count. At the end it checks that no
request is left running and every KV block is free, and writes results/soak-LABEL.json and
results/soak-LABEL.png (RSS over time). Leak check: after --warmup seconds, RSS must not grow by
more than 5% (the largest later sample against the first one after warm-up).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import openai

RESULTS = Path(__file__).resolve().parent / "results"
LEAK_LIMIT = 0.05
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOPICS = ["the sea", "a city at night", "bread", "trains", "a small dog", "winter", "a library", "rain"]
WORDS = ("river stone market window garden letter morning engine paper silver voice orange bridge cloud "
         "forest number kitchen winter station harbour candle mountain pocket ladder yellow").split()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: W4 g64 RTN of the default model)")
    p.add_argument("--duration", type=float, default=120, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the leak check's baseline")
    p.add_argument("--interval", type=float, default=20, help="seconds between RSS samples")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--quant-policy", default="8")
    p.add_argument("--label", default="run", help="names the result files: results/soak-LABEL.*")
    p.add_argument("--url", default=None, help="attach to a running server instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process id (for its RSS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-words", type=int, default=300, help="longest note in a prompt (a model's context bounds it)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where soak-LABEL.json / .png go")
    p.add_argument("--server-args", default="", help="extra flags for the started server (one string)")
    return p.parse_args()


def w4_model() -> Path:
    home = Path(os.environ.get("QUANTSERVE_HOME", Path.home() / ".cache" / "quantserve"))
    out = home / "work" / "SmolLM2-135M-Instruct-w4-rtn-g64"
    if not (out / "config.json").is_file():
        source = subprocess.run(["quantserve", "default-model"], check=True, capture_output=True, text=True)
        subprocess.run(["quantserve", "lite", "rtn", source.stdout.strip(), "--w-bits", "4", "--w-group-size", "64",
                        "--work-dir", str(out)], check=True)
    return out


def free_port() -> int:
    """A port the OS says is free now (one derived from the pid collided with a client's in CI)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, port: int, name: str = "soak") -> subprocess.Popen:
    log = open(args.results / f"server-{name}.log", "w")
    cmd = ["quantserve", "serve", "api_server", str(model), "--quant-policy", args.quant_policy,
           "--server-name", "127.0.0.1", "--server-port", str(port), "--model-name", name, *args.server_args.split()]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become healthy in 300 s")


def cpu_name() -> str:
    """The CPU model, its cores and its widest vector ISA, for the report."""
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split())
    isa = next((name for flag, name in [("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
                if flag in flags), "no AVX2")
    isa += " + BF16" if "avx512_bf16" in flags else ""
    family = re.search(r"cpu family\s*:\s*(\d+)", info)
    # AMD names its cores by family: 25 (19h) is Zen 3 and Zen 4, 26 (1Ah) Zen 5
    core = {"25": " (family 25: Zen 3/4)", "26": " (family 26: Zen 5)"}.get(family.group(1) if family else "", "")
    name = model.group(1).strip() if model else "unknown CPU"
    return f"{name}{core if name.startswith('AMD') else ''}, {os.cpu_count()} cores, {isa}"


def process_sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, thread count) of the process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return rss_kb / 1024, threads


# ---- traffic --------------------------------------------------------------------------------------

class Traffic(random.Random):
    """One client's random choices, and the longest note its prompts may carry."""

    def __init__(self, seed: int, max_words: int):
        super().__init__(seed)
        self.max_words = max(20, max_words)


def user(rng: Traffic) -> list[dict]:
    """A note of 20 to --max-words words, then a task: prompts that are each different."""
    note = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, rng.max_words)))
    return [{"role": "user", "content": f"Notes: {note}\n\nWrite a few sentences about {rng.choice(TOPICS)}."}]


async def chat(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    r = await c.chat.completions.create(model="soak", messages=user(rng), max_tokens=rng.randint(16, 128))
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    return "ok"


async def chat_stream_usage(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    stream = await c.chat.completions.create(model="soak", messages=user(rng), max_tokens=rng.randint(16, 128),
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    return "ok"


async def completion(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    r = await c.completions.create(model="soak", prompt=f"Once upon a time, {rng.choice(TOPICS)}",
                                   max_tokens=rng.randint(16, 128), temperature=0.8, seed=rng.randint(0, 99))
    assert r.choices[0].finish_reason in ("stop", "length")
    return "ok"


async def n_choices(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    r = await c.chat.completions.create(model="soak", messages=user(rng), max_tokens=16, n=3, temperature=1.0)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    return "ok"


async def tools(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    messages = [{"role": "user", "content": f"What is the weather in {rng.choice(['Paris', 'Oslo', 'Lima'])}?"}]
    choice = rng.choice(["auto", "required"])
    r = await c.chat.completions.create(model="soak", messages=messages, tools=TOOLS, tool_choice=choice,
                                        max_tokens=48)
    assert choice == "auto" or r.choices[0].finish_reason == "length" or r.choices[0].message.tool_calls
    return "ok"


async def json_schema(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    r = await c.chat.completions.create(
        model="soak", messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    if r.choices[0].finish_reason == "stop":
        json.loads(r.choices[0].message.content)      # a reply that ended must parse
    return "ok"


async def logprobs(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    r = await c.chat.completions.create(model="soak", messages=user(rng), max_tokens=16, logprobs=True,
                                        top_logprobs=3)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    return "ok"


async def dropped_stream(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    stream = await c.completions.create(model="soak", prompt="Count: one, two,", max_tokens=200, stream=True)
    keep = rng.randint(1, 6)
    async for _ in stream:
        keep -= 1
        if keep == 0:
            break
    await stream.close()                 # the client leaves mid-answer
    return "dropped"


async def bad_request(c: openai.AsyncOpenAI, rng: Traffic) -> str:
    bad = rng.choice([{"temperature": -1}, {"max_tokens": -5}, {"top_p": 7}, {"model": "no-such-model"},
                      {"messages": []}, {"n": 0}])
    body = {"model": "soak", "messages": user(rng), "max_tokens": 8, **bad}
    try:
        await c.chat.completions.create(**body)
    except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError):
        return "refused as expected"
    raise AssertionError(f"bad request {bad} was accepted")


SCENARIOS = [chat, chat_stream_usage, completion, n_choices, tools, json_schema, logprobs, dropped_stream,
             bad_request]


async def client_loop(base_url: str, rng: Traffic, end: float, outcomes: Counter, latencies: list, errors: list):
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300) as c:
        while time.monotonic() < end:
            scenario = rng.choice(SCENARIOS)
            start = time.monotonic()
            try:
                outcome = await scenario(c, rng)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported, not raised
                outcome = "unexpected error"
                errors.append(f"{scenario.__name__}: {type(e).__name__}: {str(e)[:200]}")
            outcomes[outcome] += 1
            outcomes[f"{scenario.__name__}: {outcome}"] += 1
            if outcome == "ok":
                latencies.append(time.monotonic() - start)


async def sampler(pid: int, start: float, end: float, interval: float, samples: list) -> None:
    while True:
        rss, threads = process_sample(pid)
        samples.append({"t": round(time.monotonic() - start, 1), "rss_mb": round(rss, 1), "threads": threads})
        print(f"[{samples[-1]['t']:7.0f} s] RSS {rss:8.1f} MB, {threads} threads", file=sys.stderr, flush=True)
        if time.monotonic() >= end:
            return
        await asyncio.sleep(min(interval, max(0.0, end - time.monotonic())))


# ---- report -------------------------------------------------------------------------------------

def engine_state(url: str) -> dict:
    """Running requests and KV blocks, from the server's Prometheus metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def gauge(name: str) -> float:
        return float(re.search(rf'^{re.escape(name)}\{{[^}}]*\}} (\S+)$', text, re.M).group(1))
    return {"running": gauge("vllm:num_requests_running"), "waiting": gauge("vllm:num_requests_waiting"),
            "kv_blocks": gauge("quantserve:kv_cache_blocks_total"),
            "kv_blocks_free": gauge("quantserve:kv_cache_blocks_free")}


def leak_check(samples: list[dict], warmup: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup]
    base, peak, last = after[0]["rss_mb"], max(s["rss_mb"] for s in after), after[-1]["rss_mb"]
    growth = (peak - base) / base
    slope = np.polyfit([s["t"] for s in after], [s["rss_mb"] for s in after], 1)[0] if len(after) > 2 else 0.0
    return {"baseline_mb": base, "peak_mb": peak, "last_mb": last, "growth": round(growth, 4),
            "mb_per_hour": round(float(slope) * 3600, 1), "pass": growth <= LEAK_LIMIT}


def plot(samples: list[dict], warmup: float, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([s["t"] / 60 for s in samples], [s["rss_mb"] for s in samples], marker=".", label=f"RSS ({label})")
    ax.axvline(warmup / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, 1.15 * max(s["rss_mb"] for s in samples))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("api_server RSS under 16 mixed clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args, outcomes: Counter, latencies: list, errors: list, samples: list, state: dict) -> dict:
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return {"label": args.label, "cpu": cpu_name(), "duration_s": args.duration, "clients": args.clients,
            "quant_policy": args.quant_policy, "requests": sum(v for k, v in outcomes.items() if ":" not in k),
            "outcomes": dict(sorted(outcomes.items())), "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1), "errors": errors[:50],
            "engine_after": state, "leak": leak_check(samples, args.warmup), "samples": samples}


async def soak(args, url: str, pid: int) -> dict:
    outcomes, latencies, errors, samples = Counter(), [], [], []
    start = time.monotonic()
    end = start + args.duration
    clients = [client_loop(url + "/v1", Traffic(args.seed * 1000 + i, args.max_words), end, outcomes, latencies, errors)
               for i in range(args.clients)]
    await asyncio.gather(sampler(pid, start, end, args.interval, samples), *clients)
    await asyncio.sleep(2)                     # aborted streams finish releasing their blocks
    samples.append({"t": round(time.monotonic() - start, 1), **dict(zip(("rss_mb", "threads"), process_sample(pid)))})
    return summarize(args, outcomes, latencies, errors, samples, engine_state(url))


def main() -> int:
    args = parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        server = start_server(args, Path(args.model) if args.model else w4_model(), port)
        url, pid = f"http://127.0.0.1:{port}", server.pid
    try:
        result = asyncio.run(soak(args, url, pid))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    (args.results / f"soak-{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result["samples"], args.warmup, args.label, args.results / f"soak-{args.label}.png")
    state, leak = result["engine_after"], result["leak"]
    clean = state["running"] == 0 and state["waiting"] == 0 and state["kv_blocks_free"] == state["kv_blocks"]
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "errors")}, indent=1))
    print(f"unexpected errors {result['outcomes'].get('unexpected error', 0)}; engine clean: {clean}; "
          f"RSS growth after warm-up {leak['growth']:.1%} ({leak['mb_per_hour']} MB/h): "
          f"{'PASS' if leak['pass'] else 'FAIL'}")
    return 0 if clean and leak["pass"] and not result["outcomes"].get("unexpected error") else 1


if __name__ == "__main__":
    sys.exit(main())
