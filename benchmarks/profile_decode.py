"""Where a decode step's time goes, for batch 1 and 16 sequences (128-token contexts), for the
float16 model and its W4 g64 (RTN) checkpoint.

    python benchmarks/profile_decode.py

Times each stage of Engine.step() separately (scheduling and batch building in Python, the
native all-layers call, the LM head, sampling, bookkeeping), then splits the native call into
its stages (each linear, attention with rope and the KV write, norms) with timers inside it, in a
build of the kernels made for this (-DQS_PROFILE).
Writes benchmarks/results/profile.md.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantserve import kernels  # noqa: E402
from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine import sampler  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

REPEATS = 20


def timed(fn, stats: dict, key: str):
    start = time.perf_counter()
    out = fn()
    stats[key] = stats.get(key, 0.0) + time.perf_counter() - start
    return out


def one_step(engine: Engine, stats: dict) -> None:
    """Engine.step() with every stage timed."""
    model, runner = engine.model, engine.runner
    out = timed(engine.scheduler.schedule, stats, "schedule (Python)")
    batch = timed(lambda: runner.prepare(out.scheduled), stats, "build batch tensors (Python)")
    with torch.inference_mode():
        x = timed(lambda: model.embed(batch.input_ids).to(model.compute_dtype), stats, "embedding")
        x, res = timed(lambda: model.fused.forward(x, batch.positions, batch.meta, engine.cache), stats,
                       "all layers (one native call)")
        hidden = timed(lambda: model.norm(x, res)[batch.sample_rows], stats, "final norm")
        logits = timed(lambda: model.lm_head(hidden).float(), stats, "LM head")
        requests = [s.request for s in batch.sample_from]
        tokens = timed(lambda: sampler.sample(logits, requests), stats, "sampling")
    timed(lambda: engine.scheduler.update(out, {r.request_id: t for r, t in zip(requests, tokens)}), stats,
          "update (Python)")


STAGES = ("qkv linear", "rope, KV write, attention", "o linear", "gate_up linear", "down linear",
          "norms, silu")


@functools.cache
def profiling_library() -> ctypes.CDLL:
    """This backend's kernels built with -DQS_PROFILE: qs_decode_layers times its stages."""
    lib = kernels.load(kernels.backend(), ("-DQS_PROFILE",))
    lib.qs_profile_read.argtypes, lib.qs_profile_read.restype = [ctypes.c_void_p], None
    return lib


def native_split(engine: Engine) -> dict:
    """The stages inside the native all-layers call, timed in place by the profiling build over
    REPEATS further steps of the same requests (the timers add a little to each stage)."""
    lib, fused = profiling_library(), engine.model.fused
    own, fused.lib = fused.lib, lib
    seconds = (ctypes.c_double * len(STAGES))()
    lib.qs_profile_read(seconds)                                    # zero the counters
    for _ in range(REPEATS):
        engine.step()
    lib.qs_profile_read(seconds)
    fused.lib = own
    return {name: seconds[i] / REPEATS for i, name in enumerate(STAGES)}


def profile(engine: Engine, n: int) -> tuple[dict, dict]:
    params = SamplingParams(max_new_tokens=10_000)
    reqs = [engine.add_request(f"p{n}-{i}", list(range(100 + i, 228 + i)), params) for i in range(n)]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    stats: dict = {}
    for _ in range(REPEATS):
        one_step(engine, stats)
    split = native_split(engine)
    for r in reqs:
        engine.abort(r.request_id)
    return {k: v / REPEATS for k, v in stats.items()}, split


def table(results: dict) -> str:
    lines = []
    for n, (stages, split) in results.items():
        total = sum(stages.values())
        lines += [f"**batch {n}**: {total * 1e3:.1f} ms per step = {n / total:.0f} tokens/s", "",
                  "| stage | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v * 1e3:.2f} | {v / total:.0%} |" for k, v in stages.items()]
        lines += [f"| ↳ inside the native call: {k} | {v * 1e3:.2f} | {v / total:.0%} |"
                  for k, v in split.items()]
        lines.append("")
    return "\n".join(lines)


def profile_model(path: Path) -> dict:
    engine = Engine(path, EngineConfig(dtype="float16", session_len=2048), progress=False)
    if engine.model.fused is None:
        sys.exit("native kernels unavailable on this machine: nothing to profile")
    return {n: profile(engine, n) for n in (1, 16)}


def w4_checkpoint(model: Path, work: Path) -> Path:
    from quantserve.quant.primitives import QuantSpec
    from quantserve.quant.run import LiteJob, run

    run(LiteJob(str(model), str(work / "w4"), "rtn", QuantSpec(4, 64), progress=False))
    return work / "w4"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    args = p.parse_args()
    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"float16": model, "W4 g64 (RTN; int8 output head)": w4_checkpoint(model, Path(tmp))}
        md = "\n".join(f"### {name}, {torch.get_num_threads()} threads\n\n" + table(profile_model(path))
                       for name, path in variants.items())
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "profile.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
