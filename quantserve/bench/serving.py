"""`bench serving`: load any OpenAI-compatible server over HTTP and time every streamed token.

Requests go to `/v1/completions` with `stream: true`, `ignore_eos` (honoured by quantserve,
vLLM, LMDeploy and llama.cpp's server) and `stream_options.include_usage`, at `--request-rate`
(Poisson arrivals; inf = all at once) with at most `--concurrency` in flight. Per request:
TTFT (first text), ITL (gaps between text chunks), TPOT ((e2e - TTFT) / (tokens - 1)) and e2e.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from quantserve.bench.results import summary
from quantserve.bench.workload import BenchRequest


@dataclass
class Outcome:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int = 0              # the HTTP status, once the response began


@dataclass
class ServingConfig:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    request_rate: float = float("inf")
    seed: int = 0
    timeout: float = 600.0


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/v1/models")
    if response.status_code != 200:
        raise ValueError(f"--base-url {base_url}: GET /v1/models answered {response.status_code}; give --model")
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"--base-url {base_url}: the server lists no models; give --model")
    return models[0]["id"]


async def one_request(client: httpx.AsyncClient, cfg: ServingConfig, model: str, req: BenchRequest) -> Outcome:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    for _ in range(2):
        out = Outcome(prompt_tokens=len(req.prompt_ids))
        try:
            return await stream_completion(client, f"{cfg.base_url}/v1/completions", body, out)
        except httpx.RemoteProtocolError as e:
            out.error = f"{type(e).__name__}: {e}"
            if out.status:      # the server had answered; else it closed a kept-alive connection as it was
                return out      # reused, the request never reached it, and it goes once more on a new one
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            out.error = f"{type(e).__name__}: {e}"
            return out
    return out


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, out: Outcome) -> Outcome:
    """One streamed completion into `out` (TTFT, inter-token gaps, usage); raises on transport errors."""
    chunks = 0
    start = last = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        out.status = response.status_code
        if response.status_code != 200:
            out.error = f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
            return out
        async for line in response.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = str(chunk["error"])[:200]
                return out
            usage = chunk.get("usage") or {}
            out.prompt_tokens = usage.get("prompt_tokens") or out.prompt_tokens
            out.output_tokens = usage.get("completion_tokens") or out.output_tokens
            if any(c.get("text") for c in chunk.get("choices") or []):
                now = time.perf_counter()
                if chunks == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last, chunks = now, chunks + 1
    out.e2e = time.perf_counter() - start
    out.output_tokens = out.output_tokens or chunks
    out.ok = chunks > 0
    out.error = "" if out.ok else "no tokens streamed"
    return out


async def run(cfg: ServingConfig, requests: list[BenchRequest], progress: bool = True) -> dict:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout, limits=limits) as client:
        model = cfg.model or await discover_model(client, cfg.base_url)
        gate, rng = asyncio.Semaphore(cfg.concurrency), random.Random(cfg.seed)
        bar = tqdm(total=len(requests), desc="serving", unit="req", disable=not progress, file=sys.stderr)

        async def limited(req: BenchRequest) -> Outcome:
            async with gate:
                outcome = await one_request(client, cfg, model, req)
            bar.update(1)
            return outcome

        start, tasks = time.perf_counter(), []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if cfg.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        bar.close()
    return report(cfg, model, outcomes, elapsed)


def report(cfg: ServingConfig, model: str, outcomes: list[Outcome], elapsed: float) -> dict:
    good = [o for o in outcomes if o.ok]
    n_in, n_out = sum(o.prompt_tokens for o in good), sum(o.output_tokens for o in good)
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in good if o.output_tokens > 1]
    return {"base_url": cfg.base_url, "model": model, "concurrency": cfg.concurrency,
            "request_rate": cfg.request_rate, "num_prompts": len(outcomes), "completed": len(good),
            "failed": len(outcomes) - len(good), "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
            "elapsed_s": elapsed, "requests_per_s": len(good) / elapsed,
            "input_tokens_per_s": n_in / elapsed, "output_tokens_per_s": n_out / elapsed,
            "input_tokens": n_in, "output_tokens": n_out,
            "ttft_ms": summary([o.ttft for o in good]), "tpot_ms": summary(tpot),
            "itl_ms": summary([gap for o in good for gap in o.itl]), "e2e_ms": summary([o.e2e for o in good])}
