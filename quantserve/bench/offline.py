"""Engine benchmarks without a server: `bench throughput` and `bench latency`.

Every request ignores EOS and decodes exactly its output length, greedily, so runs compare.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from quantserve.bench.workload import BenchRequest
from quantserve.config import SamplingParams
from quantserve.engine.engine import Engine, EngineStats


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)             # no eos_token_ids: EOS is ignored


def throughput(engine: Engine, requests: list[BenchRequest], concurrency: int = 0, progress: bool = True) -> dict:
    """Run every request, keeping at most `concurrency` in the engine (0: all submitted at once)."""
    limit = concurrency or len(requests)
    before = engine.stats()
    pending, live, ids, n_out = list(reversed(requests)), set(), itertools.count(), 0
    bar = tqdm(total=len(requests), desc="throughput", unit="req", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < limit:
            r, request_id = pending.pop(), f"t{next(ids)}"
            engine.add_request(request_id, r.prompt_ids, _params(r.output_len))
            live.add(request_id)
        for request in engine.step():
            if request.is_finished:
                live.discard(request.request_id)
                n_out += len(request.output_token_ids)
                bar.update(1)
    elapsed = time.perf_counter() - start
    bar.close()
    n_in = sum(len(r.prompt_ids) for r in requests)
    return {"num_prompts": len(requests), "concurrency": concurrency or len(requests), "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed, "input_tokens_per_s": n_in / elapsed,
            "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
            "input_tokens": n_in, "output_tokens": n_out, **speculation(engine, before)}


def speculation(engine: Engine, before: EngineStats) -> dict:
    """With speculative decoding on: the share of drafted tokens accepted since `before` (%), and the
    mean tokens a verify row emitted (vLLM's mean acceptance length); else nothing."""
    if engine.config.speculative is None:
        return {}
    now = engine.stats()
    drafts = now.spec_num_drafts - before.spec_num_drafts
    drafted = now.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = now.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {"draft_accepted_pct": 100 * accepted / drafted if drafted else float("nan"),
            "mean_acceptance_length": 1 + accepted / drafts if drafts else float("nan")}


@dataclass
class LatencyPoint:
    batch: int
    input_len: int
    output_len: int


def grid(batches: list[int], input_lens: list[int], output_lens: list[int]) -> list[LatencyPoint]:
    return [LatencyPoint(b, i, o) for b, i, o in itertools.product(batches, input_lens, output_lens)]


def latency(engine: Engine, point: LatencyPoint, prompts: list[list[int]], repeats: int = 1) -> dict:
    """One grid point: `batch` prompts submitted together; the best of `repeats` runs.
    prefill = until every request has its first token; decode = the rest."""
    before = engine.stats()
    runs = [_timed_batch(engine, prompts, point.output_len) for _ in range(repeats)]
    ttfts, prefill_s, decode_s = min(runs, key=lambda r: r[1] + r[2])
    b, out = point.batch, point.output_len
    steps = max(out - 1, 1)
    return {"batch": b, "input_len": point.input_len, "output_len": out,
            "prefill_tokens_per_s": b * point.input_len / prefill_s,
            "decode_tokens_per_s": b * (out - 1) / decode_s if out > 1 else float("nan"),
            "ttft_ms": 1000 * sum(ttfts) / len(ttfts), "tpot_ms": 1000 * decode_s / steps,
            "e2e_s": prefill_s + decode_s, **engine.measure_memory(), **speculation(engine, before)}


def _timed_batch(engine: Engine, prompts: list[list[int]], output_len: int) -> tuple[list[float], float, float]:
    stamp = time.perf_counter_ns()
    start = time.perf_counter()
    reqs = [engine.add_request(f"l{stamp}-{i}", p, _params(output_len)) for i, p in enumerate(prompts)]
    first: dict[str, float] = {}
    while len(first) < len(reqs):
        for r in engine.step():
            first.setdefault(r.request_id, time.perf_counter() - start)
    prefill = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return list(first.values()), prefill, time.perf_counter() - start - prefill
