"""Calibration data and activation statistics for AWQ.

Datasets: `ptb` (PTB train, bundled), `wikitext2` (the bundled validation split: the Hugging
Face hub is not reachable offline, so the train split LMDeploy uses is not available; a notice
says so), `c4` / `pileval` (hub only: a clear error offline), or a local `.txt` / `.jsonl` path.
Windows of `seqlen` tokens are drawn at random (seeded) from the tokenized text.

Statistics come from the engine itself (float32, paged cache, chunked prefill): pre-hooks on
the four projections of every layer record each input channel's mean |x| and a uniform
sample of input rows, which the scale and clipping searches replay.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from quantserve import envs
from quantserve.quant.primitives import QuantError

BUNDLED = {"ptb": "ptb.train.txt", "wikitext2": "wiki.valid.raw"}
HUB_ONLY = ("c4", "pileval")


def check_dataset(name: str) -> None:
    """--calib-dataset names a set this machine has: checked before any weights are read."""
    if name in HUB_ONLY:
        raise QuantError(f"--calib-dataset {name} is downloaded from the Hugging Face hub, which is not reachable "
                         "here; use the bundled ptb or wikitext2, or a local .txt/.jsonl file")
    if name not in BUNDLED and not Path(name).is_file():
        raise QuantError(f"--calib-dataset {name!r}: not a known dataset (bundled: ptb, wikitext2) "
                         "nor an existing .txt/.jsonl file")


def calibration_text(name: str) -> str:
    check_dataset(name)
    if name in BUNDLED:
        if name == "wikitext2":
            print("calibration: wikitext2 from the bundled validation split (the hub's train split is not "
                  "reachable offline)", file=sys.stderr)
        return resources.files("quantserve.data").joinpath(BUNDLED[name]).read_text(encoding="utf-8")
    path = Path(name)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return "\n\n".join(r["text"] if isinstance(r, dict) else str(r) for r in rows)
    return path.read_text(encoding="utf-8")


def calibration_windows(tokenizer, name: str, samples: int, seqlen: int, seed: int = 0) -> list[list[int]]:
    ids = tokenizer.encode(calibration_text(name), add_special_tokens=False)
    if len(ids) < seqlen + 1:
        raise QuantError(f"--calib-dataset {name}: {len(ids)} tokens, fewer than one window of --calib-seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(samples)]
    return [ids[s:s + seqlen] for s in starts]


HESSIAN_ROWS = 65536    # GPTQ's X^T X uses at most this many token rows (a random subset)
MIN_EXPERT_ROWS = 16    # an expert fewer calibration tokens reach is rounded to nearest: too few rows to fit


def too_few_rows(linear: str, rows: int) -> bool:
    """A MoE expert whose statistics are too thin to calibrate from (routing decides how many)."""
    return ".experts." in linear and rows < MIN_EXPERT_ROWS or not rows


@dataclass
class InputStats:
    """What one projection saw: per-channel mean |x|, up to `keep` sampled input rows, and
    (for GPTQ) X^T X over a `hessian_share` of the rows."""
    keep: int
    with_hessian: bool = False
    hessian_share: float = 1.0
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None          # per channel (SmoothQuant)
    xtx: torch.Tensor | None = None
    rows: int = 0
    hessian_rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def add(self, x: torch.Tensor) -> None:                     # x: [T, K]
        x = x.float()
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        top = x.abs().amax(0)
        self.abs_max = top if self.abs_max is None else torch.maximum(self.abs_max, top)
        if self.with_hessian:
            self._add_hessian(x)
        self.rows += x.shape[0]
        take = min(x.shape[0], max(1, self.keep // 16))          # a few rows from every chunk
        self.sample.append(x[torch.randperm(x.shape[0], generator=self.rng)[:take]].clone())

    def _add_hessian(self, x: torch.Tensor) -> None:
        if self.hessian_share < 1.0:
            x = x[torch.randperm(x.shape[0], generator=self.rng)[:max(1, round(x.shape[0] * self.hessian_share))]]
        self.xtx = x.t() @ x if self.xtx is None else self.xtx.addmm_(x.t(), x)
        self.hessian_rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2 * self.xtx / self.hessian_rows                  # [K, K]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.rows

    def rows_sample(self) -> torch.Tensor:
        rows = torch.cat(self.sample)
        return rows[torch.randperm(rows.shape[0], generator=self.rng)[: self.keep]]


def projections(module: torch.nn.Module) -> list[str]:
    """The names of a model's (or layer's) quantizable linears: every runtime linear but a MoE
    router, which stays float."""
    from quantserve.quant.linear import RUNTIME_KINDS

    return [name for name, m in module.named_modules() if isinstance(m, RUNTIME_KINDS) and not name.endswith("router")]


def calibration_dtype() -> str:
    """The calibration forward's weights: bfloat16 where the kernels multiply them with vdpbf16ps
    (twice the float32 FMA rate on AVX512_BF16 CPUs; AutoAWQ and AutoGPTQ calibrate in half
    precision), else float32. Only the statistics come from it; quantization reads the
    checkpoint's own weights."""
    from quantserve.kernels import bf16, cpu

    return "bfloat16" if bf16.available(cpu()) and envs.bf16_dot() else "float32"


def calibration_engine(model_dir: Path, seqlen: int, batch_size: int):
    """An engine sized for batches of calibration windows (prefill only, float KV cache)."""
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine

    return Engine(model_dir, EngineConfig(dtype=calibration_dtype(), session_len=seqlen + 1, max_batch_size=batch_size,
                                          cache_max_tokens=(seqlen + 64) * batch_size, quant_policy=0,
                                          max_prefill_token_num=min(8192, seqlen * batch_size)), progress=False)


@torch.inference_mode()
def run_windows(engine, windows: list[list[int]], batch_size: int, inputs: dict, progress: bool = True) -> None:
    """Every window through the engine once; each projection's input rows go to inputs[name].add."""
    from quantserve.config import SamplingParams

    hooks = [engine.model.get_submodule(name).register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
             for name, s in inputs.items()]
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="calibration", unit="batch",
                          disable=not progress, file=sys.stderr):
            for j, ids in enumerate(windows[start:start + batch_size]):
                engine.add_request(f"c{start + j}", ids, SamplingParams(max_new_tokens=1))
            while engine.has_work:
                engine.step()
    finally:
        for h in hooks:
            h.remove()


def collect_stats(model_dir: Path, windows: list[list[int]], batch_size: int, keep: int = 2048,
                  progress: bool = True, hessian: bool = False) -> dict[str, InputStats]:
    """Run the float model over the windows; internal projection name -> InputStats."""
    engine = calibration_engine(model_dir, len(windows[0]), batch_size)
    share = min(1.0, HESSIAN_ROWS / (len(windows[0]) * len(windows)))
    stats = {f"layers.{p}": InputStats(keep, hessian, share) for p in projections(engine.model.layers)}
    run_windows(engine, windows, batch_size, stats, progress)
    return stats
