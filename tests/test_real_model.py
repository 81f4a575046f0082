"""End to end on the real default model (SmolLM2-135M-Instruct, prepared offline)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quantserve import EngineConfig, GenerationConfig, pipeline

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a KV cache is in one paragraph.", "List three prime numbers."]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def pipe(default_model):
    return pipeline(str(default_model), EngineConfig(dtype="float32", session_len=2048), progress=False)


def test_greedy_equals_transformers(pipe, default_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ours = pipe(PROMPTS, gen_config=cfg)
    for prompt, out in zip(PROMPTS, ours):
        assert out.token_ids == hf_greedy(hf, pipe.tokenizer.encode_prompt(prompt), NEW_TOKENS), prompt


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers greedy decoding that, like ignore_eos, does not stop at EOS."""
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def test_answers_paris(pipe):
    out = pipe("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=32))
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_chat_cli_answers_paris():
    proc = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "chat"],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_chat_cli_multi_turn_and_end():
    script = "My name is Ada.\nWhat is my name?\nend\nexit\nnever reached\n"
    proc = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "chat", "--temperature", "0"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.strip().split("\n")
    assert len(replies) >= 2 and "Ada" in proc.stdout


def test_chat_cli_rejects_unsupported_flag():
    proc = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "chat", "--tp", "2"],
                          input="", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--tp" in proc.stderr
