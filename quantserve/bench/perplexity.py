"""Perplexity through the engine's own paged (optionally quantized) KV cache.

Protocol of the AWQ/GPTQ papers: the dataset file read whole, tokenized once, cut into
non-overlapping windows of `seqlen` tokens; in every window each token after the first is
scored given the ones before it; ppl = exp(mean NLL). Each window is prefilled in chunks of
`chunk_size` tokens (--max-prefill-token-num), so with small chunks most attention reads the
cache, quantized or not, exactly as generation does.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from quantserve.config import SamplingParams
from quantserve.engine.engine import Engine

DATASETS = {"wikitext2": "wiki.test.raw", "ptb": "ptb.valid.txt"}


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int


def dataset_text(name: str) -> str:
    """A bundled dataset by name, or any text file by path."""
    if name in DATASETS:
        return resources.files("quantserve.data").joinpath(DATASETS[name]).read_text(encoding="utf-8")
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--dataset {name!r} is neither a bundled dataset ({', '.join(DATASETS)}) nor a text file")
    return path.read_text(encoding="utf-8")


@torch.inference_mode()
def window_nll(engine: Engine, ids: list[int]) -> float:
    """Sum of -log p(ids[i+1] | ids[:i+1]) over the window, computed chunk by chunk."""
    request = engine.add_request(f"ppl-{id(ids)}", ids, SamplingParams(max_new_tokens=1))
    targets = torch.tensor(ids[1:] + [ids[-1]])
    total = 0.0
    try:
        while request.num_computed_tokens < len(ids):
            out = engine.scheduler.schedule()
            hidden, batch = engine.runner.hidden_states(out)
            start, n = request.num_computed_tokens, out.scheduled[0].num_new_tokens
            logp = engine.model.compute_logits(hidden).log_softmax(dim=-1)           # [n, V]
            rows = torch.arange(n) if start + n < len(ids) else torch.arange(n - 1)    # last token has no target
            total -= logp[rows, targets[start:start + n][rows]].sum().item()
            engine.scheduler.update(out, {})
    finally:
        engine.abort(request.request_id)
    return total


def perplexity(engine: Engine, text: str, tokenizer, seqlen: int, max_windows: int | None = None,
               progress: bool = True) -> PerplexityResult:
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = len(ids) // seqlen
    if max_windows:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    nll = 0.0
    for w in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
        nll += window_nll(engine, ids[w * seqlen:(w + 1) * seqlen])
    scored = windows * (seqlen - 1)
    return PerplexityResult(math.exp(nll / scored), nll / scored, scored, windows)
