"""Model parity: our paged forward vs transformers' reference, logits within 1e-4 (fp32)."""
from __future__ import annotations

import pytest
import torch
from conftest import native_isas

from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine

DECODE_STEPS = 32


def hf_logits(model_dir, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Greedy-decode with transformers; logits [steps + 1, V] for each sampled position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    rows = []
    with torch.no_grad():
        for _ in range(steps + 1):
            logits = model(ids).logits[0, -1]
            rows.append(logits)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return torch.stack(rows), ids[0, len(prompt):].tolist()


def engine_logits(engine: Engine, prompt: list[int], steps: int) -> torch.Tensor:
    """Teacher-free greedy run through the engine, collecting the logits of every sample."""
    request = engine.add_request("r", prompt, SamplingParams(max_new_tokens=steps + 1))
    rows = []
    while not request.is_finished:
        out = engine.scheduler.schedule()
        logits, sampled = engine.runner.compute_logits(out)
        if sampled:
            rows.append(logits[0])
        engine.scheduler.update(out, {r.request_id: int(l.argmax()) for r, l in zip(sampled, logits)})
    return torch.stack(rows)


def small_engine(model_dir, **kw) -> Engine:
    cfg = dict(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=4)
    return Engine(model_dir, EngineConfig(**{**cfg, **kw}), progress=False)


# families transformers has no class for: checked against the Llama checkpoint they were written from
REFERENCE = {"internlm2": "llama_src", "internlm": "llama_bias"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "internlm2", "internlm", "qwen3", "llama3", "smollm3", "phi3",
                                    "qwen3_moe", "mixtral", "gemma3", "gemma2"])
@pytest.mark.parametrize("chunk", [8192, 7])
def test_logits_match_transformers(tiny_dirs, family, chunk):
    """InternLM2 and InternLM (v1) are remote code, not transformers classes: their checkpoints
    are a Llama (with q/k/v/o biases for v1) rewritten in their layout, so the reference is
    transformers' Llama on the original."""
    prompt = list(range(3, 40))
    reference = tiny_dirs[REFERENCE.get(family, family)]
    # uncached, transformers rotates every position with LongRoPE's long factors once the sequence
    # passes 64; the cached case is test_families' longrope test
    steps = 24 if family == "phi3" else DECODE_STEPS
    expected, _ = hf_logits(reference, prompt, steps)
    got = engine_logits(small_engine(tiny_dirs[family], max_prefill_token_num=chunk), prompt, steps)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", [*native_isas(), "torch"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "smollm3", "phi3", "qwen3_moe", "gemma3"])
def test_every_backend_matches_transformers(tiny_dirs, monkeypatch, family, backend):
    """The same model on each ops object this machine has (the process picks one; here each is
    forced at load), prefill in chunks of 7 so later chunks attend to cached context."""
    from quantserve import kernels
    from quantserve.kernels.native import NativeOps
    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    ops = TorchOps() if backend == "torch" else NativeOps(kernels.load(backend), backend)
    monkeypatch.setattr(loader, "ops_for", lambda *args: ops)
    prompt = list(range(3, 40))
    expected, _ = hf_logits(tiny_dirs[family], prompt, 8)
    engine = small_engine(tiny_dirs[family], max_prefill_token_num=7)
    fused = backend != "torch" and family not in ("qwen3_moe", "gemma3")   # the C step: Llama-style dense layers
    assert engine.model.ops is ops and (engine.model.fused is not None) == fused
    torch.testing.assert_close(engine_logits(engine, prompt, 8), expected, atol=1e-4, rtol=0)
