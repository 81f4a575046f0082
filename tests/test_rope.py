"""RoPE scaling: every variant against transformers, and a 4096-token prompt on a 2048 model."""
from __future__ import annotations

import pytest
import torch

from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine
from quantserve.models.rope import inv_frequencies

from conftest import build_llama

VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
}


def hf_rope(variant: dict, head_dim: int, seq_len: int):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=512,
                      rope_parameters={"rope_theta": 10000.0, **variant})
    return ROPE_INIT_FUNCTIONS[variant["rope_type"]](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_frequencies_match_transformers(name, head_dim):
    session = 2048
    ours, our_scale = inv_frequencies(head_dim, 10000.0, VARIANTS[name], 512, session)
    theirs, their_scale = hf_rope(VARIANTS[name], head_dim, session)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    assert our_scale == pytest.approx(their_scale)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("long") / "llama", max_position_embeddings=2048)


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3"])
def test_scaled_model_logits_match_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    path = build_llama(tmp_path / name, rope_scaling=VARIANTS[name], max_position_embeddings=512)
    prompt = list(range(3, 300))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf(torch.tensor([prompt])).logits[0, -1]
    engine = Engine(path, EngineConfig(dtype="float32", session_len=1024, cache_block_seq_len=32), progress=False)
    engine.add_request("r", prompt, SamplingParams(max_new_tokens=1))
    got, _ = engine.runner.compute_logits(engine.scheduler.schedule())
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=0)


def test_dynamic_ntk_runs_4096_tokens_on_a_2048_model(long_model):
    """--rope-scaling-factor 2 (dynamic NTK, as LMDeploy's CLI): a 4096-token prompt runs, chunked
    through the paged cache, and its logits equal transformers' dynamic NTK at that length."""
    from transformers import AutoModelForCausalLM

    prompt = [(i * 37) % 300 + 3 for i in range(4095)]
    engine = Engine(long_model, EngineConfig(dtype="float32", session_len=4096, rope_scaling_factor=2.0,
                                             max_prefill_token_num=1024), progress=False)
    req = engine.add_request("long", prompt, SamplingParams(max_new_tokens=1))
    logits = None
    while not req.is_finished:
        out = engine.scheduler.schedule()
        got, sampled = engine.runner.compute_logits(out)
        logits = got[0] if sampled else logits
        engine.scheduler.update(out, {r.request_id: 0 for r in sampled})
    hf = AutoModelForCausalLM.from_pretrained(long_model, dtype=torch.float32,
                                              rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0}).eval()
    expected = hf(torch.tensor([prompt + [0]])).logits[0, -2]        # seq_len 4096 -> same NTK base
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_without_scaling_the_session_is_capped_by_config(long_model):
    engine = Engine(long_model, EngineConfig(dtype="float32"), progress=False)
    assert engine.session_len == 2048
