"""Shared fixtures: tiny random checkpoints of every supported family, saved as HF dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_llama(path: Path, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return save_hf(LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval(), path)


def build_qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return save_hf(Qwen2ForCausalLM(Qwen2Config(**{**TINY, "tie_word_embeddings": True})).eval(), path)


def build_mistral(path: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return save_hf(MistralForCausalLM(MistralConfig(**TINY, sliding_window=None, head_dim=32)).eval(), path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": build_llama(root / "llama"),
        "qwen2": build_qwen2(root / "qwen2"),
        "mistral": build_mistral(root / "mistral"),
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
