"""Checkpoint loading: sharded safetensors, pytorch_model.bin, corrupt and missing files."""
from __future__ import annotations

import pytest
import torch

from quantserve.models.loader import ModelLoadError, load_model

from conftest import TINY


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def logits_of(model_dir) -> torch.Tensor:
    from quantserve.config import EngineConfig, SamplingParams
    from quantserve.engine.engine import Engine

    engine = Engine(model_dir, EngineConfig(dtype="float32", session_len=64, cache_block_seq_len=16), progress=False)
    engine.add_request("r", list(range(3, 20)), SamplingParams(max_new_tokens=1))
    logits, _ = engine.runner.compute_logits(engine.scheduler.schedule())
    return logits[0]


@pytest.mark.parametrize("save", [dict(safe_serialization=True, max_shard_size="50KB"),
                                  dict(safe_serialization=False)])
def test_sharded_and_bin_checkpoints(tmp_path, save):
    model = tiny_model()
    model.save_pretrained(tmp_path, **save)
    expected = model(torch.arange(3, 20).unsqueeze(0)).logits[0, -1]
    torch.testing.assert_close(logits_of(tmp_path), expected, atol=1e-4, rtol=0)


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path, torch.float32, "cpu", 64, progress=False)


def test_missing_shard_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(tmp_path, torch.float32, "cpu", 64, progress=False)


def test_missing_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path, torch.float32, "cpu", 64, progress=False)
